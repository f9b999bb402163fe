"""The memory plan (`models/memory.py`, `trainers/tools/plan.py`) against what training really holds,
the plans of the shipped GPU specs, refusals with numbers, `dtlab plan`, and duplicate YAML keys."""

import re
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dtlab import models
from dtlab.models.memory import GiB, training_memory
from dtlab.trainers.run import parallel
from dtlab.trainers.run.device import detect_precision
from dtlab.trainers.run.loop import param_groups
from dtlab.trainers.spec import SpecError, apply_overrides, load_spec, spec_from_dict
from dtlab.trainers.tools.plan import check_plan, parse_cluster, plan_run, plan_runs
from tests.trainers.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]


class LiveBytes(TorchDispatchMode):
    """Bytes of every tensor storage alive, and their peak: each op's outputs are counted until their
    storage is freed (weakref finalizers); tensors made before are added with `add`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def add(self, t: object) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st._cdata in self.live:
            return
        self.live[st._cdata] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._gone, st._cdata)

    def _gone(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def measured_peak(variant, preset, B, T, precision, checkpointing, **overrides):
    """The peak bytes of one steady-state training step (forward, backward, clipping, AdamW: the
    loop's pieces), the second step of the run: AdamW's state exists, the gradients were set to None.
    bf16 is CPU autocast over fp32 weights (what CUDA runs); checkpointing is the loop's own."""
    torch.manual_seed(0)
    model = models.build_model(variant, preset, **overrides).train()
    prec = detect_precision("cpu", "fp32")
    model = parallel.wrap(model, "ddp", None, torch.device("cpu"), prec, checkpointing)
    assert (model.model.layer_runner is not None) == checkpointing  # the loop's checkpointing is on
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))

    def step():
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with amp:
            out = model(x, labels=x, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = LiveBytes()
    with tracker:
        for t in [*model.parameters(), *model.buffers(), x, *(v for s in opt.state.values() for v in s.values())]:
            tracker.add(t)
        state = tracker.now
        step()
    assert tracker.peak > 1.2 * state  # the step's own tensors were seen, not only the resident state
    return tracker.peak, state, model.config


CASES = [(v, prec, ck, {}) for v in ("standard", "mod", "dtf") for prec in ("fp32", "bf16") for ck in (False, True)]
CASES += [("mod", "bf16", False, {"loss_chunk_tokens": 100}),  # the loss in several chunks
          ("dtf", "fp32", True, {"loss_chunk_tokens": 100}),
          ("mod", "fp32", False, {"routing_mode": "causal"})]  # routed blocks masked over all T


@pytest.mark.parametrize("variant,precision,checkpointing,overrides", CASES)
def test_plan_is_within_20_percent_of_the_measured_peak_at_debug(variant, precision, checkpointing, overrides):
    """The peak, and the part of it beyond the resident weights and AdamW state (activations, gradients,
    the loss, temporaries), each within 20% of what one step measures."""
    peak, state, config = measured_peak(variant, "debug", 4, 128, precision, checkpointing, **overrides)
    plan = training_memory(config, 4, 128, precision, "ddp", 1, checkpointing, fused_adamw=False)
    assert 0.8 * peak <= plan.peak <= 1.2 * peak, (plan.peak / 2**20, peak / 2**20)
    step, planned_step = peak - state, plan.peak - plan.weights - plan.optimizer
    assert step > state  # the step's own part dominates at this shape: the check is not the state's
    assert 0.8 * step <= planned_step <= 1.2 * step, (planned_step / 2**20, step / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("variant,precision,checkpointing", [("standard", "fp32", False), ("mod", "bf16", False),
                                                             ("dtf", "bf16", True), ("dtf", "fp32", False)])
def test_plan_is_within_20_percent_of_the_measured_peak_at_small(variant, precision, checkpointing):
    peak, _, config = measured_peak(variant, "small", 2, 256, precision, checkpointing)
    plan = training_memory(config, 2, 256, precision, "ddp", 1, checkpointing, fused_adamw=False)
    assert 0.8 * peak <= plan.peak <= 1.2 * peak, (plan.peak / 2**20, peak / 2**20)


@pytest.mark.parametrize("variant,precision", [("standard", "fp32"), ("mod", "bf16"), ("dtf", "fp32"), ("dtf", "bf16")])
def test_saved_activations_are_what_autograd_saves(variant, precision):
    """The plan's activations (no checkpointing) against the storages autograd holds for backward at the
    end of the forward pass (parameters aside; autocast's weight copies included), within 3%."""
    torch.manual_seed(0)
    model = models.build_model(variant, "debug").train()
    x = torch.randint(0, model.config.vocab_size, (4, 128))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            saved[st._cdata] = st.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(x, labels=x, return_logits=False)
    total = sum(saved.values())
    plan = training_memory(model.config, 4, 128, precision, "ddp", 1, False)
    assert total > 0
    assert abs(plan.activations - total) <= 0.03 * total, (plan.activations, total)


# ---- the plans of specs ---------------------------------------------------------------------------------
def test_shipped_gpu_specs_fit_their_clusters():
    """sweep_gpu.yaml on one 80 GB H100 (trials share it, 0.5 GPU a rank; its seeds side by side),
    sweep_multigpu.yaml on 4 nodes of 8 H100s: every variant's worst corner fits, with DDP."""
    for name, cluster, devices in (("sweep_gpu", "1x1xH100-80GB", 2), ("sweep_multigpu", "4x8xH100-80GB", 2)):
        spec = load_spec(ROOT / f"experiments/{name}.yaml")
        runs = plan_runs(spec, parse_cluster(cluster))
        assert {r.variant for r in runs} == set(spec.sweep.search_space["model.type"].args)
        for run in runs:
            assert run.fits, (name, run.name, run.memory.peak / GiB, run.budget / GiB)
            assert run.devices == devices and run.params > 4e8  # the 0.5B shape
            assert run.strategy == "ddp" and not run.checkpointing
        check_plan(runs, spec)  # nothing refused


def replicate_3b(**resources):
    return spec_from_dict({
        "name": "big", "seeds": [0, 1],
        "model": {"type": "standard", "size": "3B"},
        "data": {"source": "builtin", "tokenizer": "Qwen/Qwen2.5-0.5B", "block_size": 2048},
        "training": {"max_steps": 100, "batch_size": 8},
        "resources": {"num_workers": 4, "device": "cuda", **resources},
        "sweep": {"num_samples": 2, "search_space": {"training.optimizer.lr": {"loguniform": [1e-4, 1e-3]}}},
    })


def test_3b_two_seeds_on_one_node_of_8_h100_is_planned_with_fsdp():
    spec = replicate_3b()
    [run] = plan_runs(spec, parse_cluster("1x8xH100-80GB"))
    assert run.devices == 8 and run.seeds == 2 and run.ranks == 4
    assert run.strategy == "fsdp" and run.fits
    assert run.resolved["resources.strategy"] == "fsdp"
    assert run.memory.weights == pytest.approx(4 * run.params / 4, rel=1e-3)  # sharded over the seed's 4 ranks


def test_3b_forced_to_ddp_without_checkpointing_is_refused_with_its_numbers():
    spec = replicate_3b(strategy="ddp").model_copy()
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"activation_checkpointing": "off"})})
    [run] = plan_runs(spec, parse_cluster("1x8xH100-80GB"))
    m = run.memory
    assert not run.fits and run.strategy == "ddp" and not run.checkpointing
    state = (m.weights + m.gradients + m.optimizer) / GiB
    assert 44 < state < 48  # the "about 46 GiB of state" (16 bytes a parameter)
    assert m.activations / GiB > 40  # "~40 GiB of activations" at least
    with pytest.raises(SpecError) as err:
        check_plan([run], spec, "big.yaml")
    text = str(err.value)
    for number in (m.peak, m.weights, m.optimizer, m.activations, run.budget):
        assert f"{number / GiB:,.1f} GiB" in text
    assert "big.yaml" in text and "will not fit" in text
    assert "training.activation_checkpointing=on" in text or "training.batch_size=" in text  # what would fit


def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """On a described cluster (DTLAB_CLUSTER): the 3B shape on one 24 GB L4 is refused by `run_training`
    before its run directory exists; a fitting run gets its `auto` settings decided (`check_fit`)."""
    from dtlab.trainers.orchestrate.runner import check_fit, run_training
    from dtlab.trainers.run.data import prepare_data

    monkeypatch.setenv("DTLAB_CLUSTER", "1x1xL4-24GB")
    big = spec_from_dict(tiny_spec(model={"type": "standard", "size": "3B"}, resources={"device": "auto"}))
    with pytest.raises(SpecError, match="will not fit"):
        run_training(big, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    small = spec_from_dict(tiny_spec(resources={"device": "auto"}))
    assert small.resources.strategy == "auto" and small.training.activation_checkpointing == "auto"
    decided = check_fit(small, prepare_data(small.data), 1)
    assert decided.resources.strategy == "ddp" and decided.training.activation_checkpointing == "off"


def test_the_cpu_refusal_counts_the_seeds_a_trial_trains_side_by_side(monkeypatch):
    """On a CPU a sweep trial's seeds each hold their weights, gradients and AdamW state in the same
    memory: what fits one seed can be refused for three, with the seeds named."""
    from dtlab.models.config import make_config
    from dtlab.models.flops import param_count
    from dtlab.trainers.orchestrate.runner import check_fit
    from dtlab.trainers.run.data import prepare_data
    from dtlab.trainers.tools import bench

    spec = spec_from_dict(tiny_spec())
    data = prepare_data(spec.data)
    params = param_count(make_config("mod", "debug", vocab_size=data.vocab_size))
    one_seed = params * 16 / 2**30
    monkeypatch.setattr(bench, "available_memory_gib", lambda device: 2 * one_seed)  # two seeds' worth
    check_fit(spec, data, 1, seeds=2)
    with pytest.raises(SpecError, match=r"1 worker\(s\) x 3 seeds side by side x 16 bytes a parameter"):
        check_fit(spec, data, 1, seeds=3)


def test_a_smaller_micro_batch_is_suggested_when_it_fits():
    spec = spec_from_dict({"name": "b", "model": {"type": "mod", "size": "0.5B"},
                           "data": {"source": "builtin", "tokenizer": "Qwen/Qwen2.5-0.5B", "block_size": 2048},
                           "training": {"max_steps": 10, "batch_size": 16, "grad_accum_steps": 2,
                                        "activation_checkpointing": "off"},
                           "resources": {"device": "cuda"}})
    run = plan_run(spec, "mod", parse_cluster("1x1xL4-24GB"))
    assert not run.fits
    with pytest.raises(SpecError, match=r"training.batch_size=(\d+) training.grad_accum_steps=(\d+)") as err:
        check_plan([run], spec)
    said = re.search(r"(training.batch_size=(\d+) training.grad_accum_steps=(\d+)[^;(]*) fits", str(err.value))
    b, accum = int(said.group(2)), int(said.group(3))
    assert b * accum == 32 and b < 16  # the same tokens per step
    raw = apply_overrides(spec.model_dump(mode="json"), said.group(1).split())
    smaller = spec_from_dict(raw)
    assert plan_run(smaller, "mod", parse_cluster("1x1xL4-24GB")).fits


@pytest.mark.parametrize("text,says", [("4x8xH100", "expected NODESxGPUS"), ("0x8xH100-80GB", "1 to 100,000 nodes"),
                                       ("1x8xB300-288GB", "unknown GPU type"), ("2x4xA100-40GB", None)])
def test_cluster_descriptions_are_parsed_strictly(text, says):
    if says is None:
        cluster = parse_cluster(text)
        assert (cluster.nodes, cluster.per_node, cluster.gpu, cluster.devices) == (2, 4, "A100-40GB", 8)
        assert cluster.memory == 40_960 * 2**20
        return
    with pytest.raises(SpecError, match=says):
        parse_cluster(text)


def test_dtlab_plan_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from dtlab.trainers.cli.main import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("DTLAB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    code = main(["plan", str(ROOT / "experiments/sweep_multigpu.yaml"), "training.batch_size=4",
                 "--cluster", "4x8xH100-80GB"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("plan of sweep_multigpu (sweep: 32 trials) on 4x8xH100-80GB")
    for variant in ("standard", "mod", "dtf"):
        assert f"  {variant} (worst corner" in out
    assert "micro-batch 4 x 2048 tokens" in out and "fits" in out and "DOES NOT FIT" not in out
    assert list(tmp_path.iterdir()) == []  # no run directory, no cache, nothing
    forced = ["training.batch_size=16", "resources.strategy=ddp", "training.activation_checkpointing=off"]
    code = main(["plan", str(ROOT / "experiments/sweep_multigpu.yaml"), *forced, "--cluster", "1x2xL4-24GB"])
    captured = capsys.readouterr()
    assert code == 2 and "DOES NOT FIT" in captured.out and "will not fit" in captured.err
    code = main(["plan", str(ROOT / "experiments/sweep_multigpu.yaml"), "--cluster", "1x1xH100-80GB"])
    captured = capsys.readouterr()
    assert code == 2 and "needs 2 GPU(s) per run" in captured.err  # 2 workers of a whole GPU each
    assert main(["plan", str(ROOT / "experiments/quick.yaml"), "--cluster", "2x8xh100"]) == 2
    assert "expected NODESxGPUS" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- duplicate keys --------------------------------------------------------------------------------------
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: x\ntraining:\n  max_steps: 3\nmodel:\n  type: mod\n")
    assert load_spec(ok).training.max_steps == 3
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: x\ntraining:\n  max_steps: 3\nmodel:\n  type: mod\ntraining:\n  batch_size: 4\n")
    with pytest.raises(SpecError) as err:
        load_spec(twice)
    assert str(twice) in str(err.value) and "'training'" in str(err.value) and "lines 2 and 6" in str(err.value)
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: x\ntraining:\n  optimizer:\n    lr: 0.1\n    eps: 1.0e-8\n    lr: 0.2\n")
    with pytest.raises(SpecError, match=r"'training.optimizer.lr' is given twice \(lines 4 and 6\)"):
        load_spec(nested)
