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
    for i in routed_layers(model):
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
