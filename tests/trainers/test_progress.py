"""What the terminal shows: progress from the runs' records, library output sent to output.log, the
closing table, `dtlab ls`."""

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtlab.analysis.rundir import write_status
from dtlab.trainers.cli.listing import listing
from dtlab.trainers.cli.main import main
from dtlab.trainers.monitor.progress import LOG_NAME, Console
from tests.analysis.fixtures import make_run

ROOT = Path(__file__).resolve().parents[2]


def _append(run_dir: Path, *records) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_plain_progress_reads_the_records_as_they_come(tmp_path):
    run = tmp_path / "mod-seed0"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"training": {"total_steps": 40}}))
    err = io.StringIO()
    ui = Console(err=err, out=io.StringIO(), live=False, interval=0)
    seen = []
    watch = ui.follow("k", run, sinks=[seen.append])
    _append(run, {"kind": "eval", "step": 0, "val_loss": 7.0})
    ui.tick()
    _append(run, {"kind": "train", "step": 10, "loss": 6.5, "tokens_per_s": 1234.0})
    time.sleep(0.05)
    ui.tick()
    with (run / "metrics.jsonl").open("a") as f:  # half a line: the writer is in the middle of it
        f.write('{"kind": "train", "step": 20, "lo')
    ui.tick()
    assert watch.step == 10 and len(seen) == 2
    with (run / "metrics.jsonl").open("a") as f:
        f.write('ss": 6.0, "tokens_per_s": 1300.0}\n')
    ui.tick()
    ui.unfollow("k")
    ui.close()
    lines = err.getvalue().splitlines()
    assert lines[0] == f"mod-seed0: started ({run})"
    assert "mod-seed0: step 10/40 (25%) | loss 6.5000 | val 7.0000 | 1,234 tok/s" in lines[1]
    assert lines[-1].startswith("mod-seed0: finished at step 20/40 | val_loss 7.0000")
    assert [r["step"] for r in seen] == [0, 10, 20]
    assert not any("\x1b" in line or "\r" in line for line in lines)


def test_plain_lines_come_at_most_once_per_interval_and_only_on_progress(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    err = io.StringIO()
    ui = Console(err=err, out=io.StringIO(), live=False, interval=3600)
    ui.follow("k", run)
    for step in (2, 4, 6):
        _append(run, {"kind": "train", "step": step, "loss": 1.0})
        ui.tick()
    ui.unfollow("k")
    assert len(err.getvalue().splitlines()) == 2  # started, finished: nothing between within the hour


def test_resumed_run_rewrites_its_records_and_the_sink_sees_them_again(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    seen = []
    ui = Console(err=io.StringIO(), out=io.StringIO(), live=False, interval=0)
    ui.follow("k", run, sinks=[seen.append])
    _append(run, {"kind": "train", "step": 2, "loss": 1.0}, {"kind": "train", "step": 4, "loss": 0.9})
    ui.tick()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 2, "loss": 1.0}) + "\n")  # cut back
    ui.tick()
    assert [r["step"] for r in seen] == [2, 4, 2]  # trackers skip what they hold (tests of tracking)


def test_capture_sends_library_output_and_child_processes_to_output_log(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    ui = Console(err=err, out=out, live=False)
    ui.capture(tmp_path)
    try:
        print("a python print")
        os.write(1, b"fd 1 write\n")
        os.write(2, b"fd 2 write\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
        ui.say("ours")
        ui.note("detail")
    finally:
        ui.close()
    log = (tmp_path / LOG_NAME).read_text()
    for text in ("a python print", "fd 1 write", "fd 2 write", "child out", "child err", "ours", "detail"):
        assert text in log, text
    assert err.getvalue() == "ours\n" and out.getvalue() == ""
    print("after")  # the process's output is back where it was
    assert "after" not in (tmp_path / LOG_NAME).read_text()


def test_verbose_prints_details_and_captures_nothing(tmp_path):
    err = io.StringIO()
    ui = Console(verbose=True, err=err, out=io.StringIO())
    ui.capture(tmp_path)
    ui.note("detail")
    ui.close()
    assert err.getvalue() == "detail\n" and not (tmp_path / LOG_NAME).exists()


def test_live_progress_draws_with_rich_and_ends_with_the_run(tmp_path):
    run = tmp_path / "dtf-seed0"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"training": {"total_steps": 8}}))
    err = io.StringIO()
    ui = Console(err=err, out=io.StringIO(), live=True)
    with ui.following(run):
        _append(run, {"kind": "train", "step": 4, "loss": 2.0, "tokens_per_s": 10.0})
        ui.tick()
        assert ui._progress is not None
    assert ui._progress is None  # the display stops with the last run: what follows prints below it
    ui.say("after")
    ui.close()
    text = err.getvalue()
    assert "dtf-seed0" in text and "4/8" in text and "finished" in text and text.endswith("after\n")


# ---- dtlab ls -------------------------------------------------------------------------------------------
def test_ls_says_how_each_run_stands(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text("{}")
    make_run(exp, "standard-seed0", "standard", final=5.5)
    unfinished = make_run(exp, "mod-seed0", "mod", steps=20, cut=True)
    write_status(unfinished, "running")  # this process: alive
    gone = make_run(tmp_path, "crashed", "dtf", cut=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_status(gone, "running")
    status = json.loads((gone / "status.json").read_text())
    (gone / "status.json").write_text(json.dumps({**status, "pid": dead.pid}))
    nan = make_run(tmp_path, "nan", "mod")
    _append(nan, {"kind": "train", "step": 21, "loss": math.nan})
    rows = {r.path: r for r in listing(tmp_path)}
    assert rows["exp"].kind == "experiment" and rows["exp"].status == "1 running, 1 finished"
    assert rows["standard-seed0"].status == "finished" and rows["standard-seed0"].depth == 1
    assert rows["standard-seed0"].best == pytest.approx(5.5, abs=0.01)
    assert rows["mod-seed0"].status == "running"
    assert rows["crashed"].status == "failed"
    assert rows["nan"].status == "diverged"
    assert main(["ls", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["path", "kind", "status", "steps", "best", "val", "loss", "age"]
    assert "diverged" in text and "  standard-seed0" in text


def test_ls_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["ls", str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


def test_report_prints_the_closing_table(tmp_path, capsys):
    make_run(tmp_path, "standard-seed0", "standard", final=5.5)
    make_run(tmp_path, "mod-seed0", "mod", final=5.0)
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("variant")))
    assert lines[head].split()[:4] == ["variant", "runs", "val", "loss"]
    assert lines[head + 2].startswith("standard") and lines[head + 3].startswith("mod c=0.125")
    assert "1.000" in lines[head + 2] and "0.600" in lines[head + 3]  # FLOP ratios


# ---- the whole command ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_experiment_output_is_short_plain_and_ends_with_the_table(tmp_path):
    """`dtlab run experiments/quick.yaml` with its output in a pipe (as CI and `| tee` see it): under 60
    lines, no control characters, Ray's and lm-eval's lines in output.log, the closing table at the end."""
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "run", "experiments/quick.yaml",
                           "training.max_steps=30", "training.eval_every=15", "eval.limit=8", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DTLAB_PROGRESS_SECONDS": "5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    assert not any("\x1b" in line or "\r" in line for line in lines)
    assert not any("RayTrainWorker" in line or "TrainController" in line for line in lines)
    table = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("variant"))
    assert [row.split()[0] for row in table[head + 2:head + 6]] == ["standard", "dense", "mod", "dtf"]
    assert table[-1] == f"report: {(out / 'report.html').resolve()}"
    assert sum("finished at step 30/30" in line for line in lines) == 4
    assert sum("downstream" in line for line in lines) == 4
    log = (out / LOG_NAME).read_text()
    assert "RayTrainWorker" in log and "Running loglikelihood requests" in log


def test_train_quiet_then_verbose(tmp_path, capfd):
    """Quiet: progress and the table on the terminal, the loop's own lines in the run's output.log.
    --verbose: the loop's lines on the terminal, no output.log."""
    import yaml

    from tests.trainers.conftest import tiny_spec

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(training={"max_steps": 4})))
    assert main(["train", str(spec), "--out", str(tmp_path / "quiet"), "--no-ray"]) == 0
    out, err = capfd.readouterr()
    assert "step 2/4 | loss" not in out + err and "quiet: finished at step 4/4" in err
    assert out.splitlines()[1].startswith("variant") and "mod c=0.125" in out
    assert "step 2/4 | loss" in (tmp_path / "quiet" / LOG_NAME).read_text()
    assert main(["train", str(spec), "--out", str(tmp_path / "loud"), "--no-ray", "--verbose"]) == 0
    out, err = capfd.readouterr()
    assert "step 2/4 | loss" in out + err and not (tmp_path / "loud" / LOG_NAME).exists()


def test_close_gives_the_output_back_even_when_something_fails(tmp_path):
    err = io.StringIO()
    ui = Console(err=err, out=io.StringIO(), live=False)
    ui.capture(tmp_path)

    def broken():
        raise RuntimeError("boom")

    ui._stop_live = broken  # something on the way out raises
    with pytest.raises(RuntimeError, match="boom"):
        ui.close()
    print("after")
    assert "after" not in (tmp_path / LOG_NAME).read_text() and sys.stdout is not None and ui._saved is None


def test_ls_leaves_set_aside_runs_out(tmp_path):
    make_run(tmp_path, "mod-seed0", "mod")
    make_run(tmp_path, "mod-seed0.old-20261128-101010", "mod")
    old_exp = tmp_path / "exp.old-20261128-101010"
    old_exp.mkdir()
    (old_exp / "experiment.json").write_text("{}")
    make_run(old_exp, "standard-seed0", "standard")
    assert [r.path for r in listing(tmp_path)] == ["mod-seed0"]


def test_closing_table_of_two_sweeps_with_the_same_trial_ids(tmp_path, capsys):
    for sweep in ("a", "b"):
        make_run(tmp_path / sweep / "trials", "t1", "mod", params={"model.mod_capacity": 0.1})
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.count("mod ") >= 2
