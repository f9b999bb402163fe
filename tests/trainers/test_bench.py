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


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages a training forward of `model` saves for backward."""
    import torch

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return sum(storages.values())


def test_memory_estimate_counts_weights_gradients_and_adamw_state():
    """Where parameters dominate (0.5B, batch 1 x 16 tokens), the estimate that decides the bench's refusal
    is the analytic count, within 20%: fp32 weights, gradients and AdamW's two moments, 16 bytes for each
    parameter of the model transformers builds for the bench (counted on the meta device)."""
    import torch

    from dtlab import models
    from dtlab.trainers.tools.bench import hf_baseline

    config = models.make_config("standard", "0.5B")
    with torch.device("meta"):
        n = sum(p.numel() for p in hf_baseline(config).parameters())
    analytic = n * (4 + 4 + 8) / 2**30
    estimate = estimate_memory_gib(config, 1, 16, detect_precision("cpu"))
    assert abs(estimate / analytic - 1) < 0.2, (estimate, analytic)


@pytest.mark.parametrize("preset,batch,seq", [("debug", 8, 256), ("small", 2, 256)])
def test_memory_estimate_counts_activations(preset, batch, seq):
    """Where activations count too, the estimate is within 20% of: the 16 bytes per parameter, what the
    bench's largest model (transformers' Qwen2, full logits) saves for backward, measured, and its fp32
    logits' gradient."""
    import torch

    from dtlab import models
    from dtlab.trainers.tools.bench import hf_baseline

    config = models.make_config("standard", preset)
    torch.manual_seed(0)
    model = hf_baseline(config).train()
    x = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters()) * 16
    analytic = (params + _saved_bytes(model, x) + batch * seq * config.vocab_size * 4) / 2**30
    estimate = estimate_memory_gib(config, batch, seq, detect_precision("cpu"))
    assert abs(estimate / analytic - 1) < 0.2, (estimate, analytic)


def test_bench_bad_arguments():
    with pytest.raises(ValueError, match="unknown variants"):
        run_bench(device="cpu", variants=("moe",))
    with pytest.raises(ValueError, match="exceeds"):
        run_bench(device="cpu", seq=100_000)
    with pytest.raises(ValueError, match="capacity 1.5"):
        run_bench(device="cpu", capacities=(1.5,))


def test_decode_bench_reports_the_physical_cache_beside_the_logical():
    """`dtlab bench --decode` rows at batch 8 report what the KV cache holds (tokens, `cache.stored()`) and
    what it takes (buffer slots and bytes), per variant: Standard's slots are its tokens, every column of
    every layer; a routed variant's are its tokens plus less than one allocation step per row and layer."""
    from dtlab import models
    from dtlab.models.layers import KVStore
    from dtlab.trainers.tools.decode_bench import format_decode_table, run_decode_bench

    rows = run_decode_bench(preset="debug", batches=(8,), prompt=32, new_tokens=16, repeats=1, capacity=0.125)
    by = {r["variant"]: r for r in rows}
    L = models.make_config("standard", "debug").num_hidden_layers
    std = by["standard"]
    assert std["cache_tokens"] == std["cache_slots"] == L * 8 * (32 + 16)
    k_and_v = 2 * 8 * L * (32 + 16) * 2 * 16 * 4  # 2 KV heads of 16 dims, fp32
    assert k_and_v <= std["cache_bytes"] < 1.1 * k_and_v and std["cache_bytes_vs_standard"] == 1.0
    for name in ("mod", "dtf"):
        r = by[name]
        assert r["cache_tokens"] <= r["cache_slots"] < r["cache_tokens"] + (L // 2) * 8 * KVStore.GROW, r
        assert r["cache_tokens"] < std["cache_tokens"] and r["cache_bytes_vs_standard"] < 1.0, r
        assert r["cache_bytes_vs_standard"] == pytest.approx(r["cache_bytes"] / std["cache_bytes"])
    assert "KV slots" in format_decode_table(rows) and "KV MiB" in format_decode_table(rows)
