"""The checkpoint of record in Ray's storage, served by a real S3-compatible server on loopback
(moto's server mode): at most one latest and one best checkpoint kept there, and a resume reads the
checkpoint and the records back from it after the local copies are gone."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtlab.trainers.spec import SpecError, spec_from_dict
from tests.records import records
from tests.trainers.conftest import stored, tiny_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_resume_reads_the_checkpoint_back_from_s3_after_the_local_copy_is_deleted(tmp_path, s3):
    s3 = s3("runs")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(resources={"use_ray": True, "storage": s3},
                                             training={"max_steps": 12, "eval_every": 2})))
    cmd = [sys.executable, "-m", "dtlab.trainers.cli", "train", str(spec)]
    full = subprocess.run(cmd + ["resources.storage=null", "--out", str(tmp_path / "full"), "--no-ray"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert full.returncode == 0, full.stderr[-2000:]
    # the worker dies (SIGKILL) while writing its 5th checkpoint (step 10; step 0 is not saved): storage has step 8's
    cut = subprocess.run(cmd + ["--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "DTLAB_FAULT": "checkpoint-written:5"})
    assert cut.returncode == 1, (cut.returncode, cut.stderr[-3000:])
    fs, folders = stored(s3)
    assert 1 <= len(folders) <= 3, folders  # the latest and the best Ray registered (and an unregistered upload)
    steps = [json.loads(fs.open_input_stream(f"{f}/checkpoint/trainer_state.json").read())["step"] for f in folders]
    assert max(steps) == 8, steps
    assert fs.get_file_info(f"{folders[0]}/metrics.jsonl").size > 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last").is_dir()  # the precondition: there was a local copy to lose
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    resumed = subprocess.run(cmd + ["--out", str(run), "--resume"], capture_output=True, text=True, timeout=600,
                             cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr + (run / "output.log").read_text()
    # the latest checkpoint Ray had registered: step 8's, or step 6's when the worker died before Ray's
    # controller took in its last report (its upload then lies unregistered in storage)
    read_back = re.findall(r"checkpoint of step (\d+) read back from storage", said)
    assert read_back and int(read_back[0]) in (6, 8), said[-3000:]
    volatile = ("tokens_per_s", "peak_rss_gib")
    got, want = records(run, drop=volatile), records(tmp_path / "full", drop=volatile)
    # each record once, as an uninterrupted run's (that one ran without Ray: two threads, not one, so a
    # loss may differ in its last float32 bit)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        assert {k: v for k, v in a.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in b.items() if isinstance(v, float)}, rel=1e-6)
    _, folders = stored(s3)
    assert 1 <= len(folders) <= 2, folders  # at most the latest and the best are kept


def test_storage_is_checked_before_any_work(tmp_path):
    from dtlab.trainers.orchestrate.runner import check_resources

    with pytest.raises(SpecError, match="resources.storage='relative/path': expected a URI"):
        check_resources(spec_from_dict(tiny_spec(resources={"use_ray": True, "storage": "relative/path"})), True)
    with pytest.raises(SpecError, match="resources.storage=.*through Ray"):
        check_resources(spec_from_dict(tiny_spec(resources={"storage": str(tmp_path)})), False)
    with pytest.raises(SpecError, match="resources.storage='nope://x': cannot be written"):
        check_resources(spec_from_dict(tiny_spec(resources={"use_ray": True, "storage": "nope://x"})), True)
    check_resources(spec_from_dict(tiny_spec(resources={"use_ray": True, "storage": str(tmp_path / "s")})), True)
    assert (tmp_path / "s").is_dir()
    from pathlib import PurePath

    from dtlab.trainers.orchestrate.runner import check_out

    with pytest.raises(SpecError, match="a URI is not a directory.*resources.storage"):
        check_out(Path("s3://bucket/sweep"))
    assert PurePath("s3://bucket/sweep").as_posix() == "s3:/bucket/sweep"  # what --out would have made of it


def test_a_resume_relies_on_storage_only_when_storage_holds_the_run(tmp_path):
    from dtlab.trainers.orchestrate.runner import storage_holds

    run, store = tmp_path / "run", tmp_path / "store"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"name": "t"}))
    assert not storage_holds(run, str(store))  # a run that never used storage
    (run / "run.json").write_text(json.dumps({"name": "t", "storage_name": "run-1234"}))
    assert not storage_holds(run, str(store))  # storage holds nothing of it
    (store / "run-1234" / "checkpoint_2026-11-28_00-00-00.000000").mkdir(parents=True)
    assert storage_holds(run, str(store))
