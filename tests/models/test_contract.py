"""The correctness contract of architectures.md section 5, item by item, for every variant."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dtlab import models
from dtlab.models.flops import capacity_k
from dtlab.models.layers import Rope, RotaryEmbedding
from dtlab.models.routing import (
    Context,
    causal_update,
    masked_causal_update,
    membership,
    routed_update,
    topk_sorted,
)
from tests.models.helpers import (
    VARIANT_MODES,
    VARIANTS,
    build,
    calibrate_dtf_threshold,
    max_diff,
    routed_layers,
    tokens,
)


# ---- 2. Causality -------------------------------------------------------------------------
@pytest.mark.parametrize("variant,mode", [vm for vm in VARIANT_MODES if vm[0] == "standard" or vm[1] == "causal"])
@pytest.mark.parametrize("padded", [False, True])
def test_causality(variant, mode, padded):
    model = build(variant, mode)
    B, T, t = 3, 40, 17
    x = tokens(B, T)
    y = x.clone()
    y[:, t + 1:] = tokens(B, T - t - 1, seed=5)
    mask = None
    if padded:  # left padding in row 0, right padding in row 1
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :5] = 0
        mask[1, 30:] = 0
    with torch.no_grad():
        a, b = model(x, attention_mask=mask), model(y, attention_mask=mask)
    assert torch.allclose(a.logits[:, : t + 1], b.logits[:, : t + 1], atol=1e-6, rtol=0), max_diff(
        a.logits[:, : t + 1], b.logits[:, : t + 1])
    for i in routed_layers(model) if variant != "standard" else ():  # the routing really decided something
        frac = a.routing_stats[i]["selected_frac"].item()
        assert 0.0 < frac < 1.0, f"layer {i}: causal routing selected fraction {frac}"


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_causality_check_detects_topk_lookahead(variant):
    """The check above can fail: top-k routing looks at the whole row, so it is not causal."""
    model = build(variant, "topk")
    x = tokens(4, 40)
    y = x.clone()
    y[:, 18:] = tokens(4, 22, seed=5)
    with torch.no_grad():
        a, b = model(x).logits[:, :18], model(y).logits[:, :18]
    assert not torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["standard", "mod", "dtf"])
def test_causality_in_training_mode(variant):
    """In training mode DTF moves its causal threshold: a pass must route with the threshold from
    before it (this batch's quantile depends on later tokens). Each pass starts from the same state;
    momentum 0 makes the estimate this batch's quantile, so a lookahead would show at full size."""
    model = build(variant, "causal", **({"dtf_threshold_momentum": 0.0} if variant == "dtf" else {})).train()
    B, T, t = 3, 40, 17
    x = tokens(B, T)
    y = x.clone()
    y[:, t + 1:] = tokens(B, T - t - 1, seed=5)
    a, b = copy.deepcopy(model)(x), copy.deepcopy(model)(y)
    assert torch.allclose(a.logits[:, : t + 1], b.logits[:, : t + 1], atol=1e-6, rtol=0), max_diff(
        a.logits[:, : t + 1], b.logits[:, : t + 1])
    for i in routed_layers(model) if variant != "standard" else ():
        assert 0.0 < a.routing_stats[i]["selected_frac"].item() < 1.0


# ---- 3. No cross-sample leakage -----------------------------------------------------------
@pytest.mark.parametrize("variant,mode", VARIANT_MODES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_no_cross_sample_leakage(variant, mode, padded, training):
    model = build(variant, mode).train(training)
    B, T = 3, 32
    x = tokens(B, T)
    y = x.clone()
    y[2] = tokens(1, T, seed=9)[0]
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :6] = 0
        mask[2, 20:] = 0
    # each pass from the same state (training moves DTF's threshold); with gradients in training, so that
    # causal routing runs its static masked form, the one training uses
    with torch.set_grad_enabled(training):
        a, b = copy.deepcopy(model)(x, attention_mask=mask), copy.deepcopy(model)(y, attention_mask=mask)
    assert a.logits.requires_grad == training
    assert not torch.allclose(a.logits[2], b.logits[2])
    assert torch.allclose(a.logits[:2], b.logits[:2], atol=1e-6, rtol=0), max_diff(a.logits[:2], b.logits[:2])


@pytest.mark.parametrize("variant,mode", VARIANT_MODES)
def test_padding_is_invisible(variant, mode):
    """Changing what sits under padding changes no real token's logits."""
    model = build(variant, mode)
    x = tokens(3, 32)
    mask = torch.ones(3, 32, dtype=torch.long)
    mask[0, :8] = 0
    mask[1, 24:] = 0
    y = torch.where(mask.bool(), x, tokens(3, 32, seed=7))
    with torch.no_grad():
        a, b = model(x, attention_mask=mask).logits, model(y, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-6, rtol=0), max_diff(a[real], b[real])


def test_standard_right_padding_matches_unpadded():
    model = build("standard")
    x = tokens(2, 32)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits[1, :20]
        alone = model(x[1:, :20]).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5), max_diff(padded, alone)


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_padding_ranks_below_real_tokens(variant):
    model = build(variant, "topk")  # capacity 0.5: k = 16 of 32
    x = tokens(2, 32)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, 10:] = 0  # 10 real tokens < k: all of them selected
    mask[1, :12] = 0  # 20 real tokens >= k: no padding selected
    with torch.no_grad():
        masks = model(x, attention_mask=mask).routing_masks
    for i in routed_layers(model):
        sel = masks[i]
        assert sel[0, :10].all(), f"layer {i}: a real token lost its slot to padding"
        assert not sel[1, :12].any(), f"layer {i}: padding selected while real tokens were left out"


# ---- 4. Degenerate equivalence ------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_capacity_one_unit_gate_equals_standard(variant):
    torch.manual_seed(0)
    dense = build("standard")
    cap = {"mod_capacity": 1.0} if variant == "mod" else {"dtf_capacity": 1.0}
    routed = build(variant, force_unit_gate=True, **cap)
    missing, unexpected = routed.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(("router" in k or "prior" in k) for k in missing), missing
    x = tokens(2, 24)
    out_d, out_r = dense(x, labels=x), routed(x, labels=x)
    assert torch.allclose(out_d.logits, out_r.logits, atol=1e-5), max_diff(out_d.logits, out_r.logits)
    out_d.lm_loss.backward()
    out_r.lm_loss.backward()
    routed_params = dict(routed.named_parameters())
    for name, p in dense.named_parameters():
        g_r = routed_params[name].grad
        assert g_r is not None, name
        assert torch.allclose(p.grad, g_r, atol=1e-5), f"{name}: {max_diff(p.grad, g_r)}"


# ---- 5. Not-selected tokens pass through bit for bit --------------------------------------
@pytest.mark.parametrize("variant,mode", [vm for vm in VARIANT_MODES if vm[0] != "standard"])
@pytest.mark.parametrize("padded", [False, True])
def test_unselected_tokens_pass_unchanged(variant, mode, padded):
    model = build(variant, mode)
    seen = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out.x))) for i in routed_layers(model)]
    x = tokens(2, 32)
    mask = None
    if padded:
        mask = torch.ones(2, 32, dtype=torch.long)
        mask[0, :5] = 0
    with torch.no_grad():
        masks = model(x, attention_mask=mask).routing_masks
    for h in hooks:
        h.remove()
    for i, (x_in, x_out) in seen.items():
        sel = masks[i]
        assert (~sel).any() and sel.any()
        assert torch.equal(x_in[~sel], x_out[~sel]), f"layer {i}: an unselected token changed"
        assert not torch.equal(x_in[sel], x_out[sel]), f"layer {i}: selected tokens were not updated"


# ---- 6. Exactly k per row, strictly increasing positions ---------------------------------
@pytest.mark.parametrize("variant", ["mod", "dtf"])
@pytest.mark.parametrize("capacity,T", [(0.125, 64), (0.3, 37), (0.5, 33), (1.0, 16), (0.01, 20)])
def test_exactly_k_selected(variant, capacity, T):
    model = build(variant, **({"mod_capacity": capacity} if variant == "mod" else {"dtf_capacity": capacity}))
    with torch.no_grad():
        masks = model(tokens(3, T)).routing_masks
    k = max(1, int(capacity * T + 1e-9))
    for i in routed_layers(model):
        counts = masks[i].sum(1)
        assert (counts == k).all(), f"layer {i}: selected per row {counts.tolist()}, expected {k}"


def test_capacity_k():
    assert capacity_k(0.125, 2048) == 256
    assert capacity_k(0.29, 100) == 29  # floating point would floor 28.999... to 28
    assert capacity_k(0.01, 20) == 1  # at least one token
    assert capacity_k(1.0, 7) == 7


def test_topk_sorted_strictly_increasing_and_top():
    scores = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    scores[0] = 0.0  # all tied
    idx = topk_sorted(scores, 12, None)
    assert (idx[:, 1:] > idx[:, :-1]).all(), "selected positions must be strictly increasing"
    for row in range(1, 5):
        assert set(idx[row].tolist()) == set(scores[row].topk(12).indices.tolist())


def test_topk_and_causal_gather_paths_agree():
    """The two gather paths (top-k, k per row; causal, a variable number per row padded to the
    largest) give the same update, so both keep original order and RoPE positions."""
    torch.manual_seed(0)
    model = build("mod")
    layer = model.model.layers[1]
    B, T, D = 3, 30, model.config.hidden_size
    x = torch.randn(B, T, D)
    gate = torch.rand(B, T)
    idx = topk_sorted(torch.randn(B, T), 9, None)
    rope = RotaryEmbedding(model.config.head_dim, model.config.rope_theta)(torch.arange(T)[None], x.dtype)
    for key_mask in (None, torch.arange(T).expand(B, T) >= torch.tensor([[0], [4], [0]])):
        ctx = Context(rope, key_mask, None, "topk", torch.tensor(0), False)
        a = routed_update(layer, x, gate, ctx, idx_BK=idx)
        ok = torch.ones(B, T, dtype=torch.bool) if key_mask is None else key_mask
        b = causal_update(layer, x, gate, membership(idx, T) & ok, ctx)
        assert torch.allclose(a[ok], b[ok], atol=1e-5), max_diff(a[ok], b[ok])
        m = masked_causal_update(layer, x, gate, membership(idx, T) & ok, ctx)  # compiled/training form
        assert torch.allclose(m[ok], b[ok], atol=1e-5), max_diff(m[ok], b[ok])
        # a row that selects nothing is not computed and keeps x bit for bit; the others are unchanged
        sel = membership(idx, T) & ok
        sel[1] = False
        c = causal_update(layer, x, gate, sel, ctx)
        assert torch.equal(c[1], x[1]) and torch.allclose(c[[0, 2]], b[[0, 2]], atol=1e-6)
    # and a gather at the wrong positions would be caught: RoPE of slots 0..k-1 differs
    wrong = Rope(*rope).gather(torch.arange(9).expand(B, 9))
    assert not torch.allclose(wrong.cos, Rope(*rope).gather(idx).cos)


# ---- 7. Router parameters learn -----------------------------------------------------------
@pytest.mark.parametrize("variant,overrides", [("mod", {}), ("mod", {"mod_use_predictor": True}), ("dtf", {})])
def test_router_parameters_get_gradients(variant, overrides):
    model = build(variant, **overrides).train()
    x = tokens(2, 32)
    model(x, labels=x).loss.backward()
    names = [n for n, _ in model.named_parameters() if ".router." in n or ".predictor." in n]
    expected = {"mod": {"weight"}, "dtf": {"beta_ce", "beta_cu", "log_o_ce", "m_cu"}}[variant]
    assert expected <= {n.split(".")[-1] for n in names}
    for name, p in model.named_parameters():
        if name in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} has no gradient"


# ---- 8. Labels shifted once; the LM loss is a plain cross-entropy -------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [8192, 7])
def test_lm_loss_is_hand_computed_cross_entropy(variant, chunk):
    model = build(variant, loss_chunk_tokens=chunk)
    x = tokens(3, 20)
    labels = x.clone()
    labels[1, :4] = -100
    out = model(x, labels=labels)
    logits = out.logits.float()
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
    assert torch.allclose(out.lm_loss, by_hand, atol=1e-5), (out.lm_loss.item(), by_hand.item())
    # explicit sum over positions: logits at t predict token t+1
    total, n = 0.0, 0
    for b in range(3):
        for t in range(19):
            if labels[b, t + 1] != -100:
                total -= torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
                n += 1
    assert torch.allclose(out.lm_loss, total / n, atol=1e-5)
    # the training path: no logits returned, the loss from the hidden states in chunks
    lean = model(x, labels=labels, return_logits=False)
    assert lean.logits is None
    assert torch.allclose(lean.lm_loss, by_hand, atol=1e-5), (lean.lm_loss.item(), by_hand.item())
    expected_total = out.lm_loss + sum(
        getattr(model.config, {"mod_aux": "mod_aux_loss_weight", "dtf_prior": "prior_loss_weight"}[k]) * v
        for k, v in out.aux_losses.items())
    assert torch.allclose(out.loss, expected_total)


@pytest.mark.parametrize("tie", [True, False])
def test_fused_chunked_loss_matches_plain_cross_entropy(tie):
    """Loss and gradients of the lean training path equal autograd through full logits."""
    grads = []
    for return_logits, chunk in ((True, 4096), (False, 4096), (False, 5)):
        model = build("standard", loss_chunk_tokens=chunk, tie_word_embeddings=tie)
        x = tokens(2, 16)
        labels = x.clone()
        labels[0, 3:7] = -100
        out = model(x, labels=labels, return_logits=return_logits)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, g in grads[1:]:
        assert torch.allclose(loss, grads[0][0], atol=1e-6)
        for name, ref in grads[0][1].items():
            assert torch.allclose(g[name], ref, atol=1e-6), f"{name}: {max_diff(g[name], ref)}"
    with torch.no_grad():  # and the no-gradient path
        model = build("standard", loss_chunk_tokens=5, tie_word_embeddings=tie)
        assert torch.allclose(model(x, labels=labels, return_logits=False).loss, grads[0][0], atol=1e-6)


# ---- 9. No host synchronisation in forward: fullgraph compile finds no graph break -----------
@pytest.mark.slow
@pytest.mark.parametrize("variant,mode", VARIANT_MODES)
def test_compiles_fullgraph(variant, mode):
    torch._dynamo.reset()
    model = build(variant, mode, loss_chunk_tokens=16).train()  # 46 tokens: three loss chunks
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = tokens(2, 24)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :3] = 0
    for attention_mask, logits in ((None, True), (mask, False)):
        eager = copy.deepcopy(model)  # the same state: a training pass moves DTF's threshold
        model.zero_grad()
        out = compiled(x, attention_mask=attention_mask, labels=x, return_logits=logits)
        out.loss.backward()
        ref = eager(x, attention_mask=attention_mask, labels=x, return_logits=logits)
        ref.loss.backward()
        assert torch.allclose(out.loss, ref.loss, atol=1e-6), (out.loss.item(), ref.loss.item())
        for i in out.routing_masks:
            assert torch.equal(out.routing_masks[i], ref.routing_masks[i]), f"layer {i} routed differently"
        grads = dict(eager.named_parameters())
        for name, p in model.named_parameters():
            want = grads[name].grad
            assert (p.grad is None) == (want is None), name
            if want is not None:
                assert torch.allclose(p.grad, want, atol=1e-6), f"{name}: {max_diff(p.grad, want)}"
        for key, value in eager.state_dict().items():  # buffers too: the threshold moved the same way
            assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key
        for stats in out.routing_stats.values():
            assert all(not v.requires_grad for v in stats.values()), "routing stats must leave detached"


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_routing_mode_changes_on_a_built_model(variant):
    """Setting `routing_mode` on a built model switches what its routed blocks process: top-k, k per row;
    causal, the rule computed here independently of the routing code: MoD `w . x > 0` on the layer's
    input, DTF `G >= threshold` on the router's gate."""
    model = build(variant, "topk")
    if variant == "dtf":
        calibrate_dtf_threshold(model)
    x = tokens(2, 32)
    seen = {}
    hooks = []
    for i in routed_layers(model):
        layer = model.model.layers[i]
        if variant == "mod":
            hooks.append(layer.register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(i, args[0].double() @ m.router.weight.double()[0] > 0)))
        else:
            hooks.append(layer.router.register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(i, out["gate"] >= m.threshold)))
    with torch.no_grad():
        topk = model(x)
        model.config.routing_mode = "causal"
        causal = model(x)
    for h in hooks:
        h.remove()
    for i in routed_layers(model):
        assert torch.equal(topk.routing_masks[i].sum(1), torch.tensor([16, 16]))
        assert torch.equal(causal.routing_masks[i], seen[i]), f"layer {i}: causal mask is not the causal rule"
        assert not torch.equal(causal.routing_masks[i], topk.routing_masks[i])
        assert 0 < seen[i].sum() < seen[i].numel()  # precondition: the rule selects some, not all


def test_dtf_threshold_tracks_the_capacity_quantile():
    """At momentum 0 the threshold after a training pass is the documented estimate of that batch: the
    mean over rows of each row's k-th largest gate (k = 16 of 64, c = 0.25); at the default momentum an
    update moves it 1% of the way there; and causal routing then selects about c."""
    model = build("dtf", dtf_capacity=0.25, dtf_threshold_momentum=0.0).train()
    g = torch.Generator().manual_seed(3)
    gates = {}
    hooks = [model.model.layers[i].router.register_forward_hook(
        lambda m, args, out, i=i: gates.__setitem__(i, out["gate"])) for i in routed_layers(model)]
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 97, (8, 64), generator=g))
            for i in routed_layers(model):
                want = gates[i].topk(16, dim=1).values[:, -1].mean()
                got = model.model.layers[i].router.threshold
                assert got.item() == pytest.approx(want.item(), abs=1e-6), (i, got.item(), want.item())
        model.config.dtf_threshold_momentum = 0.99
        before = {i: model.model.layers[i].router.threshold.item() for i in routed_layers(model)}
        model(torch.randint(0, 97, (8, 64), generator=g))
        for i in routed_layers(model):
            q = gates[i].topk(16, dim=1).values[:, -1].mean().item()
            got = model.model.layers[i].router.threshold.item()
            assert got == pytest.approx(0.99 * before[i] + 0.01 * q, abs=1e-6), (i, got, before[i], q)
        for h in hooks:
            h.remove()
        model.eval()
        model.config.routing_mode = "causal"
        stats = model(torch.randint(0, 97, (8, 64), generator=g)).routing_stats
    for i in routed_layers(model):
        frac = stats[i]["selected_frac"].item()
        assert 0.1 < frac < 0.45, f"layer {i}: causal routing realised capacity {frac:.3f}, target 0.25"


# progress at step 25 of 100: linear 0.25; cosine 0.5 * (1 - cos(pi / 4)) = 0.1464 (they agree at 0, 50, 100)
@pytest.mark.parametrize("schedule,quarter", [("linear", 0.25), ("cosine", 0.5 * (1 - math.cos(math.pi / 4)))])
def test_dtf_beta_schedule_moves_the_temperature_itself(schedule, quarter):
    """A 0.1 -> 100 schedule runs the temperature (the factor of CE) from 0.1 to 100, not
    softplus of it (0.744 -> 100), along the schedule's own curve (step 25 tells the two apart)."""
    model = build("dtf", beta_mode="schedule", beta_schedule=schedule, beta_ce_start=0.1, beta_ce_end=100.0,
                  beta_cu_start=2.0, beta_cu_end=1.0, beta_schedule_steps=100)
    assert not any("beta" in n for n, _ in model.named_parameters())
    x = tokens(1, 16)
    seen = []
    for step in (0, 25, 50, 100, 500):
        model.set_schedule_step(step)
        with torch.no_grad():
            stats = model(x).routing_stats[1]
        seen.append((stats["temp_ce"].item(), stats["temp_cu"].item()))
    assert [t for t, _ in seen] == pytest.approx([0.1, 0.1 + 99.9 * quarter, 50.05, 100.0, 100.0], rel=1e-5)
    assert [t for _, t in seen] == pytest.approx([2.0, 2.0 - quarter, 1.5, 1.0, 1.0], rel=1e-5)
    # and S_CE is the sigmoid of that temperature times CE
    router, ctx = model.model.layers[1].router, _ctx(model, 8)
    h, h_post, h_prior = torch.randn(3, 2, 8, model.config.hidden_size)
    model.set_schedule_step(0)
    parts = router(h, h_post, h_prior, ctx._replace(step=model.model.schedule_step))
    assert torch.allclose(parts["s_ce"], torch.sigmoid(0.1 * parts["ce"]))
    with pytest.raises(ValueError, match=r"beta_ce_start=-0.5: a scheduled temperature"):
        models.make_config("dtf", beta_mode="schedule", beta_ce_start=-0.5)


def test_dtf_learnable_temperature_is_softplus_of_beta():
    model = build("dtf")
    with torch.no_grad():
        stats = model(tokens(1, 16)).routing_stats[1]
    assert stats["temp_ce"].item() == pytest.approx(F.softplus(torch.tensor(-0.5)).item())
    assert stats["temp_cu"].item() == pytest.approx(F.softplus(torch.tensor(-0.8)).item())


def _ctx(model, T: int) -> Context:
    rope = model.model.rotary_emb(torch.arange(T)[None], torch.float32)
    return Context(rope, None, None, "topk", model.model.schedule_step, True)


def test_dtf_change_surprise_gradient_reaches_h_through_the_update_only():
    """With H attached in H_prior = H + F, D_ch = mean((update(H) - F)^2): its gradient with
    respect to H is that of the update's, F held fixed (spec section 3)."""
    torch.manual_seed(0)
    model = build("dtf").train()
    decision, router = model.model.layers[0], model.model.layers[1].router
    ctx = _ctx(model, 12)
    h = torch.randn(2, 12, model.config.hidden_size, requires_grad=True)
    out = decision(h, ctx, None)
    h_in, h_prior = out.carry
    d_ch = router(h_in, out.x, h_prior, ctx)["d_ch"]
    (grad,) = torch.autograd.grad(d_ch.sum(), h, retain_graph=True)
    f = decision.prior(decision.prior_norm(h.detach())).detach()
    update = decision.block(h, ctx.rope, None) - h
    (want,) = torch.autograd.grad((update - f).pow(2).mean(-1).sum(), h)
    assert torch.allclose(grad, want, atol=1e-6), max_diff(grad, want)
    # the check can fail: with H detached in the prior (the old code) the identity does not cancel
    (wrong,) = torch.autograd.grad((out.x - (h.detach() + f)).pow(2).mean(-1).sum(), h)
    assert not torch.allclose(wrong, want, atol=1e-4)


def test_dtf_prior_loss_trains_the_prior_alone():
    """The prior loss must not pull the residual stream (which made the stream grow without
    bound in training, see DTFDecisionLayer): it reaches prior parameters only."""
    model = build("dtf").train()
    x = tokens(2, 32)
    model(x).aux_losses["dtf_prior"].backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched == (".prior" in name), f"{name}: prior-loss gradient {'present' if touched else 'missing'}"


def _rows(rank: int) -> torch.Tensor:
    return tokens(4, 32, seed=rank)


def _threshold_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build("dtf").train()
        with torch.no_grad():
            model(_rows(rank))  # each rank its own rows
        router = build("dtf").model.layers[1].router  # and gates made to differ: 0.3 on rank 0, 0.9 on rank 1
        gate = torch.full((3, 10), 0.3 + 0.6 * rank)
        router.update_threshold(gate, torch.arange(4).expand(3, 4), None)
        torch.save([model.model.layers[1].router.threshold.clone(), router.threshold.clone()],
                   f"{out_dir}/{rank}.pt")
        dist.barrier()  # both ranks have written their results
    except BaseException:
        dist.destroy_process_group()
        raise
    # Exit without gloo's teardown: at interpreter exit it can abort the process (SIGABRT, "terminate
    # called without an active exception") once the peer has gone, which CI saw under load.
    os._exit(0)


def test_dtf_threshold_is_averaged_across_ddp_ranks(tmp_path):
    """Two gloo ranks with different rows end with the same threshold: the one a single process
    gets from all their rows together."""
    import torch.multiprocessing as mp

    mp.spawn(_threshold_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    (model0, crafted0), (model1, crafted1) = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    alone = build("dtf").train()
    with torch.no_grad():
        alone(torch.cat([_rows(0), _rows(1)]))
    want = alone.model.layers[1].router.threshold
    assert model0.item() == pytest.approx(model1.item(), abs=1e-7)
    assert model0.item() == pytest.approx(want.item(), abs=1e-6)
    assert crafted0.item() == pytest.approx(0.6) and crafted1.item() == pytest.approx(0.6)  # not 0.3 and 0.9


# ---- masked grouped-query attention: the cheaper of folding and repeating ------------------
def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, and its result."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def _folded(q, k, v, mask):
    """The folded form: G query heads per KV head in the query axis, the mask repeated G times."""
    B, H, S, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    m = mask.expand(B, 1, S, L)[:, :, None].expand(B, 1, G, S, L).reshape(B, 1, G * S, L)
    return F.scaled_dot_product_attention(q.reshape(B, Hkv, G * S, d), k, v, attn_mask=m).reshape(B, H, S, d)


@pytest.mark.parametrize("S,form", [(16, "fold"), (256, "repeat")])  # 2 * Hkv * d = 64 decides
def test_masked_gqa_attention_takes_the_cheaper_form(S, form):
    """`attend` with a mask and grouped KV heads equals attention with repeated keys and values (outputs
    and gradients), and saves no more for backward than the cheaper of folding and repeating: at S = 256
    folding's [B, 1, G*S, L] mask is 4x the repeated keys and values, and it used to be taken always."""
    from dtlab.models.layers import attend, gqa_with_mask, sdpa_mask

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, d = 2, 8, 2, 16
    q, k, v = (torch.randn(B, h, S, d, generator=g, requires_grad=True) for h in (H, Hkv, Hkv))
    mask = sdpa_mask(torch.rand(B, S, generator=g) > 0.3, S, q.device)
    assert gqa_with_mask(q, k, v) == form
    got_bytes, got = _saved_bytes(lambda: attend(q, k, v, mask))
    rep_bytes, want = _saved_bytes(lambda: F.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=mask))
    fold_bytes, folded = _saved_bytes(lambda: _folded(q, k, v, mask))
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(folded, want, atol=1e-5), max_diff(got, want)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v)), strict=True):
        assert torch.allclose(a, b, atol=1e-4), max_diff(a, b)
    assert got_bytes == min(rep_bytes, fold_bytes), (got_bytes, rep_bytes, fold_bytes)
    if form == "repeat":  # precondition: here folding costs more
        assert fold_bytes > 1.3 * rep_bytes, (fold_bytes, rep_bytes)
