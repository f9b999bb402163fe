"""Bad input through the `dtlab` command: exit code 2, one line that names the culprit, no
traceback, and nothing created or changed where the command would have written.

Each case builds its files in its own folder, snapshots the folder (every file with its hash),
runs the command in this process, and compares the snapshot after.
"""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dtlab.trainers.cli.main import main
from tests.trainers.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


def write_spec(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_spec(**sections)))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short finished run (bare, CPU) that the resume cases copy and damage."""
    folder = tmp_path_factory.mktemp("finished")
    spec = write_spec(folder / "tiny.yaml", training={"max_steps": 4, "eval_every": 2})
    assert main(["train", str(spec), "--out", str(folder / "run"), "--no-ray"]) == 0
    assert (folder / "run" / "checkpoints" / "last" / "trainer_state.json").is_file()
    return folder


def copy_run(finished_run: Path, tmp: Path) -> Path:
    shutil.copytree(finished_run / "run", tmp / "run", symlinks=True)
    shutil.copy(finished_run / "tiny.yaml", tmp / "tiny.yaml")
    return tmp / "run"


class Payload:
    """A pickle that would run code when loaded: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train(tmp, *overrides, spec_kw=None, extra=()):
    spec = write_spec(tmp / "tiny.yaml", **(spec_kw or {}))
    return ["train", str(spec), *overrides, "--out", str(tmp / "out"), *extra]


def _text(tmp, name, content):
    path = tmp / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _user_folder(tmp):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "a.txt").write_text("mine")
    return tmp / "notes"


def _train_run_with_report(tmp):
    (tmp / "r").mkdir()
    (tmp / "r" / "spec.yaml").write_text("name: mine\n")
    (tmp / "r" / "report.html").write_text("<p>my own report</p>")
    return tmp / "r"


def _report_dir(tmp):
    from tests.analysis.fixtures import make_run

    make_run(tmp / "exp", "mod-seed0", "mod")
    return tmp / "exp"


CASES = {
    # ---- spec keys and values ----------------------------------------------------------------------
    "unknown-section": (lambda t: _train(t, spec_kw={"trainng": {}}), r"unknown key trainng \(did you mean 'training'"),
    "unknown-key": (lambda t: _train(t, "training.batch_sise=4"), r"training.batch_sise.*did you mean 'batch_size'"),
    "negative-lr": (lambda t: _train(t, "training.optimizer.lr=-1"), r"training.optimizer.lr"),
    "infinite-lr": (lambda t: _train(t, "training.optimizer.lr=.inf"), r"training.optimizer.lr"),
    "nan-lr": (lambda t: _train(t, "training.optimizer.lr=.nan"), r"training.optimizer.lr"),
    "steps-not-a-number": (lambda t: _train(t, "training.max_steps=ten"), r"training.max_steps"),
    "zero-steps": (lambda t: _train(t, "training.max_steps=0"), r"training.max_steps"),
    "negative-seed": (lambda t: _train(t, "seed=-1"), r"seed: Input should be greater than or equal to 0"),
    "betas-out-of-range": (lambda t: _train(t, "training.optimizer.betas=[2,3]"), r"training.optimizer.betas"),
    "unknown-variant": (lambda t: _train(t, "model.type=moe"), r"model.type"),
    "unknown-size": (lambda t: _train(t, "model.size=7B"), r"model.size='7B'"),
    "misspelt-routing-key": (lambda t: _train(t, "model.mod_capacty=0.2"), r"model.mod_capacty.*'mod_capacity'"),
    "capacity-above-one": (lambda t: _train(t, "model.mod_capacity=1.5"), r"mod_capacity=1.5"),
    "nan-loss-weight": (lambda t: _train(t, "model.mod_aux_loss_weight=.nan"), r"mod_aux_loss_weight=nan"),
    "text-loss-weight": (lambda t: _train(t, "model.mod_aux_loss_weight=abc"), r"mod_aux_loss_weight='abc'"),
    "heads-do-not-divide": (lambda t: _train(t, "model.hidden_size=30"), r"does not divide hidden_size=30"),
    "key-of-another-variant": (lambda t: _train(t, "model.dtf_capacity=0.3"), r"model.dtf_capacity.*\['dtf'\]"),
    "tiny-block": (lambda t: _train(t, "data.block_size=2"), r"data.block_size"),
    "val-fraction": (lambda t: _train(t, "data.val_fraction=0.9"), r"data.val_fraction"),
    "sample-by": (lambda t: _train(t, "data.sample_by=word"), r"data.sample_by"),
    "zero-workers": (lambda t: _train(t, "resources.num_workers=0"), r"resources.num_workers"),
    "two-workers-no-ray": (lambda t: _train(t, "resources.num_workers=2", extra=["--no-ray"]),
                           r"num_workers=2 needs Ray"),
    "transfer-without-checkpoint": (lambda t: _train(t, "training.from_scratch=false"), r"needs model.pretrained"),
    "transfer-from-nowhere": (lambda t: _train(t, "training.from_scratch=false", "model.pretrained=./no/such/ckpt",
                                               "data.tokenizer=./no/such/ckpt"), r"pretrained='./no/such/ckpt'"),
    "control-without-routed": (lambda t: _train(t, "variants=[standard,dense_control]"), r"dense_control matches"),
    "eval-every-zero": (lambda t: _train(t, "training.eval_every=0"), r"training.eval_every"),
    "grad-clip-zero": (lambda t: _train(t, "training.grad_clip=0"), r"training.grad_clip"),
    "vocabulary-too-small": (lambda t: _train(t, "model.vocab_size=256"), r"512 tokens but the model's vocab_size"),
    "block-beyond-positions": (lambda t: _train(t, "model.max_position_embeddings=32"), r"max_position_embeddings=32"),
    "batch-beyond-data": (lambda t: _train(t, "training.batch_size=100000"), r"cannot fill one batch"),
    "override-without-value": (lambda t: _train(t, "training.max_steps"), r"expected key.path=value"),
    "override-into-a-value": (lambda t: _train(t, "model.type.x=1"), r"override 'model.type.x=1': type is not a"),
    # ---- spec files ------------------------------------------------------------------------------------
    "missing-spec": (lambda t: ["train", str(t / "none.yaml"), "--out", str(t / "out")], r"no such spec file"),
    "empty-spec": (lambda t: ["train", str(_text(t, "e.yaml", "")), "--out", str(t / "out")], r"spec file is empty"),
    "binary-spec": (lambda t: ["train", str(_text(t, "b.yaml", bytes(range(256)))), "--out", str(t / "out")],
                    r"not a text file"),
    "list-spec": (lambda t: ["train", str(_text(t, "l.yaml", "- 1\n- 2\n")), "--out", str(t / "out")], r"mapping"),
    "broken-yaml": (lambda t: ["train", str(_text(t, "y.yaml", "model: [x")), "--out", str(t / "out")],
                    r"not valid YAML"),
    "spec-is-a-directory": (lambda t: ["train", str(t), "--out", str(t / "out")], r"it is a directory"),
    # ---- data ---------------------------------------------------------------------------------------------
    "no-such-data": (lambda t: _train(t, "data.source=./no/such.txt"), r"no such file or directory"),
    "empty-text-file": (lambda t: _train(t, f"data.source={_text(t, 'c.txt', '')}"), r"c.txt is empty"),
    "not-utf8-text": (lambda t: _train(t, f"data.source={_text(t, 'c.txt', b'ok ' * 50 + bytes([0xff, 0xfe]))}"),
                      r"c.txt is not UTF-8 text"),
    "jsonl-without-field": (lambda t: _train(t, f"data.source={_text(t, 'c.jsonl', json.dumps({'x': 'y'}) + chr(10))}"),
                            r"data.text_field='text'"),
    "no-such-tokenizer": (lambda t: _train(t, "data.tokenizer=./no/such/tokenizer"), r"data.tokenizer"),
    "corpus-too-small": (lambda t: _train(t, f"data.source={_text(t, 'c.txt', 'a few words only')}",
                                          "data.block_size=512", "model.max_position_embeddings=1024"),
                         r"too small for data.block_size=512"),
    # ---- output paths -----------------------------------------------------------------------------------
    "out-is-a-file": (lambda t: [*_train(t)[:-1], str(_text(t, "out", "mine"))], r"is a file"),
    "out-inside-a-file": (lambda t: [*_train(t)[:-1], str(_text(t, "f", "mine") / "sub")], r"is a file"),
    "out-not-empty": (lambda t: [*_train(t)[:-1], str(_user_folder(t))], r"not empty and holds no dtlab run"),
    "resume-and-force": (lambda t: [*_train(t), "--resume", "--force"], r"contradict"),
    "resume-nothing": (lambda t: [*_train(t), "--resume"], r"holds no run to continue"),
    # ---- reports -----------------------------------------------------------------------------------------
    "report-nothing": (lambda t: ["report", str(t / "nope"), "--out", str(t / "r.html")], r"no runs found"),
    "report-out-directory": (lambda t: ["report", str(_report_dir(t)), "--out", str(t)], r"is a directory"),
    "report-out-not-html": (lambda t: ["report", str(_report_dir(t)), "--out", str(t / "r.txt")], r"ending in .html"),
    "report-user-markdown": (lambda t: ["report", str(_report_dir(t)), "--out", str(_text(t, "cmp.md", "x")
                                                                                     .with_suffix(".html"))],
                             r"cmp.md exists and was not written by dtlab"),
    "report-user-html-says-dtlab": (lambda t: ["report", str(_report_dir(t)), "--out",
                                               str(_text(t, "cmp.html", "<p>a dtlab report I wrote</p>"))],
                                    r"cmp.html exists and was not written by dtlab"),
    # ---- sweeps ------------------------------------------------------------------------------------------
    "sweep-empty-range": (lambda t: ["sweep", str(write_spec(t / "s.yaml", variants=["mod", "dtf"], sweep={
        "search_space": {"model.mod_capacity": {"uniform": [0.5, 0.1]}}})), "--out", str(t / "out")],
        r"sweep.search_space.model.mod_capacity: empty range"),
    "sweep-unknown-distribution": (lambda t: ["sweep", str(write_spec(t / "s.yaml", sweep={
        "search_space": {"model.mod_capacity": {"normal": [0, 1]}}})), "--out", str(t / "out")],
        r"expected one of \{choice"),
    "sweep-no-section": (lambda t: ["sweep", str(write_spec(t / "s.yaml")), "--out", str(t / "out")],
                         r"no sweep section"),
    "sweep-dense-control": (lambda t: ["sweep", str(write_spec(t / "s.yaml", variants=["mod", "dense_control"],
                                                                sweep={"search_space": {}})), "--out", str(t / "out")],
                            r"dense_control is a fixed baseline"),
    "sweep-resume-without-out": (lambda t: ["sweep", str(write_spec(t / "s.yaml", sweep={}))] + ["--resume"],
                                 r"--resume needs --out"),
    # ---- bench flags ---------------------------------------------------------------------------------------
    "bench-negative-batch": (lambda t: ["bench", "--batch", "-1"], r"--batch: invalid _positive value|'-1'"),
    "bench-zero-steps": (lambda t: ["bench", "--steps", "0"], r"--steps"),
    "bench-capacity": (lambda t: ["bench", "--capacities", "1.5"], r"--capacities"),
    "bench-unknown-variant": (lambda t: ["bench", "--variants", "moe", "--steps", "1", "--warmup", "0"],
                              r"unknown variants \['moe'\]"),
    "bench-out-exists": (lambda t: ["bench", "--out", str(_text(t, "b.json", "[]"))], r"already exists"),
    "bench-out-directory": (lambda t: ["bench", "--out", str(t)], r"is a directory"),
    # ---- dtlab run ---------------------------------------------------------------------------------------------
    "run-into-a-file": (lambda t: ["run", str(write_spec(t / "s.yaml")), "--out", str(_text(t, "x", "mine"))],
                        r"is a file"),
    "run-into-a-train-run": (lambda t: ["run", str(write_spec(t / "s.yaml")), "--out", str(_train_run_with_report(t))],
                             r"holds something that is not a dtlab experiment"),
    # ---- a name from a spec never leaves its output directory (no --out: the default under runs/) ----------
    "name-climbs-out": (lambda t: ["train", str(write_spec(t / "s.yaml")), "name=../../evil"],
                        r"name: '../../evil' is not a plain name"),
    "name-is-absolute": (lambda t: ["run", str(write_spec(t / "s.yaml")), "name=/tmp/evil"],
                         r"name: '/tmp/evil' is not a plain name"),
    "name-is-hidden": (lambda t: ["sweep", str(write_spec(t / "s.yaml", sweep={})), "name=.x"],
                       r"name: '.x' is not a plain name"),
    # ---- an empty --out is not "the default" -------------------------------------------------------------
    "train-out-empty": (lambda t: [*_train(t)[:-1], ""], r"--out: ''.*expected a path"),
    "report-out-empty": (lambda t: ["report", str(_report_dir(t)), "--out", ""], r"--out: ''.*expected a path"),
    # ---- memory that cannot exist, numbers the code cannot hold ---------------------------------------------
    "vocabulary-beyond-memory": (lambda t: _train(t, "model.vocab_size=1000000000"),
                                 r"parameters need about [\d,.]+ GiB .* GiB available"),
    "width-beyond-memory": (lambda t: _train(t, "model.hidden_size=262144", "model.num_attention_heads=4",
                                             "model.num_key_value_heads=2"), r"parameters need about"),
    "steps-1e30": (lambda t: _train(t, "training.max_steps=1e30"), r"training.max_steps: 1e30 is out of range"),
    "warmup-1e30": (lambda t: _train(t, "training.scheduler.warmup_steps=1e30"),
                    r"training.scheduler.warmup_steps: 1e30 is out of range"),
    "seed-beyond-64-bits": (lambda t: _train(t, "seed=18446744073709551616"), r"seed: .*less than or equal"),
    "steps-not-whole": (lambda t: _train(t, "training.max_steps=2.5"), r"training.max_steps: 2.5 is not a whole"),
    "layers-beyond-range": (lambda t: _train(t, "model.num_hidden_layers=100000000"),
                            r"num_hidden_layers=100,000,000 is out of range"),
    "width-1e30": (lambda t: _train(t, "model.hidden_size=1e30"), r"hidden_size='1e30': expected an integer"),
    # ---- lists that name runs: each entry once, never empty ---------------------------------------------
    "seeds-twice": (lambda t: ["run", str(write_spec(t / "s.yaml")), "seeds=[0,0]", "--out", str(t / "o")],
                    r"seeds: 0 listed more than once"),
    "variants-twice": (lambda t: ["run", str(write_spec(t / "s.yaml")), "variants=[mod,mod]", "--out", str(t / "o")],
                       r"variants: mod listed more than once"),
    "variants-empty": (lambda t: ["run", str(write_spec(t / "s.yaml")), "variants=[]", "--out", str(t / "o")],
                       r"variants: an empty list"),
    "seeds-empty": (lambda t: ["run", str(write_spec(t / "s.yaml")), "seeds=[]", "--out", str(t / "o")],
                    r"seeds: an empty list"),
    "routing-key-of-no-listed-variant": (
        lambda t: ["run", str(write_spec(t / "s.yaml", variants=["mod"], model={"mod_capacity": 0.25})),
                   "variants=[standard]", "--out", str(t / "o")],
        r"model.mod_capacity: .*belongs to \['mod'\], not to the variants here \(\['standard'\]\)"),
    # ---- a directory that holds something else is named for what it holds ---------------------------------
    "sweep-into-a-train-run": (lambda t: ["sweep", str(write_spec(t / "s.yaml", sweep={})), "--out",
                                          str(_train_run_with_report(t))], r"holds a training run, not a sweep"),
    "sweep-resume-a-train-run": (lambda t: ["sweep", str(write_spec(t / "s.yaml", sweep={})), "--out",
                                            str(_train_run_with_report(t)), "--resume"],
                                 r"holds a training run, not a sweep"),
    # ---- spec files are settings: at most 1 MB --------------------------------------------------------------
    "spec-too-large": (lambda t: ["train", str(_text(t, "big.yaml", yaml.safe_dump(tiny_spec()) + "#" * 1_000_001)),
                                  "--out", str(t / "out")], r"big.yaml: 1,000,[\d,]+ bytes; a spec file is at most"),
    # ---- eval: its outputs are checked before any work ------------------------------------------------------
    "eval-tasks-empty": (lambda t: ["eval", str(_report_dir(t) / "mod-seed0"), "--tasks", ""], r"tasks \[''\]"),
    "eval-tasks-comma": (lambda t: ["eval", str(_report_dir(t) / "mod-seed0"), "--tasks", ","], r"tasks \['', ''\]"),
    "eval-out-empty": (lambda t: ["eval", str(_report_dir(t) / "mod-seed0"), "--out", ""], r"expected a path"),
    "bench-out-empty": (lambda t: ["bench", "--out", ""], r"expected a path"),
}
if NO_CUDA:
    CASES["cuda-without-gpu"] = (lambda t: _train(t, "resources.device=cuda"), r"device='cuda'.*no CUDA device")
    CASES["fp16-on-cpu"] = (lambda t: _train(t, "resources.precision=fp16", "resources.device=cpu"),
                            r"precision='fp16' needs a CUDA device")
    CASES["run-fp16-on-cpu"] = (lambda t: ["run", str(write_spec(t / "s.yaml", variants=["standard", "mod"])),
                                           "resources.precision=fp16", "resources.device=cpu", "--out",
                                           str(t / "out")], r"precision='fp16' needs a CUDA device")
    CASES["sweep-cuda-without-gpu"] = (lambda t: ["sweep", str(write_spec(t / "s.yaml", variants=["mod", "dtf"],
                                                                           sweep={"search_space": {}})),
                                                  "resources.device=cuda", "--out", str(t / "out")],
                                       r"device='cuda'|asks for 1 GPU")


def _check(tmp: Path, argv: list[str], match: str, capsys) -> str:
    before = snapshot(tmp)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert snapshot(tmp) == before, "the command created or changed files"
    return lines[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land in the snapshot, not in the repository
    make, match = CASES[name]
    argv = make(tmp_path)
    _check(tmp_path, argv, match, capsys)


def test_an_out_that_is_not_writable(tmp_path, capsys, monkeypatch):
    """(The tests run as root, who may write anywhere: the permission check is made to say no.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    _check(tmp_path, [*_train(tmp_path)[:-1], str(locked / "run")], r"locked is not writable", capsys)


def test_there_are_at_least_60_cases():
    assert len(CASES) + len(RESUME_CASES) >= 60


# ---- resume states, on copies of a finished run ---------------------------------------------------------------
def _changed_type(run: Path) -> list[str]:
    return ["model.type=dtf"]


def _truncated_weights(run: Path) -> list[str]:
    f = run / "checkpoints" / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return []


def _no_checkpoint(run: Path) -> list[str]:
    (run / "checkpoints" / "last").unlink()
    return []


def _spec_not_a_mapping(run: Path) -> list[str]:
    (run / "spec.yaml").write_text("- just\n- a list\n")
    return []


def _run_json_not_a_mapping(run: Path) -> list[str]:
    (run / "run.json").write_text("[1, 2]")
    return []


RESUME_CASES = {
    "run-json-not-a-mapping": (_run_json_not_a_mapping, r"run.json is not a mapping; the run cannot continue"),
    "changed-model-type": (_changed_type, r"started with another model or data \(model.type: 'mod' -> 'dtf'"),
    "truncated-weights": (_truncated_weights, r"model.safetensors is not readable"),
    "missing-checkpoint": (_no_checkpoint, r"last does not exist.*records would be repeated"),
    "run-spec-not-a-mapping": (_spec_not_a_mapping, r"spec.yaml is not a mapping; the run cannot continue"),
}


@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_bad_resume_is_refused_before_anything_changes(name, finished_run, tmp_path, capsys):
    damage, match = RESUME_CASES[name]
    run = copy_run(finished_run, tmp_path)
    overrides = damage(run)
    _check(tmp_path, ["train", str(tmp_path / "tiny.yaml"), *overrides, "--out", str(run), "--resume", "--no-ray"],
           match, capsys)


def test_a_checkpoint_that_would_run_code_is_refused(finished_run, tmp_path, capsys):
    """An older-format checkpoint (`trainer_state.pt`) is read with weights_only=True: a crafted one is
    refused, and its code never runs."""
    run = copy_run(finished_run, tmp_path)
    last = (run / "checkpoints" / "last").resolve()
    (last / "trainer_state.json").unlink()
    (last / "optimizer.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(last / "trainer_state.pt", "wb") as f:
        pickle.dump({"optimizer": Payload(marker)}, f)
    line = _check(tmp_path, ["train", str(tmp_path / "tiny.yaml"), "--out", str(run), "--resume", "--no-ray"],
                  r"trainer_state.pt is not a plain checkpoint", capsys)
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert "refusing to load it" in line


# ---- outputs of eval, bench and sample, on a finished run ---------------------------------------------------
def test_eval_never_replaces_a_users_file(finished_run, tmp_path, capsys):
    """`dtlab eval --out DIR` writes DIR/<parent>-<run>-lm_eval_results.json: one of that name already
    there is the user's, refused before any work (lm-eval never starts), kept byte for byte."""
    run = copy_run(finished_run, tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    mine = out / f"{tmp_path.name}-run-lm_eval_results.json"
    mine.write_text("my results")
    line = _check(tmp_path, ["eval", str(run), "--tasks", "dtlab_next_line", "--limit", "2", "--out", str(out)],
                  r"lm_eval_results.json exists; --force replaces it", capsys)
    assert mine.read_text() == "my results" and mine.name in line


def test_eval_refuses_an_out_that_is_a_file_before_any_work(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    _check(tmp_path, ["eval", str(run), "--tasks", "dtlab_next_line", "--out", str(_text(tmp_path, "res", "mine"))],
           r"--out .*res: is a file", capsys)


def test_eval_refuses_two_runs_that_would_write_one_file(finished_run, tmp_path, capsys):
    for where in ("x", "y"):  # x/exp/run and y/exp/run: both would be exp-run-lm_eval_results.json
        (tmp_path / where / "exp").mkdir(parents=True)
        shutil.copytree(finished_run / "run", tmp_path / where / "exp" / "run", symlinks=True)
    _check(tmp_path, ["eval", str(tmp_path / "x" / "exp" / "run"), str(tmp_path / "y" / "exp" / "run"), "--tasks",
                      "dtlab_next_line", "--out", str(tmp_path / "res")],
           r"two runs would write exp-run-lm_eval_results.json", capsys)


def test_sample_refuses_more_tokens_than_the_model_has_positions(finished_run, tmp_path, capsys):
    """Prompt length plus new tokens is known before generating: refused at once, with the numbers."""
    run = copy_run(finished_run, tmp_path)
    line = _check(tmp_path, ["sample", str(run), "--prompt", "The", "--max-new-tokens", "2000"],
                  r"plus --max-new-tokens 2000 exceeds the model's 1024 positions: ask for at most \d+", capsys)
    allowed = int(line.rsplit("at most ", 1)[1].split()[0])
    assert main(["sample", str(run), "--prompt", "The", "--max-new-tokens", str(allowed)]) == 0  # the limit works


def test_bench_out_in_a_read_only_folder_is_refused_before_the_bench(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    import dtlab.trainers.tools.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda **kw: pytest.fail("the bench ran before --out was checked"))
    _check(tmp_path, ["bench", "--out", str(locked / "b.json")], r"locked is not writable", capsys)


def test_eval_outside_a_git_checkout_says_only_its_results(finished_run, tmp_path):
    """lm-eval asks git for a commit hash and draws progress bars: in output.log, not on the terminal."""
    import subprocess
    import sys

    run = copy_run(finished_run, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "eval", str(run), "--tasks", "dtlab_next_line",
                           "--limit", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
    assert "dtlab_next_line acc" in proc.stdout, proc.stdout
    assert (run / "output.log").is_file()


# ---- dtlab ls lists every run directory it finds, with what is wrong with it ----------------------------------
def test_ls_lists_a_run_that_failed_before_its_first_record(tmp_path, capsys):
    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "failed", "pid": 1, "host": "elsewhere", "time": 0}))
    assert main(["ls", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "early" in out and "failed" in out, out


def test_ls_says_when_records_are_unreadable(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    good = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["not json"] * 5 + good[:1]) + "\n")
    assert main(["ls", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run "))
    assert "5 of 6 records unreadable" in row, row
