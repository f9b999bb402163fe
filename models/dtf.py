"""Dynamic Transformer (DTF): depth routed by predictive surprise.

Config: `config.DTFConfig`. Layers come in pairs: a Decision layer (even index: a full block
plus a cheap prior of its own update) and a Dynamic layer (odd index: a routed block whose
gate G compares the decision block's real update with the prior's prediction). An odd last
layer is a plain dense block. This file is DTF's whole difference from Standard.
Shape legend: B batch, T sequence length, K tokens per routed block and row, D hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import DTFConfig
from .layers import MLP, DecoderBlock, KVStore, RMSNorm, Slots, init
from .routing import Context, LayerOutput, RoutedLayer, Routing, causal_window_mean, masked_mean


class DTFDecisionLayer(DecoderBlock):
    """DTF decision layer: the full block plus a cheap prior of its output."""

    aux_loss_weights = {"dtf_prior": "prior_loss_weight"}

    def __init__(self, config: DTFConfig) -> None:
        super().__init__(config)
        self.prior_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.prior = MLP(config.hidden_size, config.prior_intermediate_size)

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None,
                store: KVStore | None = None) -> LayerOutput:
        # differs from standard: also predicts its own update with a small prior network.
        slots = None if store is None else Slots(ctx.real_BT)
        h_post = self.block(x_BTD, ctx.rope, ctx.dense_mask, store, slots)
        # F reads the detached input and the prior loss compares stop_grad(H) + F with
        # stop_grad(H_post), so that loss trains the prior alone: through H it would pull the
        # residual stream towards its own moving target (measured: D_st 0.9 -> 1.8e6 in 300 steps
        # of the quick experiment). The router's prior keeps H attached, H_prior = H + F, so D_ch
        # = mean((update(H) - F)^2): its gradient reaches H through the block's update only.
        h_in = x_BTD.detach()
        f_BTD = self.prior(self.prior_norm(h_in))
        if store is not None:  # cached inference: no loss, no statistics
            return LayerOutput(h_post, (x_BTD, x_BTD + f_BTD), {}, {})
        err_BT = ((h_in + f_BTD).float() - h_post.detach().float()).pow(2).mean(-1)
        prior_loss = masked_mean(err_BT, ctx.key_mask_BT)
        return LayerOutput(h_post, (x_BTD, x_BTD + f_BTD), {"dtf_prior": prior_loss},
                           {"prior_loss": prior_loss.detach()})


class DTFRouter(nn.Module):
    """The four router scalars of a dynamic layer and its causal threshold.

    The threshold and its update count are statistics, kept in fp32 whatever the model is cast to:
    in bf16 a saved 0.7514 reads 0.75 (moving the realised causal capacity far from c), and an EMA
    step of 1% cannot move it at all. Unlike RoPE's frequencies they are saved and loaded, so a
    cast keeps their fp32 VALUE (`_apply`); they are made fp32 explicitly, so that transformers'
    `from_pretrained(..., dtype=torch.bfloat16)`, which loads each tensor in the dtype the freshly
    built model gives it, loads the checkpoint's fp32 value as it is.
    """

    threshold: torch.Tensor  # buffers (annotations only: `register_buffer` sets them)
    threshold_updates: torch.Tensor
    FP32_BUFFERS = ("threshold", "threshold_updates")

    def __init__(self, config: DTFConfig) -> None:
        super().__init__()
        self.config = config
        if config.beta_mode == "learnable":
            self.beta_ce = nn.Parameter(torch.tensor(float(config.beta_ce_init)))
            self.beta_cu = nn.Parameter(torch.tensor(float(config.beta_cu_init)))
        self.log_o_ce = nn.Parameter(torch.tensor(math.log(config.o_ce_init)))  # o_ce = exp(.) > 0
        self.m_cu = nn.Parameter(torch.tensor(float(config.m_cu_init)))
        # Running (1 - c) quantile of G, updated in training; `causal` mode selects G >= it.
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.tensor(0.0, dtype=torch.float32))
        # the ranks the threshold's statistics are averaged over (None: the default group); set by
        # `set_process_group` when one worker group trains several runs side by side
        self.process_group: dist.ProcessGroup | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DTFRouter:
        kept = {name: getattr(self, name) for name in self.FP32_BUFFERS}  # the tensors before `fn`
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32 and before.dtype == torch.float32:  # cast: the fp32 value, moved
                setattr(self, name, before.to(device=after.device))
        return self

    def reset_parameters(self) -> None:
        c = self.config
        with torch.no_grad():
            if c.beta_mode == "learnable":
                init.constant_(self.beta_ce, float(c.beta_ce_init))
                init.constant_(self.beta_cu, float(c.beta_cu_init))
            init.constant_(self.log_o_ce, math.log(c.o_ce_init))
            init.constant_(self.m_cu, float(c.m_cu_init))
            init.constant_(self.threshold, 0.5)
            init.zeros_(self.threshold_updates)

    def temperatures(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The temperatures t_ce, t_cu that multiply CE and CU: softplus of the learnable betas, or
        the scheduled values themselves (a 0.1 -> 100 schedule runs 0.1 -> 100)."""
        c = self.config
        if c.beta_mode == "learnable":
            return F.softplus(self.beta_ce), F.softplus(self.beta_cu)
        p = (step.float() / c.beta_schedule_steps).clamp(0.0, 1.0)
        if c.beta_schedule == "cosine":
            p = 0.5 * (1.0 - torch.cos(math.pi * p))
        t_ce = c.beta_ce_start + (c.beta_ce_end - c.beta_ce_start) * p
        return t_ce, c.beta_cu_start + (c.beta_cu_end - c.beta_cu_start) * p

    @torch.no_grad()
    def update_threshold(self, gate_BT: torch.Tensor, idx_BK: torch.Tensor, key_mask_BT: torch.Tensor | None) -> None:
        """EMA of the mean per-row k-th largest gate, the (1 - c) quantile of G, over every row of
        every DDP rank; the first update takes the batch's value."""
        g_BK = gate_BT.gather(1, idx_BK)
        ok_BK = torch.ones_like(g_BK, dtype=torch.bool) if key_mask_BT is None else key_mask_BT.gather(1, idx_BK)
        row_min_B = g_BK.masked_fill(~ok_BK, float("inf")).amin(1)
        row_ok_B = ok_BK.any(1)
        sum_n = torch.stack([row_min_B.where(row_ok_B, 0.0).sum(), row_ok_B.sum().float()])
        group = self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sum_n, group=group)  # every rank of the run keeps the same estimate
        q = sum_n[0] / sum_n[1].clamp_min(1.0)
        m = self.config.dtf_threshold_momentum
        new = torch.where(self.threshold_updates > 0, m * self.threshold + (1 - m) * q, q)
        self.threshold.copy_(torch.where(sum_n[1] > 0, new, self.threshold))
        self.threshold_updates.add_(1.0)

    def moving_average(self, d_st_BT: torch.Tensor, key_mask_BT: torch.Tensor | None,
                       store: KVStore | None) -> torch.Tensor:
        """MA(D_st): the mean over the previous `ma_window` columns of the row (real tokens only)."""
        W = self.config.ma_window
        if store is None:
            return causal_window_mean(d_st_BT, W, key_mask_BT)
        T = d_st_BT.shape[1]
        ok_BT = torch.ones_like(d_st_BT, dtype=torch.bool) if key_mask_BT is None else key_mask_BT
        if "d_st" in store.extra:
            d_st_BT = torch.cat([store.extra["d_st"], d_st_BT], 1)
            ok_BT = torch.cat([store.extra["d_st_ok"], ok_BT], 1)
        store.extra["d_st"], store.extra["d_st_ok"] = d_st_BT[:, -W:], ok_BT[:, -W:]
        return causal_window_mean(d_st_BT, W, ok_BT)[:, -T:]

    def forward(self, h_BTD: torch.Tensor, h_post_BTD: torch.Tensor, h_prior_BTD: torch.Tensor, ctx: Context,
                store: KVStore | None = None) -> dict[str, torch.Tensor]:
        """The gate G [B, T] and its parts, all fp32 (spec section 3). With a KV `store` (cached
        inference) the moving average also reads the surprise of the W columns before these."""
        with torch.autocast(h_BTD.device.type, enabled=False):
            h, h_post, h_prior = h_BTD.float(), h_post_BTD.float(), h_prior_BTD.float()
            d_st = (h_post - h).pow(2).mean(-1)  # static surprise
            d_ch = (h_post - h_prior).pow(2).mean(-1)  # change surprise
            o_ce = self.log_o_ce.exp()
            ce = d_st - (d_ch - torch.log(o_ce + 1e-10))  # expected change
            ma = self.moving_average(d_st.detach(), ctx.key_mask_BT, store)
            cu = d_st - self.m_cu * ma  # unexpected change
            t_ce, t_cu = self.temperatures(ctx.step)
            s_ce = torch.sigmoid(t_ce * ce)
            s_cu = torch.sigmoid(t_cu * cu)
            gate = s_ce + s_cu - s_ce * s_cu  # probabilistic OR
        return dict(gate=gate, d_st=d_st, d_ch=d_ch, ce=ce, cu=cu, s_ce=s_ce, s_cu=s_cu,
                    temp_ce=t_ce, temp_cu=t_cu, o_ce=o_ce, m_cu=self.m_cu)


class DTFDynamicLayer(RoutedLayer):
    """DTF dynamic layer: the block runs on the tokens with the highest surprise gate G."""

    def __init__(self, config: DTFConfig) -> None:
        super().__init__(config)
        self.router = DTFRouter(config)

    def route(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None, store: KVStore | None) -> Routing:
        # differs from standard: G, from the decision layer's real update (x = H_post) against
        # its prior's prediction, ranks the tokens and scales the block's change.
        assert carry is not None, "a DTF dynamic layer must follow its decision layer"
        h_BTD, h_prior_BTD = carry
        parts = self.router(h_BTD, x_BTD, h_prior_BTD, ctx, store)
        g_BT, key_mask = parts["gate"], ctx.key_mask_BT
        causal_BT = g_BT >= self.router.threshold  # the threshold as it stood before this pass
        if store is not None:  # cached inference: the decision only, no statistics
            return Routing(g_BT, g_BT, causal_BT, g_BT, {})
        stats = {name: masked_mean(parts[name].detach(), key_mask) for name in ("d_st", "d_ch", "ce", "cu",
                                                                                 "s_ce", "s_cu")}
        stats.update({name: torch.as_tensor(parts[name]).detach().float()
                      for name in ("temp_ce", "temp_cu", "o_ce", "m_cu")})
        stats["threshold"] = self.router.threshold.detach().clone()
        logit_BT = torch.logit(g_BT.detach().clamp(1e-6, 1 - 1e-6))
        return Routing(g_BT, g_BT, causal_BT, logit_BT, stats)

    def on_topk(self, routing: Routing, idx_BK: torch.Tensor, topk_BT: torch.Tensor,
                ctx: Context) -> dict[str, torch.Tensor]:
        # differs from standard: training moves the causal threshold towards this batch's quantile.
        if ctx.training:
            self.router.update_threshold(routing.gate_BT.detach(), idx_BK, ctx.key_mask_BT)
        return {}


def set_process_group(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Average DTF's threshold statistics over `group` (one run's ranks) instead of every rank."""
    for module in model.modules():
        if isinstance(module, DTFRouter):
            module.process_group = group
