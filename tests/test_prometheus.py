"""The Grafana dashboard's queries return data: a real Prometheus scrapes a short Ray run through the
config Ray writes, and every PromQL expression in `grafana_dtlab.json` (and every `label_values`
templating query) returns this run's series through Prometheus's HTTP API.

How Ray 2.60 wires it: the dashboard's metrics module writes `<session>/metrics/prometheus/prometheus.yml`,
one `file_sd_configs` job over `<session>/prom_metrics_service_discovery.json`, which the dashboard
rewrites every 5 s with the metrics export address of each live node (and the dashboard's and
autoscaler's). A worker's `ray.util.metrics.Gauge` values reach its node's metrics agent every
`metrics_report_interval_ms` and are dropped there two intervals after the last report: the series
end with the training worker. So Prometheus scrapes while the run trains, and the queries are
evaluated at a moment inside that window.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from dtlab.dashboards.metrics import DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "dashboards" / "grafana_dtlab.json"
VARIANT = "dtf"  # routed, so the per-layer metrics (selected_frac, gate_mean, causal_agreement) exist
pytestmark = pytest.mark.slow


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is missing (.ci/run installs Debian's prometheus package)")
        pytest.skip("needs the prometheus binary (Debian: apt-get install prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Prometheus:
    """A `prometheus` process on a free loopback port with its own storage; `stop` ends it."""

    def __init__(self, binary: str, config: Path, work: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as err:  # a bad query: Prometheus says why in the body
            return json.loads(err.read() or b"{}") or {"status": "error", "error": str(err)}

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def targets(self) -> list[dict]:
        return self.get("/api/v1/targets").get("data", {}).get("activeTargets", [])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def grafana_regex(values: list[str]) -> str:
    """What Grafana's Prometheus data source puts for a multi-value variable used in `=~"$var"`:
    each value regex-escaped (inside a PromQL string, so the backslash is doubled), `(a|b)` for several."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable syntaxes ($var, ${var}, ${var:fmt}, [[var]]) replaced; an unknown one fails."""
    builtins = {"__interval": "1s", "__rate_interval": "1m", "__range": "5m"}

    def sub(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name in variables:
            return variables[name]
        if name in builtins:
            return builtins[name]
        pytest.fail(f"{expr!r} uses ${name}, which the test does not know how to fill in")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", sub, expr)


def label_values_params(query: str) -> tuple[str, dict]:
    """Grafana's `label_values([selector, ]label)` as Prometheus's label-values API call."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*", query)
    if not m:
        pytest.fail(f"templating query {query!r} is not label_values(...): the test cannot run it")
    selector, label = m.groups()
    return f"/api/v1/label/{label}/values", ({"match[]": selector} if selector else {})


def test_every_dashboard_query_returns_the_runs_series(tmp_path, monkeypatch):
    binary = prometheus_binary()
    import ray
    import yaml

    from dtlab.trainers.orchestrate.ray_train import init_ray
    from dtlab.trainers.orchestrate.runner import run_training
    from dtlab.trainers.spec import spec_from_dict
    from tests.trainers.conftest import tiny_spec

    board = json.loads(BOARD.read_text())
    exprs = [(p["title"], t.get("refId", "?"), t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    templating = [v for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]
    assert exprs, "the dashboard has no queries"

    # A local cluster of our own: its workers report metrics every second (Ray's default is every 10 s).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    monkeypatch.setenv("DTLAB_CACHE", str(tmp_path / "cache"))
    if ray.is_initialized():
        ray.shutdown()
    prom = None
    started = time.time()
    try:
        init_ray()
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        ray_config = session / "metrics" / "prometheus" / "prometheus.yml"
        wait_for(f"Ray to write {ray_config}", ray_config.exists)
        config = yaml.safe_load(ray_config.read_text())
        sd_files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", [])
                    for f in sd["files"]]
        assert sd_files, f"Ray's Prometheus config has no file service discovery: {config}"
        wait_for(f"Ray to write {sd_files}", lambda: all(Path(f).exists() for f in sd_files))
        # Ray's scrape configs and discovery as written; only the intervals shortened.
        config.setdefault("global", {}).update(scrape_interval="1s", evaluation_interval="1s")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = Prometheus(binary, tmp_path / "prometheus.yml", tmp_path)
        wait_for("prometheus to be ready", prom.ready)
        wait_for("a scrape target Prometheus discovered through Ray's file to be up",
                 lambda: any(t["health"] == "up" for t in prom.targets()))

        run = f"prom-{uuid.uuid4().hex[:8]}"  # the run's name: its directory's name
        spec = spec_from_dict(tiny_spec(model={"type": VARIANT}, resources={"use_ray": True},
                                        training={"max_steps": 20, "log_every": 1, "eval_every": 5}))
        t0 = time.time()
        run_training(spec, tmp_path / run)
        t1 = time.time()

        # When was every exported metric of this run in Prometheus? (They end with the worker.)
        seen = {}
        for name in DESCRIPTIONS:
            r = prom.get("/api/v1/query_range", query=f'ray_{name}{{run="{run}"}}', start=t0, end=t1, step=1)
            seen[name] = {float(v[0]) for s in r.get("data", {}).get("result", []) for v in s["values"]}
        window = sorted(set.intersection(*seen.values()))
        targets = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in prom.targets()]
        assert window, (f"Prometheus never held all of the run's metrics at once: samples per metric "
                        f"{ {k: len(v) for k, v in seen.items()} }; targets {targets}")
        at = window[len(window) // 2]
        print(f"all metrics scraped at {len(window)} of the run's {t1 - t0:.0f} s")

        # The templating queries offer this run (Grafana's label_values is Prometheus's label-values API).
        selected = {"run": [run], "variant": [VARIANT]}
        for var in templating:
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            assert var["name"] in selected, f"templating variable {var['name']!r}: the test does not know its value"
            path, params = label_values_params(query)
            r = prom.get(path, start=t0 - 60, end=time.time(), **params)
            offered = r.get("data") or []
            assert set(selected[var["name"]]) <= set(offered), (
                f"templating {var['name']!r} ({query}) offers {offered}, not {selected[var['name']]}: {r}")

        # Every panel query, with this run selected, returns series of this run.
        variables = {name: grafana_regex(chosen) for name, chosen in selected.items()}
        failed = []
        for title, ref, expr in exprs:
            query = interpolate(expr, variables)
            r = prom.get("/api/v1/query", query=query, time=at)
            result = r.get("data", {}).get("result", [])
            if r.get("status") != "success":
                failed.append(f"{title} [{ref}] {query}: {r.get('errorType')}: {r.get('error')}")
            elif not result:
                failed.append(f"{title} [{ref}] {query}: no series")
            elif any(s["metric"].get("run") != run for s in result):
                failed.append(f"{title} [{ref}] {query}: series without run={run!r}: {[s['metric'] for s in result]}")
        assert not failed, (f"{len(failed)} of {len(exprs)} dashboard queries failed at t={at:.0f} "
                            f"(run {t0:.0f}..{t1:.0f}):\n" + "\n".join(failed))
    finally:
        if prom is not None:
            prom.stop()
        ray.shutdown()
        print(f"prometheus test: {time.time() - started:.1f} s")
