"""`dtlab sample` on runs the tests train, and `dtlab bench --decode`."""

import json
import shutil

import pytest

from dtlab.trainers.cli.main import main
from dtlab.trainers.orchestrate.runner import run_training
from dtlab.trainers.spec import spec_from_dict
from dtlab.trainers.tools.decode_bench import run_decode_bench
from dtlab.trainers.tools.sample import generate_text, load_run
from tests.trainers.conftest import tiny_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short MoD run: a best checkpoint and the tokenizer trained for it."""
    run = tmp_path_factory.mktemp("sample") / "run"
    run_training(spec_from_dict(tiny_spec(model={"type": "mod"})), run)
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file() and (run / "tokenizer.json").is_file()
    return run


def test_sample_prints_the_prompt_and_its_continuation(trained, capsys):
    assert main(["sample", str(trained), "--prompt", "def ", "--max-new-tokens", "12", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")
    assert "step 12" in err and "causal routing" in err
    fractions = [float(line.split("processed ")[1].split()[0]) for line in err.splitlines() if "processed" in line]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)  # routed layers 1 and 3
    # the same text as generate() on the loaded checkpoint, greedily
    run = load_run(trained)
    text, _, _ = generate_text(run, "def ", max_new_tokens=12)
    assert out == "def " + text + "\n"
    assert run.model.config.routing_mode == "topk"  # as trained; generate switched to causal and back


def test_sampling_is_seeded(trained, capsys):
    outs = []
    for seed in (1, 1):
        assert main(["sample", str(trained), "--temperature", "1.2", "--top-p", "0.9", "--seed", str(seed),
                     "--max-new-tokens", "16"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
    assert main(["sample", str(trained), "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out != outs[0]  # sampled at temperature 1.2, not greedy


def test_sample_reads_a_hugging_face_tokenizer_named_in_run_json(trained, tmp_path, capsys):
    """Runs on a hub tokenizer keep only its name: a local tokenizer folder stands in for the hub."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_file(str(run / "tokenizer.json")),
                                 eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "tok")
    (run / "tokenizer.json").unlink()
    info = json.loads((run / "run.json").read_text())
    info["data"]["tokenizer"] = str(tmp_path / "tok")
    (run / "run.json").write_text(json.dumps(info))
    assert main(["sample", str(run), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    via_hf = capsys.readouterr().out
    assert main(["sample", str(trained), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    assert via_hf.startswith("def ") and via_hf.split() == capsys.readouterr().out.split()


def test_sample_refuses_bad_input(trained, tmp_path, capsys):
    cases = [
        ([str(tmp_path)], "not a dtlab run directory"),
        ([str(trained), "--prompt", "a", "--prompt-file", "f"], "not allowed with"),
        ([str(trained), "--temperature", "nan"], "--temperature"),
        ([str(trained), "--top-p", "0"], "--top-p"),
        ([str(trained), "--max-new-tokens", "0"], "--max-new-tokens"),
    ]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases.append(([str(trained), "--prompt-file", str(tmp_path / "latin1.txt")], "not UTF-8"))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(trained / "run.json", empty / "run.json")
    cases.append(([str(empty)], "no checkpoint"))
    for args, message in cases:
        try:
            code = main(["sample", *args])
        except SystemExit as stop:  # argparse's own checks
            code = stop.code
        assert code == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


# ---- dtlab bench --decode ---------------------------------------------------------------------
def test_decode_bench_fits_routing_to_capacity_and_compares_with_standard():
    rows = run_decode_bench(preset="debug", batches=(1, 4), prompt=32, new_tokens=32, repeats=1, capacity=0.25)
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in ("standard", "mod", "dtf") for b in (1, 4)]
    for r in rows:
        assert r["bench"] == "decode" and r["decode_step_s"] > 0 and r["prefill_s"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] / r["decode_step_s"])
        if r["variant"] == "standard":
            assert r["decode_speedup_vs_standard"] == 1.0 and r["realised_capacity"] == {}
        else:  # fitted on the decoded text: near the capacity asked for, in every routed layer
            assert set(r["realised_capacity"]) == {"1", "3"}
            assert all(abs(c - 0.25) <= 0.1 for c in r["realised_capacity"].values()), r["realised_capacity"]


def test_decode_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "--decode", "--preset", "debug", "--batch", "2", "--prompt-tokens", "16", "--new-tokens",
                 "8", "--steps", "1", "--variants", "standard", "dtf", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["batch"]) for r in rows] == [("standard", 2), ("dtf", 2)]
    assert "vs standard" in capsys.readouterr().out
    assert main(["bench", "--decode", "--preset", "debug", "--prompt-tokens", "99999", "--new-tokens", "8"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
