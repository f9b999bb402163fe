"""`dtlab isoflop`: each run's steps put its training FLOPs on the budget, budgets that cannot be met
are refused before any work, the shipped studies are planned, and the smoke study runs, resumes
after an interrupt and reports through the command line."""

import json
from pathlib import Path

import pytest
import yaml

from dtlab.analysis.rundir import reached_last_step
from dtlab.trainers.orchestrate.isoflop import INDEX, MIN_STEPS, plan_isoflop, run_isoflop
from dtlab.trainers.spec import SpecError, load_spec, spec_from_dict
from tests.trainers.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "isoflop_smoke.yaml"
SIZES = [{"name": f"d{d}x{n}", "overrides": {"hidden_size": d, "num_hidden_layers": n, "num_attention_heads": h,
                                             "num_key_value_heads": 1, "intermediate_size": 3 * d}}
         for d, n, h in ((32, 2, 2), (48, 3, 3), (64, 4, 4))]


def iso_spec(budgets, **sections):
    return spec_from_dict(tiny_spec(variants=["standard", "mod", "dtf"], seeds=[0, 1],
                                    isoflop={"budgets": budgets, "sizes": SIZES}, **sections))


def loop_flops_per_step(spec, vocab_size, seq_len):
    """A step's training FLOPs as the training loop counts them (`loop.run_info`): the model it builds."""
    from dtlab.models.flops import flops_per_token
    from dtlab.trainers.run.loop import build_for_training

    config = build_for_training(spec, vocab_size).config
    training = spec.training
    return (flops_per_token(config, seq_len) *
            training.batch_size * training.grad_accum_steps * spec.resources.num_workers * seq_len)


@pytest.mark.parametrize("budgets,accum", [([4e10, 8e10, 1.234567e11], 1), ([2.5e11], 3)])
def test_each_runs_steps_meet_its_budget(budgets, accum):
    spec = iso_spec(budgets, training={"grad_accum_steps": accum, "scheduler": {"warmup_steps": 40}})
    vocab, seq_len = 512, 64
    runs = plan_isoflop(spec, vocab, seq_len)
    assert len(runs) == len(budgets) * 3 * 3 * 2  # budgets x sizes x variants x seeds
    assert {(r.budget, r.size, r.variant, r.seed) for r in runs} == {
        (b, s["name"], v, seed) for b in budgets for s in SIZES for v in ("standard", "mod", "dtf") for seed in (0, 1)}
    for run in runs:
        per_step = loop_flops_per_step(run.spec, vocab, seq_len)
        planned = run.spec.training.max_steps * per_step
        assert run.planned_flops == pytest.approx(planned, rel=1e-12)
        assert abs(planned - run.budget) <= per_step / 2, run.name  # within one step (the nearest whole step)
        assert abs(planned - run.budget) <= 0.01 * run.budget, run.name
        # the schedule spans exactly this run; the warm-up is a tenth of it at most
        assert run.spec.training.max_steps == run.steps >= MIN_STEPS
        assert run.spec.training.scheduler.warmup_steps == min(40, run.steps // 10)
        size = next(s for s in SIZES if s["name"] == run.size)
        assert run.spec.model.type == run.variant and run.spec.seed == run.seed
        assert {k: run.spec.model.overrides()[k] for k in size["overrides"]} == size["overrides"]
    # the precondition of "within one step": the sizes and variants differ in cost per step
    assert len({round(r.flops_per_token) for r in runs}) == 9


def test_the_loop_counts_what_was_planned(tmp_path):
    """A planned run trained: its run.json's FLOPs per token x tokens per step x steps are the plan's."""
    from dtlab.trainers.orchestrate.runner import run_training
    from dtlab.trainers.run.data import prepare_data

    spec = iso_spec([4e10], training={"eval_every": 1000, "eval_batches": 1, "log_every": 100})
    data = prepare_data(spec.data)
    run = min(plan_isoflop(spec, data.vocab_size, int(data.train.shape[1])), key=lambda r: r.steps)
    run_training(run.spec, tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "run.json").read_text())["training"]
    assert facts["total_steps"] == run.steps
    assert facts["flops_per_token"] * facts["tokens_per_step"] * facts["total_steps"] == run.planned_flops


def test_budgets_that_cannot_be_met_are_refused_before_any_work(tmp_path):
    spec = iso_spec([4e10, 1e9])
    with pytest.raises(SpecError, match=rf"isoflop.budgets: 1e\+09 FLOPs is fewer than {MIN_STEPS} steps for 9 of the "
                                        r"9 sizes x variants \(standard at d32x2: 14.4 steps of 6.93e\+07 FLOPs, .*"
                                        r"the smallest budget every size and variant meets is 3.65e\+10 FLOPs"):
        plan_isoflop(spec, 512, 64)
    assert plan_isoflop(iso_spec([3.65e10]), 512, 64)  # what it says is enough is
    with pytest.raises(SpecError, match="fewer than 100 steps"):
        run_isoflop(spec, tmp_path / "study", use_ray=False)
    assert not (tmp_path / "study").exists()
    from dtlab.trainers.cli.main import main

    write = tmp_path / "s.yaml"
    write.write_text(yaml.safe_dump(tiny_spec(variants=["standard"], isoflop={"budgets": [1e9], "sizes": SIZES})))
    for command in ("isoflop", "run"):  # `dtlab run` of a spec with an isoflop: section is the study
        assert main([command, str(write), "--out", str(tmp_path / command)]) == 2
        assert not (tmp_path / command).exists()


@pytest.mark.parametrize("isoflop,extra,match", [
    ({"budgets": [1e11], "sizes": SIZES[:2]}, {}, r"isoflop.sizes: List should have at least 3 items"),
    ({"budgets": [], "sizes": SIZES}, {}, r"isoflop.budgets: List should have at least 1 item"),
    ({"budgets": [-1.0], "sizes": SIZES}, {}, r"isoflop.budgets.0: Input should be greater than 0"),
    ({"budgets": [1e11, 1e11], "sizes": SIZES}, {}, r"1e\+11 listed more than once"),
    ({"budgets": [1e11], "sizes": [SIZES[0], *SIZES[:2]]}, {}, r"d32x2 listed more than once"),
    ({"budgets": [1e11], "sizes": [*SIZES, {"name": "x", "overrides": {"hidden_sise": 8}}]}, {},
     r"isoflop.sizes.3.overrides.hidden_sise"),
    ({"budgets": [1e11], "sizes": [*SIZES, {"name": "x", "overrides": {"hidden_size": 30}}]}, {},
     r"isoflop.sizes: x: .*hidden_size"),
    ({"budgets": [1e11], "sizes": [*SIZES, "tiny"]}, {}, r"isoflop.sizes: tiny: size='tiny'"),
    ({"budgets": [1e11], "sizes": SIZES}, {"variants": ["mod", "dense_control"]}, r"dense_control"),
    ({"budgets": [1e11], "sizes": SIZES}, {"model": {"hidden_size": 32}}, r"model.hidden_size is set for every run"),
    ({"budgets": [1e11], "sizes": SIZES}, {"sweep": {"search_space": {"training.optimizer.lr": {"choice": [1e-3]}}}},
     r"isoflop: and sweep:"),
])
def test_bad_isoflop_sections_name_the_key(isoflop, extra, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(tiny_spec(isoflop=isoflop, **extra), "s.yaml")


def test_dtlab_run_api_refuses_an_isoflop_spec(tmp_path):
    from dtlab.trainers.orchestrate.experiment import run_experiment

    with pytest.raises(SpecError, match="dtlab isoflop"):
        run_experiment(iso_spec([4e10]), tmp_path / "exp", use_ray=False)
    assert not (tmp_path / "exp").exists()


# ---- the shipped studies -------------------------------------------------------------------------------
STUDIES = sorted((ROOT / "experiments").glob("isoflop_*.yaml"))


def _vocab(spec):
    """The vocabulary the data will have: the trained tokenizer's size, or Qwen2.5's tokenizer's."""
    return spec.data.vocab_size if spec.data.tokenizer is None else 151_665


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_isoflop_studies_are_planned(path):
    spec = load_spec(path)
    runs = plan_isoflop(spec, _vocab(spec), spec.data.block_size, str(path))
    iso = spec.isoflop
    assert len(runs) == len(iso.budgets) * len(iso.sizes) * len(spec.variant_list()) * len(spec.seed_list())
    assert len(iso.sizes) >= 3 and all(abs(r.planned_flops - r.budget) <= 0.01 * r.budget for r in runs)
    assert {"isoflop_smoke.yaml", "isoflop_cpu.yaml", "isoflop_gpu.yaml"} <= {p.name for p in STUDIES}


def test_the_shipped_studies_have_the_promised_shape():
    smoke, cpu, gpu = (load_spec(ROOT / "experiments" / f"isoflop_{n}.yaml") for n in ("smoke", "cpu", "gpu"))
    assert len(smoke.isoflop.budgets) == 2 and len(smoke.isoflop.sizes) == 3
    assert smoke.variant_list() == ["standard", "mod"] and not smoke.resources.use_ray
    assert len(cpu.isoflop.budgets) >= 3 and len(cpu.isoflop.sizes) >= 4
    assert set(cpu.variant_list()) == {"standard", "mod", "dtf"} and cpu.resources.device == "cpu"
    assert min(gpu.isoflop.budgets) >= 6e18
    # the GPU study's stated arithmetic: a day on 8 GPUs at 40% of 989 TFLOP/s, eight runs at a time in plan
    # order, and its data never repeat (the training share of max_tokens, a margin for the split and packing)
    runs = plan_isoflop(gpu, _vocab(gpu), gpu.data.block_size)
    hours = [r.planned_flops / (0.4 * 989e12) / 3600 for r in runs]
    free = [0.0] * 8
    for h in hours:
        free[free.index(min(free))] += h
    assert max(free) <= 24, max(free)
    data = gpu.data
    assert max(r.steps * r.tokens_per_step for r in runs) <= data.max_tokens * (1 - data.val_fraction) * 0.98
    assert data.max_bytes >= 8 * data.max_tokens


# ---- the smoke study, end to end ------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_study_runs_resumes_after_an_interrupt_and_reports(tmp_path, monkeypatch):
    from dtlab.trainers.cli.main import main
    from dtlab.trainers.orchestrate import runner

    out = tmp_path / "study"
    real, started = runner.launch, []

    def interrupted(config, spec, run_dir, use_ray, hooks):
        started.append(run_dir.name)
        if len(started) == 5:  # Ctrl-C as the fifth run starts
            raise KeyboardInterrupt
        return real(config, spec, run_dir, use_ray, hooks)

    monkeypatch.setattr(runner, "launch", interrupted)
    assert main(["isoflop", str(SMOKE), "--out", str(out)]) == 130
    index = json.loads((out / INDEX).read_text())
    assert len(index["runs"]) == 12 and index["budgets"] == [4e10, 8e10] and index["seeds"] == [0]
    assert [s["name"] for s in index["sizes"]] == ["d32x2", "d48x3", "d64x4"]
    assert set(index["sizes"][0]["overrides"]) == {"hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size"}
    done = [r["dir"] for r in index["runs"] if reached_last_step(out / r["dir"])]
    assert len(done) == 4 and started[:4] == [Path(d).name for d in done]  # the precondition: 4 had finished
    kept = {d: (out / d / "metrics.jsonl").read_text() for d in done}
    assert not (out / "report.html").exists()

    monkeypatch.setattr(runner, "launch", real)
    assert main(["isoflop", str(SMOKE), "--out", str(out)]) == 2  # neither --resume nor --force
    assert main(["isoflop", str(SMOKE), "--out", str(out), "--resume"]) == 0
    for run in json.loads((out / INDEX).read_text())["runs"]:
        assert reached_last_step(out / run["dir"]), run["dir"]
        facts = json.loads((out / run["dir"] / "run.json").read_text())["training"]
        assert facts["total_steps"] == run["steps"]
        assert facts["flops_per_token"] * facts["tokens_per_step"] * run["steps"] == run["planned_flops"]
        assert abs(run["planned_flops"] - run["budget"]) <= 0.01 * run["budget"]
    for d, text in kept.items():  # the finished runs were kept as they were
        assert (out / d / "metrics.jsonl").read_text() == text
    assert (out / "report.html").is_file() and str(out) in (out / "report.md").read_text()  # the study's report
    assert "saw its training data" not in (out / "report.md").read_text()  # the smoke study's data do not repeat
    # the isoFLOP analysis's part of it: the curves, and the optima per budget and variant
    html = (out / "report.html").read_text()
    assert f"isoFLOP study: {out.name}" in html and "isoFLOP curves: final validation loss against parameters" in html
    assert "## isoflop optima" in (out / "report.md").read_text()
    optima = (out / "report_tables" / "isoflop_optima.csv").read_text().splitlines()
    assert len(optima) > 1 and "budget" in optima[0] and "variant" in optima[0], optima[:3]
