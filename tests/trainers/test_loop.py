"""The training loop without Ray: records, checkpoints, exact resume, refusals."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dtlab import models
from dtlab.trainers.cli.main import main
from dtlab.trainers.orchestrate.runner import run_training
from dtlab.trainers.run.loop import Hooks, lr_lambda, param_groups
from dtlab.trainers.spec import SpecError, spec_from_dict
from tests.records import records
from tests.trainers.conftest import tiny_spec


@pytest.mark.parametrize("variant", ["standard", "mod", "dtf"])
def test_run_writes_records_checkpoints_and_facts(tmp_path, variant):
    spec = spec_from_dict(tiny_spec(model={"type": variant}))
    result = run_training(spec, tmp_path / "run")
    run = tmp_path / "run"
    train, evals = records(run, "train"), records(run, "eval")
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert result["val_loss"] == evals[-1]["val_loss"]
    for r in train:
        assert {"loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(r)
    headline = "topk" if variant == "standard" else "causal"  # what a model can do token by token
    for r in evals:
        assert r["routing_mode"] == headline and r["val_loss"] == r[f"val_loss_{headline}"]
        assert r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    if variant == "standard":
        assert "val_loss_causal" not in evals[-1] and train[-1]["routing"] == {}
    else:
        assert "val_loss_causal" in evals[-1]
        layer = train[-1]["routing"]["1"]
        base = {"selected_frac", "gate_mean", "gate_std", "router_logit_mean", "router_logit_std", "causal_agreement"}
        assert base <= set(layer)
        assert layer["selected_frac"] == pytest.approx(0.125)
        assert len(evals[-1]["routing"]["1"]["selected_by_pos"]) == 64
        assert "selected_frac" in evals[-1]["routing_causal"]["1"]
    if variant == "mod":
        assert "mod_aux" in train[-1]
    if variant == "dtf":
        # the step-0 causal evaluation routes with a threshold from a training batch (the loop primes it
        # before that evaluation), not the initial placeholder 0.5 that selects nearly every token
        assert evals[0]["routing_causal"]["1"]["selected_frac"] < 0.5, evals[0]["routing_causal"]["1"]
        assert "dtf_prior" in train[-1]
        assert {"d_st", "d_ch", "s_ce", "s_cu", "temp_ce", "temp_cu", "o_ce", "m_cu"} <= set(train[-1]["routing"]["1"])
        assert "prior_loss" in train[-1]["routing"]["0"]
    for name in ("last", "best"):
        assert (run / "checkpoints" / name / "model.safetensors").is_file()
    samples = json.loads((run / "samples.json").read_text())  # greedy, from the best checkpoint
    assert samples["step"] == 12 and [s["prompt"] for s in samples["samples"]] == ["The", "def ", "import "]
    facts = json.loads((run / "run.json").read_text())
    assert facts["seed"] == 0 and "commit" in facts and facts["training"]["precision"] == "fp32"
    assert facts["training"]["device"] == "cpu" and facts["data"]["vocab_size"] == 512
    assert (run / "spec.yaml").read_text().startswith("name: t")
    # the report reads which routing modes the evaluations used from the records as the loop writes them
    from dtlab.analysis.loaders import load

    assert load([run]).runs["routing_modes"][0] == ("topk" if variant == "standard" else "causal,topk")
    # the checkpoint reloads through the Auto classes
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "last")
    assert type(again) is models.VARIANTS[variant] and again.config.variant == variant


class StopAt(Hooks):
    def __init__(self, step):
        self.step = step

    def on_step(self, step):
        if step == self.step:
            raise KeyboardInterrupt



@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, variant):
    spec = spec_from_dict(tiny_spec(model={"type": variant}))
    full = run_training(spec, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_training(spec, tmp_path / "cut", hooks=StopAt(7))
    assert max(r["step"] for r in records(tmp_path / "cut", "eval")) == 4
    resumed = run_training(spec, tmp_path / "cut", resume=True)
    assert resumed["val_loss"] == full["val_loss"]

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_rss_gib", "peak_mem_gib")} for r in rs]

    assert strip(records(tmp_path / "cut", "eval")) == strip(records(tmp_path / "full", "eval"))
    assert strip(records(tmp_path / "cut", "train")) == strip(records(tmp_path / "full", "train"))


def test_existing_run_is_refused_and_force_sets_it_aside(tmp_path, capsys):
    spec = spec_from_dict(tiny_spec(training={"max_steps": 2, "eval_every": 2}))
    run = tmp_path / "run"
    run_training(spec, run)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SpecError, match="already holds a run: pass --resume .* or --force"):
        run_training(spec, run)
    assert (run / "metrics.jsonl").read_text() == before
    run_training(spec, run, force=True)
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(backups) == 1 and (backups[0] / "metrics.jsonl").read_text() == before
    with pytest.raises(SpecError, match="holds no run to continue"):
        run_training(spec, tmp_path / "fresh", resume=True)


def test_model_that_does_not_fit_the_data_is_refused_before_any_work(tmp_path):
    spec = spec_from_dict(tiny_spec(model={"vocab_size": 256}))
    with pytest.raises(SpecError, match="has 512 tokens but the model's vocab_size is 256"):
        run_training(spec, tmp_path / "a")
    spec = spec_from_dict(tiny_spec(model={"max_position_embeddings": 32}))
    with pytest.raises(SpecError, match="data.block_size=64 exceeds the model's max_position_embeddings=32"):
        run_training(spec, tmp_path / "b")
    spec = spec_from_dict(tiny_spec(training={"batch_size": 100_000}))
    with pytest.raises(SpecError, match="cannot fill one batch"):
        run_training(spec, tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_transfer_from_a_local_qwen2_checkpoint(tmp_path):
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from dtlab.trainers.run.data import EOT, prepare_data
    from dtlab.trainers.spec import DataSpec

    prep = prepare_data(DataSpec(vocab_size=512, block_size=64, max_bytes=300_000))
    PreTrainedTokenizerFast(tokenizer_file=prep.meta["tokenizer_file"], eos_token=EOT).save_pretrained(tmp_path / "ck")
    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True, attn_implementation="sdpa")).eval()
    qwen2.save_pretrained(tmp_path / "ck")
    # at capacity 1 with the gate forced to 1 a DTF computes what its pretrained Qwen2 computes (contract
    # item 4), so its step-0 top-k validation loss shows whether the weights arrived
    spec = spec_from_dict(tiny_spec(model={"type": "dtf", "pretrained": str(tmp_path / "ck"), "dtf_capacity": 1.0,
                                           "force_unit_gate": True},
                                    training={"from_scratch": False, "max_steps": 4},
                                    data={"tokenizer": str(tmp_path / "ck")}))
    result = run_training(spec, tmp_path / "run")
    assert result["step"] == 4
    first = records(tmp_path / "run", "eval")[0]
    val = torch.from_numpy(np.asarray(prepare_data(spec.data).val[:2 * 4], dtype=np.int64))  # eval_batches x batch
    with torch.no_grad():
        want = qwen2(val, labels=val).loss.item()
    assert first["step"] == 0 and first["val_loss_topk"] == pytest.approx(want, abs=1e-5), (first, want)
    no_tok = spec_from_dict(tiny_spec(model={"type": "dtf", "pretrained": str(tmp_path / "ck")},
                                      training={"from_scratch": False}))
    with pytest.raises(SpecError, match="transfer from a pretrained checkpoint needs its tokenizer"):
        run_training(no_tok, tmp_path / "run2")


def test_weight_decay_spares_norms_biases_embeddings_and_routers():
    model = models.build_model("dtf")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.layers.0.prior.gate_proj.weight" in decayed
    for n in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.1.router.beta_ce", "model.layers.1.router.m_cu",
              "model.norm.weight"):
        assert n in spared, n
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_cosine_schedule_with_warmup():
    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_cli_exit_code_2_on_bad_input(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "no such spec file" in capsys.readouterr().err
    assert main(["train", "experiments/quick.yaml", "training.max_stepz=3", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_run_training_sh_keeps_the_original_entry_point(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bad = subprocess.run(["bash", "run_training.sh", "fast", "mod"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "MODE 'fast'" in bad.stderr
    bad = subprocess.run(["bash", "run_training.sh", "quick", "moe"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "MODEL_TYPE 'moe'" in bad.stderr
    ok = subprocess.run(["bash", "run_training.sh", "quick", "mod", "training.max_steps=2", "training.eval_every=2",
                         "data.vocab_size=512", "data.block_size=64", "data.max_bytes=300000",
                         "--no-ray", "--out", str(tmp_path / "q")], cwd=root, capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "model.type=mod" not in (tmp_path / "q" / "spec.yaml").read_text()
    assert "type: mod" in (tmp_path / "q" / "spec.yaml").read_text()
    assert "max_steps: 2" in (tmp_path / "q" / "spec.yaml").read_text()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 2 rows make the same update as 1 batch of 4 (same rows)."""
    from safetensors.torch import load_file

    weights = []
    for batch, accum in ((4, 1), (2, 2)):
        spec = spec_from_dict(tiny_spec(model={"type": "standard"},
                                        training={"max_steps": 2, "batch_size": batch, "grad_accum_steps": accum,
                                                  "eval_every": 2}))
        run_training(spec, tmp_path / f"b{batch}")
        weights.append(load_file(tmp_path / f"b{batch}" / "checkpoints" / "last" / "model.safetensors"))
    for key, ref in weights[0].items():
        assert torch.allclose(weights[1][key], ref, atol=1e-5), key
    # AdamW hides a gradient's scale; the logged loss and gradient norm do not
    big, small = records(tmp_path / "b4", "train"), records(tmp_path / "b2", "train")
    for a, b in zip(big, small, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_dtlab_run_trains_every_variant_then_reports(tmp_path, caplog):
    from dtlab.trainers.orchestrate.experiment import run_experiment

    spec = spec_from_dict(tiny_spec(variants=["standard", "mod", "dtf"], training={"max_steps": 4, "eval_every": 2}))
    result = run_experiment(spec, tmp_path / "exp", use_ray=False)
    exp = tmp_path / "exp"
    assert sorted(p.name for p in exp.glob("*-seed0")) == ["dtf-seed0", "mod-seed0", "standard-seed0"]
    assert Path(result["report"]).is_file() and result["charts"] >= 6 and result["problems"] == []
    for run in ("standard-seed0", "mod-seed0", "dtf-seed0"):  # greedy samples of each best checkpoint
        samples = json.loads((exp / run / "samples.json").read_text())
        assert samples["routing_mode"] == "causal" and samples["step"] == 4 and len(samples["samples"]) == 3
    assert (exp / "report_tables" / "samples.csv").is_file()
    written = (exp / "mod-seed0" / "samples.json").stat().st_mtime_ns
    before = (exp / "mod-seed0" / "metrics.jsonl").read_text()
    with pytest.raises(SpecError, match="already holds an experiment"):
        run_experiment(spec, exp, use_ray=False)
    with caplog.at_level(logging.INFO, logger="dtlab"):  # what it says goes to the `dtlab` log
        run_experiment(spec, exp, resume=True, use_ray=False)
    assert (exp / "mod-seed0" / "metrics.jsonl").read_text() == before
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dtlab.")]
    assert sum("finished earlier, kept" in line for line in lines) == 3, lines
    assert (exp / "mod-seed0" / "samples.json").stat().st_mtime_ns == written  # kept, not regenerated


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_compiled_training_matches_eager(tmp_path, monkeypatch, variant):
    """training.compile=on compiles the model in place with fullgraph=True (a graph break would raise):
    training, top-k and causal evaluation, and the checkpoints are those of the eager run. The eager
    backend keeps the test fast; the GPU check compiles with inductor."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("DTLAB_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    runs, graphs = {}, {}
    for mode in ("off", "on"):
        spec = spec_from_dict(tiny_spec(model={"type": variant}, training={"max_steps": 6, "compile": mode}))
        before = counters["stats"]["unique_graphs"]
        run_training(spec, tmp_path / mode)
        graphs[mode] = counters["stats"]["unique_graphs"] - before
        runs[mode] = records(tmp_path / mode, "eval")
        assert json.loads((tmp_path / mode / "run.json").read_text())["training"]["compiled"] is (mode == "on")
    # dynamo traced the model only when asked: training, then evaluation in top-k and in causal routing
    assert graphs["off"] == 0 and graphs["on"] >= 3, graphs
    for eager, compiled in zip(runs["off"], runs["on"], strict=True):
        for key in ("val_loss_topk", "val_loss_causal"):
            assert compiled[key] == pytest.approx(eager[key], abs=1e-5), key
    loaded = models.build_model(variant, pretrained=tmp_path / "on" / "checkpoints" / "last")
    assert not any("_orig_mod" in k for k in loaded.state_dict())


def test_compile_setting_reads_yaml_on_and_off():
    assert spec_from_dict(tiny_spec(training={"compile": True})).training.compile == "on"
    assert spec_from_dict(tiny_spec(training={"compile": False})).training.compile == "off"
    assert spec_from_dict(tiny_spec()).training.compile == "auto"
    with pytest.raises(SpecError, match="compile"):
        spec_from_dict(tiny_spec(training={"compile": "fast"}))
