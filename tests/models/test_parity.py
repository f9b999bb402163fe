"""Contract item 1: Standard is Qwen2; Qwen2 checkpoints load into every variant, every key accounted for."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dtlab import models
from tests.models.helpers import VARIANTS, max_diff, tokens

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def hf_model(tie: bool, layers: int = 4) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=tie, initializer_range=0.2,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped name would show
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    model = hf_model(tie=request.param)
    model.save_pretrained(path)
    return model, path


def test_standard_matches_hf_qwen2(checkpoint):
    hf, path = checkpoint
    ours = models.build_model("standard", pretrained=path).eval()
    x = tokens(2, 40)
    with torch.no_grad():
        want, got = hf(x).logits, ours(x).logits
    assert torch.allclose(want, got, atol=1e-5, rtol=0), max_diff(want, got)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        want, got = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(want[real], got[real], atol=1e-5, rtol=0), max_diff(want[real], got[real])


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_loads_into_every_variant(checkpoint, variant):
    hf, path = checkpoint
    model = models.build_model(variant, pretrained=path)
    ours = model.state_dict()
    for key, tensor in hf.state_dict().items():
        assert torch.equal(ours[key], tensor), f"{key} did not land"
    fresh = [k for k in ours if k not in hf.state_dict()]
    assert all(".router." in k or ".prior" in k or k == "model.schedule_step" for k in fresh), fresh
    # layer mapping of the spec: MoD layer i <- i; DTF pair p: decision <- 2p, dynamic <- 2p+1
    kinds = model.config.layer_kinds
    expected = {"standard": ["dense"] * 4, "mod": ["dense", "mod"] * 2, "dtf": ["dtf_decision", "dtf_dynamic"] * 2}
    assert kinds == expected[variant]


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_transferred_routed_model_at_capacity_one_equals_hf(checkpoint, variant):
    hf, path = checkpoint
    cap = {"mod_capacity": 1.0} if variant == "mod" else {"dtf_capacity": 1.0}
    model = models.build_model(variant, pretrained=path, force_unit_gate=True, **cap).eval()
    x = tokens(2, 24)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_odd_layer_count_dtf_keeps_last_layer_dense(tmp_path):
    hf_model(tie=False, layers=3).save_pretrained(tmp_path)
    model = models.build_model("dtf", pretrained=tmp_path)
    assert model.config.layer_kinds == ["dtf_decision", "dtf_dynamic", "dense"]


def _copy_checkpoint(src, dst, edit):
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    state, cfg = edit(state, cfg)
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("variant", VARIANTS)
def test_extra_checkpoint_tensor_fails_listing_it(checkpoint, tmp_path, variant):
    _, path = checkpoint

    def add(state, cfg):
        state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3)
        return state, cfg

    bad = _copy_checkpoint(path, tmp_path / "bad", add)
    with pytest.raises(ValueError, match=r"no place in the model.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        models.build_model(variant, pretrained=bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_checkpoint_tensor_fails_listing_it(checkpoint, tmp_path, variant):
    _, path = checkpoint

    def drop(state, cfg):
        del state["model.layers.1.self_attn.k_proj.bias"]
        return state, cfg

    bad = _copy_checkpoint(path, tmp_path / "bad", drop)
    with pytest.raises(ValueError, match=r"lacks.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        models.build_model(variant, pretrained=bad)


def test_checkpoint_whose_shapes_do_not_fit(checkpoint, tmp_path):
    _, path = checkpoint

    def widen(state, cfg):
        cfg["intermediate_size"] = 80
        return state, cfg

    bad = _copy_checkpoint(path, tmp_path / "bad", widen)
    with pytest.raises(ValueError, match=r"shapes that do not fit.*mlp\.gate_proj\.weight"):
        models.build_model("mod", pretrained=bad)
    with pytest.raises(ValueError, match=r"hidden_size=48 \(checkpoint has 32\)"):
        models.build_model("standard", pretrained=path, hidden_size=48)


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        models.build_model("standard", pretrained="./no/such/dir")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"model_type='llama', expected one of \[.*'qwen2'\]"):
        models.build_model("standard", pretrained=tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_reload_through_auto_classes(tmp_path, variant):
    torch.manual_seed(0)
    model = models.build_model(variant, mod_capacity=0.5) if variant == "mod" else models.build_model(variant)
    model.eval()
    if variant == "dtf":
        model.model.layers[1].router.threshold.fill_(0.37)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    assert again.config.variant == variant
    x = tokens(2, 16, vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    if variant == "dtf":
        assert again.model.layers[1].router.threshold.item() == pytest.approx(0.37)
    if variant == "mod":
        assert again.config.mod_capacity == 0.5


def test_hub_name_that_cannot_be_fetched_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"pretrained='Qwen/Qwen2.5-0.5B': not a local directory and could not be"):
        models.build_model("mod", pretrained="Qwen/Qwen2.5-0.5B")


def test_saved_dtlab_checkpoint_keeps_its_variant_settings(tmp_path):
    """A DTF saved at capacity 0.5 with scheduled temperatures reloads as it was saved, not at the
    defaults; explicit overrides still win; another routed variant is refused."""
    torch.manual_seed(0)
    saved = models.build_model("dtf", dtf_capacity=0.5, beta_mode="schedule", beta_ce_start=0.2, beta_ce_end=5.0,
                               beta_schedule_steps=1000)
    saved.model.layers[1].router.threshold.fill_(0.42)
    saved.set_schedule_step(500)  # half-way: temperatures that differ from the start's
    saved.save_pretrained(tmp_path)
    again = models.build_model("dtf", pretrained=tmp_path)
    assert (again.config.dtf_capacity, again.config.beta_mode, again.config.beta_ce_end) == (0.5, "schedule", 5.0)
    assert again.model.layers[1].router.threshold.item() == pytest.approx(0.42)
    assert int(again.model.schedule_step) == 500
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert int(auto.model.schedule_step) == 500 and auto.config.dtf_capacity == 0.5
    x = tokens(2, 16, vocab=saved.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(saved.eval()(x).logits, again.eval()(x).logits)
    assert models.build_model("dtf", pretrained=tmp_path, dtf_capacity=0.25).config.dtf_capacity == 0.25
    with pytest.raises(ValueError, match=r"holds a 'dtf' model: it cannot load as 'mod'"):
        models.build_model("mod", pretrained=tmp_path)
    dense = tmp_path / "dense"
    models.build_model("standard").save_pretrained(dense)
    assert models.build_model("mod", pretrained=dense).config.mod_capacity == 0.125  # dense -> routed: transfer


def test_tied_checkpoint_whose_head_differs_is_refused_or_untied_by_choice(tmp_path):
    hf = hf_model(tie=True)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0  # tied in config.json, not in the file
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"ties the LM head to the embedding, but its lm_head.weight differs"):
        models.build_model("standard", pretrained=tmp_path)
    untied = models.build_model("standard", pretrained=tmp_path, tie_word_embeddings=False)
    assert torch.equal(untied.lm_head.weight, state["lm_head.weight"])
    assert torch.equal(untied.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    # the same file with equal tensors loads tied
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors")
    tied = models.build_model("standard", pretrained=tmp_path)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_rope_scaling_is_refused_never_dropped(tmp_path):
    with pytest.raises(ValueError, match=r"rope_scaling=.*only the default rotary embedding"):
        models.MoDConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})  # as a config.json would say it
    assert models.MoDConfig(rope_scaling=None).rope_theta == 1e6  # Qwen2.5's `null` is fine
    hf_model(tie=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: rope_parameters=.*only the default rotary embedding"):
        models.build_model("mod", pretrained=tmp_path)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = models.build_model("standard").to(torch.bfloat16)
    rope = model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.inv_freq, rope.compute_inv_freq())  # recomputed, not a bf16 value cast back
    cos = rope(torch.arange(30000, 30001)[None], torch.float32).cos
    assert torch.allclose(cos, models.build_model("standard").model.rotary_emb(torch.arange(30000, 30001)[None],
                                                                               torch.float32).cos)


def test_dtf_checkpoints_saved_before_scheduled_temperatures(tmp_path):
    """Their config.json has raw-beta schedule values (negative by default): learnable-mode ones load as
    they are; a schedule-mode one, whose values meant something else, is refused with what to do."""
    model = models.build_model("dtf")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["beta_schedule_values"]
    cfg.update(beta_ce_start=-0.5, beta_ce_end=-0.5, beta_cu_start=-0.8, beta_cu_end=-0.8)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.beta_mode == "learnable"
    assert models.build_model("dtf", pretrained=tmp_path).config.beta_ce_init == -0.5
    cfg.update(beta_mode="schedule", beta_ce_start=0.1, beta_ce_end=3.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"saved before dtlab scheduled the temperatures themselves"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant,key", [("dtf", "model.layers.1.router.m_cu"),
                                         ("dtf", "model.layers.2.prior.up_proj.weight"),
                                         ("mod", "model.layers.3.router.weight"),
                                         ("mod", "model.layers.1.predictor.fc2.bias")])
def test_saved_routed_checkpoint_missing_a_routing_tensor_is_refused(tmp_path, variant, key):
    """Routing parts may start fresh only in a transfer from a dense checkpoint: a saved MoD/DTF checkpoint
    of the same variant that lacks one is damaged and refused, naming the key (it used to load with a fresh
    router). The same tensors missing from a dense checkpoint are the transfer's fresh parts."""
    torch.manual_seed(0)
    overrides = {"mod_use_predictor": True} if variant == "mod" else {}
    models.build_model(variant, **overrides).save_pretrained(tmp_path / "saved")
    intact = models.build_model(variant, pretrained=tmp_path / "saved")  # the intact one loads

    def drop(state, cfg):
        del state[key]
        return state, cfg

    bad = _copy_checkpoint(tmp_path / "saved", tmp_path / "bad", drop)
    with pytest.raises(ValueError, match=rf"lacks: \['{re.escape(key)}'\].*saved 'dtlab_{variant}' checkpoint"):
        models.build_model(variant, pretrained=bad)
    models.build_model("standard").save_pretrained(tmp_path / "dense")
    transferred = models.build_model(variant, pretrained=tmp_path / "dense", **overrides)
    assert key in transferred.state_dict() and key in intact.state_dict()


def _trained_dtf_with_bf16_weights():
    """A DTF whose causal thresholds were trained (30 training passes) and whose parameters are all
    bf16 numbers, so that a bf16 round trip changes nothing but what it must not change."""
    from tests.models.helpers import build

    model = build("dtf", "causal", dtf_capacity=0.25).train()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        g = torch.Generator().manual_seed(3)
        for _ in range(30):
            model(torch.randint(0, 97, (8, 64), generator=g))
    return model.eval()


def _routing(model, x):
    from tests.models.helpers import routed_layers

    with torch.no_grad():
        out = model(x)
    return {i: (out.routing_masks[i], out.routing_stats[i]["selected_frac"].item()) for i in routed_layers(model)}


def _thresholds(model):
    from tests.models.helpers import routed_layers

    return {i: model.model.layers[i].router.threshold for i in routed_layers(model)}


def test_dtf_threshold_survives_a_bf16_round_trip(tmp_path):
    """The causal threshold is a statistic kept in fp32 whatever the model is cast to: `model.to(bf16)`
    and `from_pretrained(..., dtype=bf16)` keep its fp32 value, and a model saved in bf16 and reloaded
    routes exactly as before. (bf16 rounded a trained 0.7510 to 0.75, and G clusters at 0.75 here: the
    realised causal capacity went from 0.28 to 0.82.)"""
    model = _trained_dtf_with_bf16_weights()
    want = {i: t.item() for i, t in _thresholds(model).items()}
    assert all(abs(torch.tensor(t).bfloat16().item() - t) > 1e-4 for t in want.values()), want  # precondition
    x = tokens(8, 64, seed=11)
    before = _routing(model, x)
    copy_16 = copy.deepcopy(model).to(torch.bfloat16)
    for i, t in _thresholds(copy_16).items():
        assert t.dtype == torch.float32 and t.item() == pytest.approx(want[i], abs=1e-6), (i, t.item(), want[i])
    copy_16.save_pretrained(tmp_path / "bf16")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert again.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    for i, t in _thresholds(again).items():
        assert t.item() == pytest.approx(want[i], abs=1e-6), (i, t.item(), want[i])
    after = _routing(again, x)
    for i, (mask, frac) in before.items():  # same weights, same thresholds: the same routing
        assert after[i][1] == frac, f"layer {i}: realised capacity {after[i][1]:.3f} vs {frac:.3f}"
        assert torch.equal(after[i][0], mask)
    # from_pretrained straight into bf16 keeps the saved fp32 value too, and routes near the fp32 model
    model.save_pretrained(tmp_path / "fp32")
    in_16 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    assert in_16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for i, t in _thresholds(in_16).items():
        assert t.dtype == torch.float32 and t.item() == pytest.approx(want[i], abs=1e-6), (i, t.item(), want[i])
    for i, (_, frac) in _routing(in_16, x).items():  # bf16 activations move G a little, not the threshold
        assert abs(frac - before[i][1]) < 0.1, f"layer {i}: bf16 realised capacity {frac:.3f} vs {before[i][1]:.3f}"


def test_a_bf16_model_in_training_moves_its_threshold():
    """A 1% EMA step is below bf16's resolution at 0.75, and 301 counts as 300 in bf16: in fp32 both move."""
    model = _trained_dtf_with_bf16_weights().to(torch.bfloat16).train()
    router = model.model.layers[1].router
    router.threshold.fill_(0.7)
    router.threshold_updates.fill_(300.0)
    captured = []
    hook = router.register_forward_hook(lambda mod, args, out: captured.append(out["gate"]))
    with torch.no_grad():
        model(tokens(8, 64, seed=5))
    hook.remove()
    q = captured[0].topk(16, dim=1).values[:, -1].mean()  # the batch's (1 - c) quantile: k = 16 of 64
    assert router.threshold_updates.item() == 301.0
    assert router.threshold.item() == pytest.approx(0.99 * 0.7 + 0.01 * q.item(), abs=1e-6)
