"""dtlab installs under one name: `dtlab.models`, `dtlab.trainers`, `dtlab.analysis`, `dtlab.dashboards`.

The folders sit at the repository's top level, but nothing installs a top-level `models`,
`trainers`, `analysis` or `dashboards`: a user's own `models.py` must not be what dtlab imports.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("models", "trainers", "analysis", "dashboards")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as a user's script there would
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_users_own_modules_do_not_shadow_dtlab(tmp_path):
    for name in TOP:  # a user's working directory with modules of the same names
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s {name}.py was imported')\n")
    code = """
from dtlab import models
from dtlab.trainers.spec import load_spec
from dtlab.analysis import loaders
from dtlab.dashboards import metrics
m = models.build_model("mod", preset="debug")
assert type(m).__module__ == "dtlab.models.modeling", type(m).__module__
print("ok", models.__name__)
"""
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok dtlab.models" in proc.stdout


def test_nothing_installs_top_level_names(tmp_path):
    code = f"import importlib.util as u; print([n for n in {TOP!r} if u.find_spec(n) is not None])"
    proc = run_python(code, tmp_path)  # an empty directory: only what is installed can be found
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"installed as top-level packages: {proc.stdout.strip()}"


def test_console_script_and_python_m(tmp_path):
    exe = Path(sys.executable).with_name("dtlab")
    assert exe.is_file(), f"no console script beside {sys.executable}"
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "dtlab.trainers.cli", "--help"],
                [sys.executable, "-m", "dtlab.trainers", "--help"]):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "usage: dtlab" in proc.stdout, (cmd, proc.stderr[-2000:])


def test_compute_accounting_imports_no_torch(tmp_path):
    """`dtlab.models.flops` is a pure function of the config: importing it (which runs
    `dtlab.models/__init__`) must not import torch, and it counts from a plain namespace."""
    code = """
import sys
from types import SimpleNamespace
from dtlab.models.flops import flops_per_token, capacity_k
cfg = SimpleNamespace(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      layer_kinds=["dense", "dense"], capacity=None)
assert flops_per_token(cfg, 16) > 0 and capacity_k(0.125, 64) == 8
print(sorted(m for m in ("torch", "transformers", "ray") if m in sys.modules))
"""
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"importing dtlab.models.flops loaded {proc.stdout.strip()}"


@pytest.mark.slow
def test_wheel_holds_only_the_dtlab_package(tmp_path):
    """A built (non-editable) wheel: every module lives under dtlab/, the Grafana JSON included."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dtlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dtlab"}, top
    assert "dtlab/__init__.py" not in names  # a namespace: nothing else can clash with it
    for pkg in TOP:
        assert f"dtlab/{pkg}/__init__.py" in names
    assert "dtlab/dashboards/grafana_dtlab.json" in names
    for sub in ("cli", "orchestrate", "tools", "monitor", "run"):  # each sub-package listed in pyproject.toml
        assert f"dtlab/trainers/{sub}/__init__.py" in names, sub
    tasks = "dtlab/trainers/tools/tasks"
    assert {f"{tasks}/dtlab_next_line.jsonl", f"{tasks}/dtlab_cloze.jsonl"} <= set(names)


def test_the_repository_explains_itself():
    """A clone has its own docs: nothing tracked points at the design folder outside the repository."""
    outside = "../" + "shared/"  # split, so this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = [f for f in tracked if (ROOT / f).is_file() and outside in (ROOT / f).read_text(errors="ignore")]
    assert not hits, hits
    for doc in ("architectures.md", "specs.md", "sweeps.md"):
        assert (ROOT / "docs" / doc).is_file(), doc
