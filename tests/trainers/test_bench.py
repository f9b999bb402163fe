"""`dtlab bench`: rows, ratios and refusals (timings themselves are not asserted)."""

import json

import pytest

from dtlab.trainers.cli.main import main
from dtlab.trainers.run.device import detect_precision
from dtlab.trainers.tools.bench import estimate_memory_gib, format_table, run_bench

KEYS = {"variant", "capacity", "step_s", "tokens_per_s", "flops_per_token", "flop_ratio_vs_dense",
        "step_ratio_vs_dense", "mfu", "peak_mem_gib", "forward_s"}


def test_bench_rows_cover_every_variant_and_capacity():
    rows = run_bench(device="cpu", batch=2, seq=32, steps=1, warmup=1, capacities=(0.125, 0.5))
    names = [(r["variant"], r["capacity"]) for r in rows]
    assert names == [("hf-qwen2", None), ("standard", None), ("mod", 0.125), ("mod", 0.5), ("dtf", 0.125),
                     ("dtf", 0.5)]
    for r in rows:
        assert KEYS <= set(r)
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 / r["step_s"])
    std = next(r for r in rows if r["variant"] == "standard")
    assert std["step_ratio_vs_dense"] == 1.0 and std["flop_ratio_vs_dense"] == 1.0
    mod = {r["capacity"]: r for r in rows if r["variant"] == "mod"}
    assert mod[0.125]["flop_ratio_vs_dense"] < mod[0.5]["flop_ratio_vs_dense"] < 1.0
    assert "hf-qwen2" in format_table(rows)


def test_bench_cli_writes_json_and_keeps_existing_files(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "1",
            "--variants", "standard", "mod", "--capacities", "0.25", "--out", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["standard", "mod"]
    out.write_text("mine")
    assert main(args) == 2
    assert out.read_text() == "mine"
    assert "already exists" in capsys.readouterr().err


def test_bench_refuses_a_preset_that_does_not_fit(capsys):
    assert main(["bench", "--device", "cpu", "--preset", "3B", "--batch", "64", "--seq", "8192"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB" in err and "3B" in err


def test_memory_estimate_grows_with_the_shape():
    from dtlab import models

    p = detect_precision("cpu")
    small = estimate_memory_gib(models.make_config("standard", "debug"), 8, 256, p)
    big = estimate_memory_gib(models.make_config("standard", "0.5B"), 8, 2048, p)
    assert 0 < small < 1 < big


def test_bench_bad_arguments():
    with pytest.raises(ValueError, match="unknown variants"):
        run_bench(device="cpu", variants=("moe",))
    with pytest.raises(ValueError, match="exceeds"):
        run_bench(device="cpu", seq=100_000)
    with pytest.raises(ValueError, match="capacity 1.5"):
        run_bench(device="cpu", capacities=(1.5,))
