"""Each run's records sent to the experiment trackers users already use: TensorBoard, MLflow, W&B.

`tracking:` in the spec names them (several allowed; none by default). The driver sends each run's
records as `metrics.jsonl` has them (the progress display reads them anyway, see `progress.py`), so
runs in this process, in Ray workers and a sweep's trials are tracked alike, live, by the trackers'
own clients. Metric keys are `train/<field>` and `eval/<field>` (nested routing statistics as
`eval/routing/<layer>/<stat>`), at the record's step; the resolved spec goes in as parameters
(MLflow, W&B) or text (TensorBoard), and the report as an artifact (MLflow, W&B).

Offline by default: MLflow writes to a SQLite store under the output directory (`mlflow.db`,
artifacts in `mlartifacts/`) unless `tracking.mlflow_uri` says otherwise; W&B runs in offline mode
(`wandb sync` uploads later) unless `tracking.wandb_mode: online`; TensorBoard event files go to
`tensorboard/<run>/`. A resumed run continues the same tracker runs (ids in the run's
`tracking.json`) and sends only records past what they already hold.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from dtlab.analysis.rundir import write_atomic
from dtlab.trainers.spec import Spec, SpecError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
STATE = "tracking.json"


def check_tracking(spec: Spec) -> None:
    """Before any work: every tracker the spec names can be imported."""
    missing = [b for b in spec.tracking.backends if importlib.util.find_spec(PACKAGES[b]) is None]
    if missing:
        raise SpecError(f"tracking: {', '.join(missing)} named in the spec but not installed (no module "
                        f"{', '.join(repr(PACKAGES[b]) for b in missing)}); install the trackers with "
                        "pip install 'dtlab[tracking]', or remove them from tracking:")
    cfg = spec.tracking
    if "mlflow" in cfg.backends and cfg.mlflow_uri:
        scheme = cfg.mlflow_uri.split(":", 1)[0].split("+", 1)[0] if ":" in cfg.mlflow_uri else "file"
        if scheme not in MLFLOW_SCHEMES:
            raise SpecError(f"tracking.mlflow_uri={cfg.mlflow_uri!r}: expected a tracking URI of MLflow "
                            f"({', '.join(s + ':' for s in MLFLOW_SCHEMES)}), e.g. sqlite:///runs/mlflow.db or "
                            "http://host:5000")
    if "wandb" in cfg.backends and cfg.wandb_mode == "online" and not _wandb_logged_in():
        raise SpecError("tracking.wandb_mode=online: W&B has no API key here (run `wandb login` or set "
                        "WANDB_API_KEY), or use wandb_mode: offline and `wandb sync` later")


MLFLOW_SCHEMES = ("sqlite", "file", "http", "https", "databricks", "postgresql", "mysql", "mssql")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested keys joined with '/' (lists, strings and flags left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
            out[name] = float(value)
    return out


def spec_params(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved spec as flat `section.key` parameters."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(spec_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TrackingError(RuntimeError):
    """A tracker could not start a run or take a record (training goes on; metrics.jsonl is the record)."""


class RunTracker:
    """One run's connection to each tracker the spec names."""

    def __init__(self, spec: Spec, run_dir: Path, store: Path, name: str) -> None:
        self.spec, self.run_dir, self.store, self.name = spec, Path(run_dir), Path(store), name
        self.state = self._read_state()
        # the last step of each record kind that each backend holds (a backend added on resume gets
        # the whole history)
        logged = self.state.get("logged")
        if not isinstance(logged, dict) or not all(isinstance(v, dict) for v in logged.values()):
            logged = {}
        self.state["logged"] = logged
        self.logged: dict[str, dict[str, int]] = logged
        self.writers: dict[str, Any] = {}
        self.pending: dict[str, list[tuple[str, int, dict[str, float]]]] = {}  # records a backend failed to take
        self.closed = False
        for backend in spec.tracking.backends:
            try:
                self.writers[backend] = getattr(self, f"_open_{backend}")()
            except Exception as err:
                self.close("failed")
                raise TrackingError(f"tracking: {backend} could not start a run ({type(err).__name__}: "
                                    f"{' '.join(str(err).split())[:300]})") from err
        self._save_state()

    # ---- state --------------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.run_dir / STATE).read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _save_state(self) -> None:
        if not self.run_dir.is_dir():  # a sweep's trial before its driver laid the directory out
            return
        write_atomic(self.run_dir / STATE, json.dumps(self.state, indent=1))

    # ---- opening ------------------------------------------------------------------------------------
    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.store / "tensorboard" / self.name), flush_secs=5)
        if not self.state.get("tensorboard"):
            from dtlab.trainers.spec import dump_spec

            writer.add_text("spec", "```yaml\n" + dump_spec(self.spec) + "\n```", 0)
            self.state["tensorboard"] = str(self.store / "tensorboard" / self.name)
        return writer

    def _open_mlflow(self):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        cfg = self.spec.tracking
        uri = self.state.get("mlflow_uri") or cfg.mlflow_uri or f"sqlite:///{(self.store / 'mlflow.db').resolve()}"
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an unreachable server fails in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        client = MlflowClient(tracking_uri=uri)
        run_id = self.state.get("mlflow_run_id")
        if run_id is None:
            name = cfg.mlflow_experiment or self.spec.name
            experiment = client.get_experiment_by_name(name)
            exp_id = experiment.experiment_id if experiment else client.create_experiment(
                name, artifact_location=(self.store / "mlartifacts").resolve().as_uri())
            run_id = client.create_run(exp_id, run_name=self.name, tags={
                "dtlab.variant": self.spec.model.type, "dtlab.seed": str(self.spec.seed),
                "dtlab.run_dir": str(self.run_dir.resolve())}).info.run_id
            params = [Param(k, v[:6000]) for k, v in spec_params(self.spec.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i:i + 100])
            self.state.update(mlflow_uri=uri, mlflow_run_id=run_id)
        else:
            client.update_run(run_id, status="RUNNING")
        return client

    def _open_wandb(self):
        import wandb

        cfg = self.spec.tracking
        run_id = self.state.setdefault("wandb_id", uuid.uuid4().hex[:12])
        (self.store / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(project=cfg.wandb_project, name=self.name, id=run_id, resume="allow",
                          mode=cfg.wandb_mode, dir=str(self.store), config=self.spec.model_dump(mode="json"),
                          reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    # ---- records ------------------------------------------------------------------------------------
    def record(self, record: dict[str, Any]) -> None:
        """Send one `metrics.jsonl` record to each backend that does not hold it yet. A record a
        backend fails to take is sent again, first, with the next one; the other backends go on."""
        if self.closed:
            return
        kind, step = record.get("kind", "train"), int(record.get("step") or 0)
        if kind not in ("train", "eval"):
            return
        values, failed = flatten(record, f"{kind}/"), []
        for backend, writer in self.writers.items():
            done = self.logged.setdefault(backend, {})
            if step <= done.get(kind, -1):
                continue
            queue = self.pending.setdefault(backend, [])
            queue.append((kind, step, values))
            while queue:  # what failed before goes first, in order
                k, s, v = queue[0]
                try:
                    getattr(self, f"_send_{backend}")(writer, v, s)
                except Exception as err:
                    failed.append(f"{backend}: {type(err).__name__}: {err}")
                    break
                done[k] = max(done.get(k, -1), s)
                queue.pop(0)
        self._save_state()
        if failed:
            raise TrackingError(f"step {step}: " + "; ".join(failed))

    def _send_tensorboard(self, writer, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def _send_mlflow(self, client, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.state["mlflow_run_id"], metrics=metrics[i:i + 1000])

    def _send_wandb(self, run, values: dict[str, float], step: int) -> None:
        run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def attach(self, path: Path) -> None:
        """A file (the report) as an artifact of this run."""
        if self.closed:
            return
        if "mlflow" in self.writers:
            self.writers["mlflow"].log_artifact(self.state["mlflow_run_id"], str(path))
        if "wandb" in self.writers:
            self.writers["wandb"].save(str(path), base_path=str(Path(path).parent), policy="now")
        if "tensorboard" in self.writers:
            self.writers["tensorboard"].add_text("report", str(Path(path).resolve()), self.logged.get("eval", 0))

    def close(self, status: str = "finished") -> None:
        if self.closed:
            return
        self.closed = True
        if "tensorboard" in self.writers:
            self.writers["tensorboard"].close()
        if "mlflow" in self.writers:
            mlflow_status = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
            self.writers["mlflow"].set_terminated(self.state["mlflow_run_id"], status=mlflow_status)
        if "wandb" in self.writers:
            self.writers["wandb"].finish(exit_code=0 if status == "finished" else 1)
        self.writers = {}
        self._save_state()


class Tracking:
    """The trackers of one command: a `RunTracker` per run, the report attached to all at the end."""

    def __init__(self, store: str | os.PathLike) -> None:
        self.store = Path(store)
        self.runs: dict[str, RunTracker] = {}
        self.ended: dict[str, str] = {}

    def start(self, spec: Spec, run_dir: Path, name: str | None = None) -> RunTracker | None:
        if not spec.tracking.backends:
            return None
        tracker = RunTracker(spec, run_dir, self.store, name or Path(run_dir).name)
        self.runs[str(run_dir)] = tracker
        return tracker

    def end(self, run_dir: Path, status: str) -> None:
        """A run ended: the trackers are told its status (the writers stay open for the report)."""
        if str(run_dir) in self.runs:
            self.ended[str(run_dir)] = status

    def close(self, report: Path | None = None) -> None:
        for key, tracker in self.runs.items():
            if report is not None and report.is_file():
                tracker.attach(report)
            tracker.close(self.ended.get(key, "stopped"))
        self.runs = {}
