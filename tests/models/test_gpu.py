"""The contract on a CUDA device: bf16 autocast, the flash/efficient SDPA paths, no host syncs."""

import pytest
import torch

from tests.models.helpers import VARIANT_MODES, build, routed_layers, tokens

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("variant,mode", VARIANT_MODES)
def test_bf16_train_step_without_host_sync(variant, mode):
    model = build(variant, mode).cuda().train()
    x = tokens(4, 64).cuda()
    model(x, labels=x)  # first call: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, labels=x, return_logits=False)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()
    for i in routed_layers(model) if variant != "standard" else ():
        if mode == "topk":
            assert (out.routing_masks[i].sum(1) == 32).all()


@pytest.mark.parametrize("variant", ["standard", "mod", "dtf"])
def test_cuda_matches_cpu_in_fp32(variant):
    model = build(variant)
    x = tokens(2, 32)
    with torch.no_grad():
        cpu = model(x).logits
        gpu = model.cuda()(x.cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4), (cpu - gpu).abs().max()


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_no_cross_sample_leakage_bf16(variant):
    model = build(variant).cuda()
    x = tokens(3, 64).cuda()
    y = x.clone()
    y[2] = tokens(1, 64, seed=3)[0].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:2].float(), b[:2].float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("variant", ["standard", "mod", "dtf"])
def test_cached_decoding_on_cuda_matches_full_forwards(variant):
    from tests.models.test_generation import cached_greedy, full_forward, left_padded

    model = build(variant, "causal").cuda()
    ids, mask = left_padded([9, 5, 2])
    seq, am, logits, _ = cached_greedy(model, ids.cuda(), mask.cuda(), steps=16)
    P = ids.shape[1]
    for step, step_logits in enumerate(logits):
        ref = full_forward(model, seq[:, :P + step], am[:, :P + step]).logits[:, -1]
        assert torch.equal(step_logits.argmax(-1), ref.argmax(-1)), step
        assert torch.allclose(step_logits, ref, atol=1e-4), (step, (step_logits - ref).abs().max())


def _sdpa_kernels(fn) -> list[str]:
    """Names of the attention kernels CUDA ran during `fn()`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    return sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "efficient", "attention",
                                                                     "cudnn")))


@pytest.mark.parametrize("variant", ["standard", "mod", "dtf"])
def test_padded_and_routed_attention_never_takes_the_math_kernel(variant):
    """SDPA with a mask and `enable_gqa` falls back to the math kernel on CUDA: padded batches, causal
    routing and cached decoding must run with the math kernel disabled. Records which kernels ran."""
    import json
    import os

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(variant, "causal").cuda()
    x = tokens(3, 64).cuda()
    mask = torch.ones_like(x)
    mask[1, :20] = 0
    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    kernels = {}
    with torch.no_grad(), sdpa_kernel(fast), torch.autocast("cuda", dtype=torch.bfloat16):
        kernels["padded_forward"] = _sdpa_kernels(lambda: model(x, attention_mask=mask))
        with model.routing("topk"):
            kernels["padded_topk"] = _sdpa_kernels(lambda: model(x, attention_mask=mask))
        kernels["generate"] = _sdpa_kernels(lambda: model.generate(x, attention_mask=mask, max_new_tokens=8,
                                                                    do_sample=False, pad_token_id=0))
    if os.environ.get("DTLAB_GPU_OUT"):
        out = os.path.join(os.environ["DTLAB_GPU_OUT"], f"sdpa_kernels_{variant}.json")
        with open(out, "w") as f:
            json.dump(kernels, f, indent=1)
    # the guard is SDPA raising with the math kernel disabled; the lists say which fused kernel ran
    assert all(kernels.values()), kernels
