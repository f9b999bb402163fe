"""Generation and the routed KV cache (spec section 4): cached decoding reproduces the
full-sequence `causal` forward; a routed block stores and computes only the tokens it selects."""

import pytest
import torch

from .helpers import VARIANTS, build, routed_layers, tokens

STEPS = 32


def left_padded(lengths: list[int], vocab: int = 97, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts of the given lengths, left-padded with token 0."""
    T = max(lengths)
    ids = tokens(len(lengths), T, vocab, seed).clamp_min(1)
    mask = (torch.arange(T) >= T - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def full_forward(model, ids, mask):
    with torch.no_grad(), model.routing("causal"):
        return model(ids, attention_mask=mask)


def cached_greedy(model, ids, mask, steps: int = STEPS):
    """Prefill, then `steps` single-token cached steps; returns the sequence, the attention mask,
    the logits of every step [B, V] and the cache."""
    seq, am, logits = ids, mask, []
    with torch.no_grad(), model.routing("causal"):
        out = model(ids, attention_mask=mask, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=am, cache=out.cache)
    return seq, am, logits, out.cache


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lengths", [[9], [9, 9, 9], [9, 5, 2]], ids=["one-row", "rows", "left-padded"])
def test_cached_greedy_decoding_matches_full_causal_forwards(variant, lengths):
    model = build(variant, "causal")
    ids, mask = left_padded(lengths)
    seq, am, logits, cache = cached_greedy(model, ids, mask)
    P = ids.shape[1]
    for step, step_logits in enumerate(logits):  # every step against a full forward of the prefix
        ref = full_forward(model, seq[:, :P + step], am[:, :P + step]).logits[:, -1]
        assert torch.equal(step_logits.argmax(-1), ref.argmax(-1)), f"step {step}: greedy tokens differ"
        assert torch.allclose(step_logits, ref, atol=1e-4), f"step {step}: {(step_logits - ref).abs().max():.2e}"
    # A routed block's cache holds exactly the tokens it processed, row by row.
    masks = full_forward(model, seq, am).routing_masks
    routed = routed_layers(model) if variant != "standard" else []
    for i in routed:
        processed = masks[i].sum(1)
        assert torch.equal(cache.stored(i), processed), (i, cache.stored(i), processed)
        real = am.sum(1)
        assert (processed < real).any() and (processed > 0).any(), "precondition: routing skipped some tokens"
    for i in set(range(model.config.num_hidden_layers)) - set(routed):
        assert torch.equal(cache.stored(i), torch.full((len(lengths),), seq.shape[1])), i  # dense: every column


def test_dtf_moving_average_carries_across_decode_steps():
    """With a window shorter than the sequence, MA(D_st) reads the cache's surprise history."""
    model = build("dtf", "causal", ma_window=3)
    ids, mask = left_padded([9, 5])
    seq, am, logits, _ = cached_greedy(model, ids, mask, steps=12)
    for step, step_logits in enumerate(logits):
        ref = full_forward(model, seq[:, :9 + step], am[:, :9 + step]).logits[:, -1]
        assert torch.allclose(step_logits, ref, atol=1e-4), step


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_in_chunks_and_decoding_without_a_mask(variant):
    """A cache continued by chunks of several columns equals one prefill; a decode step without
    attention_mask continues each row's positions from the real tokens it has seen."""
    model = build(variant, "causal")
    ids, mask = left_padded([12, 7])
    whole = full_forward(model, ids, mask).logits
    with torch.no_grad(), model.routing("causal"):
        cache, seen = None, 0
        for size in (5, 4, 3):
            out = model(ids[:, seen:seen + size], attention_mask=mask[:, :seen + size], cache=cache, use_cache=True)
            cache, seen = out.cache, seen + size
            assert torch.allclose(out.logits, whole[:, seen - size:seen], atol=1e-4), seen
        nxt = out.logits[:, -1:].argmax(-1)
        unmasked = model(nxt, cache=cache).logits[:, -1]
    ref = full_forward(model, torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)).logits[:, -1]
    assert torch.allclose(unmasked, ref, atol=1e-4)
    with pytest.raises(ValueError, match="no columns"), torch.no_grad(), model.routing("causal"):
        model(ids[:, :0], cache=cache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_under_bf16_autocast(variant):
    """Under autocast RoPE leaves keys fp32 and values bf16: the cache keeps each in its own dtype."""
    model = build(variant, "causal")
    ids, mask = left_padded([9, 5, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq, am, logits, _ = cached_greedy(model, ids, mask, steps=8)
        for step, step_logits in enumerate(logits):
            ref = full_forward(model, seq[:, :9 + step], am[:, :9 + step]).logits[:, -1]
            assert torch.equal(step_logits.argmax(-1), ref.argmax(-1)), step
            assert torch.allclose(step_logits.float(), ref.float(), atol=0.05), step


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_left_padded_row_generates_what_it_would_alone(variant):
    model = build(variant, "causal")
    ids, mask = left_padded([9, 4])
    together = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[1:, -4:], attention_mask=mask[1:, -4:], max_new_tokens=12, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(together[1, -12:], alone[0, -12:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_is_cached_causal_decoding_whatever_the_configured_mode(variant):
    model = build(variant, "topk")  # trained models are configured top-k
    if variant == "dtf":
        from .helpers import calibrate_dtf_threshold

        calibrate_dtf_threshold(model)
    ids, mask = left_padded([7, 3])
    seq, *_ = cached_greedy(model, ids, mask, steps=16)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(out, seq)
    assert model.config.routing_mode == "topk"  # restored
    if variant != "standard":  # precondition: the modes differ here, so the test could fail
        with torch.no_grad():
            topk = model(seq, attention_mask=torch.ones_like(seq)).logits
        assert not torch.allclose(topk, full_forward(model, seq, torch.ones_like(seq)).logits, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_is_seeded_and_top_k_1_is_greedy(variant):
    model = build(variant, "causal")
    ids, mask = left_padded([6, 6])
    kw = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(ids, do_sample=True, temperature=1.5, top_p=0.95, **kw))
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(ids, do_sample=False, **kw)
    assert not torch.equal(runs[0], greedy)  # sampling at temperature 1.5 over 97 tokens departs from greedy
    torch.manual_seed(4)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, **kw), greedy)


def test_generation_stops_at_eos():
    model = build("mod", "causal")
    ids, mask = left_padded([6])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(greedy[0, 6 + 3])
    first = next(i for i in range(10) if int(greedy[0, 6 + i]) == eos)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=eos)
    assert out.shape[1] == 6 + first + 1 and int(out[0, -1]) == eos


def _count_tokens_into(module: torch.nn.Module, seen: list[tuple[int, int]]):
    return module.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))


@pytest.mark.parametrize("variant,seed", [("mod", 5), ("dtf", 0)])  # seeds where all three cases occur
def test_a_skipped_token_costs_the_routed_block_nothing(variant, seed):
    """Decode steps call a routed block's projections only for the rows that selected the token;
    a step where no row selects it does not call the block at all."""
    model = build(variant, "causal", **{f"{variant}_capacity": 0.25})
    ids, mask = left_padded([8, 8], seed=seed)
    layer = routed_layers(model)[0]
    seen: list[tuple[int, int]] = []
    with torch.no_grad(), model.routing("causal"):
        out = model(ids, attention_mask=mask, use_cache=True)
        hook = _count_tokens_into(model.model.layers[layer].self_attn.q_proj, seen)
        seq, am = ids, mask
        for _ in range(16):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=am, cache=out.cache)
        hook.remove()
    selected = full_forward(model, seq, am).routing_masks[layer][:, ids.shape[1]:]  # [B, 16] decode steps
    want = [(int(col.sum()), 1) for col in selected.T if col.any()]
    assert seen == want
    counts = selected.sum(0)
    assert (counts == 1).any() and (counts == 0).any() and (counts == 2).any(), f"precondition: {counts}"


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_causal_routing_runs_a_block_on_its_selected_tokens_only(variant):
    """Full-sequence `causal` mode: the routed block's input is [rows that select, largest count], not [B, T]."""
    model = build(variant, "causal")
    x = tokens(3, 40, seed=2)
    layer = routed_layers(model)[0]
    seen: list[tuple[int, int]] = []
    hook = _count_tokens_into(model.model.layers[layer].self_attn.q_proj, seen)
    masks = full_forward(model, x, None).routing_masks
    hook.remove()
    counts = masks[layer].sum(1)
    assert seen == [(int((counts > 0).sum()), int(counts.max()))]
    assert int(counts.max()) < 40, "precondition: the block skipped tokens"


# ---- forward refuses what it does not support --------------------------------------------------
def test_forward_refuses_what_it_does_not_support():
    from transformers import DynamicCache

    model = build("mod", "causal")
    x = tokens(2, 8)
    with pytest.raises(TypeError, match="inputs_embeds"):
        model(x, inputs_embeds=torch.zeros(2, 8, 32))
    with pytest.raises(TypeError, match="head_mask"):
        model(x, head_mask=torch.ones(2))
    with pytest.raises(TypeError, match="DTLabCache"):
        model(x, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)
    with pytest.raises(ValueError, match="causal routing"):
        build("mod", "topk")(x, use_cache=True)
    with pytest.raises(ValueError, match="inference"):
        model.train()(x, use_cache=True)
    model.eval()
    cache = model(x, use_cache=True).cache
    with pytest.raises(ValueError, match="attention_mask"):
        model(x[:, :1], attention_mask=torch.ones(2, 1), cache=cache)  # must cover the 8 columns seen too
    with pytest.raises(ValueError, match="batch"):
        model(x[:1, :1], cache=cache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_with_the_cache_equals_beam_search_without(variant):
    """Beam search reorders the cache's rows (each beam keeps the routed tokens of its own history);
    at this size a cache that is not reordered gives other beams for every variant (checked)."""
    model = build(variant, "causal")
    ids, mask = left_padded([7, 4])
    kw = dict(attention_mask=mask, max_new_tokens=16, num_beams=4, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reordered_cache_continues_each_row_at_its_own_position(variant):
    """`reorder_cache` (beam search) moves every per-row count with the rows, `real_B` included: a step
    without attention_mask after a reorder continues each row from its own real tokens."""
    model = build(variant, "causal")
    ids, mask = left_padded([9, 5, 2])
    idx = torch.tensor([2, 0, 0])  # rows swap and repeat, as beams do (then differ: each extends its own copy)
    fed = tokens(3, 6, seed=4).clamp_min(1)
    with torch.no_grad(), model.routing("causal"):
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        cache.reorder_cache(idx)
        assert torch.equal(cache.real_B, mask.sum(1)[idx])
        got = [model(fed[:, t:t + 1], cache=cache).logits[:, -1] for t in range(fed.shape[1])]
    for t, logits in enumerate(got):
        ref = full_forward(model, torch.cat([ids[idx], fed[:, :t + 1]], 1),
                           torch.cat([mask[idx], torch.ones_like(fed[:, :t + 1])], 1)).logits[:, -1]
        assert torch.allclose(logits, ref, atol=1e-4), (t, (logits - ref).abs().amax(-1))


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_a_routed_cache_at_batch_8_grows_with_its_rows_not_the_batch(variant, monkeypatch):
    """At B = 8 each row of a routed block attends over the key slots of its own stored tokens (the
    slots read for a decode step are exactly the selecting rows' counts), each row's buffers hold fewer
    than its count plus `KVStore.GROW` slots, and the block's bytes are those of its tokens, not of a
    dense layer's. (Its length bound used to grow by the whole chunk on every call: each routed query
    read every step's slots and the buffers grew like a dense layer's.)"""
    from dtlab.models import layers as layers_mod

    model = build(variant, "causal", **({"mod_use_predictor": True} if variant == "mod" else {}))
    ids, mask = left_padded([12, 9, 12, 5, 12, 7, 12, 3], seed=1)
    routed = routed_layers(model)
    fed = tokens(8, 40, seed=2)  # the decode steps feed these columns (greedy text repeats itself)
    seq, am = torch.cat([ids, fed], 1), torch.cat([mask, torch.ones_like(fed)], 1)
    _route_a_fraction(model, seq, am, 0.2)
    current, read = [None], {i: 0 for i in routed}  # key slots read per routed layer in one step
    for i in routed:
        model.model.layers[i].self_attn.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
    for i in set(range(len(model.model.layers))) - set(routed):
        model.model.layers[i].self_attn.register_forward_pre_hook(lambda m, a: current.__setitem__(0, None))
    real_attend = layers_mod.attend

    def counting_attend(q, k, v, mask, causal=True):
        if current[0] is not None:
            read[current[0]] += k.shape[0] * k.shape[2]
        return real_attend(q, k, v, mask, causal)

    monkeypatch.setattr(layers_mod, "attend", counting_attend)
    P = ids.shape[1]
    with torch.no_grad(), model.routing("causal"):
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.cache
        for t in range(P, seq.shape[1]):
            before = {i: cache.stored(i).clone() for i in routed}
            read.update({i: 0 for i in routed})
            out = model(seq[:, t:t + 1], attention_mask=am[:, :t + 1], cache=cache)
            for i in routed:
                stored = cache.stored(i)
                selecting = stored > before[i]
                assert read[i] == int(stored[selecting].sum()), (i, read[i], stored.tolist(), selecting.tolist())
                assert (cache.slots(i) < stored + cache.layers[i].GROW).all(), (i, cache.slots(i), stored)
    ref = full_forward(model, seq, am)
    assert torch.allclose(out.logits[:, -1], ref.logits[:, -1], atol=1e-4)
    for i in routed:  # precondition: rows differ, and a routed layer holds far fewer than the columns
        assert torch.equal(cache.stored(i), ref.routing_masks[i].sum(1))
        stored = cache.stored(i)
        assert stored.min() < stored.max() and stored.max() + cache.layers[i].GROW < seq.shape[1], stored
        assert cache.nbytes(i) < cache.nbytes(0) * (stored.sum() + 8 * cache.layers[i].GROW) / (8 * seq.shape[1])


def _route_a_fraction(model, seq: torch.Tensor, am: torch.Tensor, frac: float) -> None:
    """Set the causal rule of each routed layer (DTF's threshold, MoD's predictor bias) so that it
    selects about `frac` of the tokens of `seq`, layer by layer (a layer's input depends on those before)."""
    for i in routed_layers(model):
        layer = model.model.layers[i]
        module = layer.router if hasattr(layer.router, "threshold") else layer.predictor
        got: list[torch.Tensor] = []
        hook = module.register_forward_hook(
            lambda m, a, out, got=got: got.append(out["gate"] if isinstance(out, dict) else out))
        full_forward(model, seq, am)
        hook.remove()
        cut = float(torch.quantile(got[0][am.bool()].float(), 1 - frac))
        with torch.no_grad():
            if module is layer.router:
                module.threshold.fill_(cut)
            else:
                module.fc2.bias.sub_(cut)
