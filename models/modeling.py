"""Standard, MoD and DTF causal LMs: one model class, per-layer structure as data.

`config.layer_kinds` names each layer's class; the forward loop is the same for every variant.
Shape legend: B batch, T sequence length, K tokens per routed block and row, D hidden, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import DTFConfig, DTLabConfig, MoDConfig
from .layers import MLP, DecoderBlock, RMSNorm, RotaryEmbedding, sdpa_mask
from .routing import (
    Context,
    LayerOutput,
    capacity_k,
    causal_window_mean,
    masked_mean,
    membership,
    routed_update,
    selection_stats,
    topk_sorted,
)

try:  # transformers >= 5: initialisers that respect weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


class DenseLayer(DecoderBlock):
    """A plain Qwen2 block (all of Standard; layer 0, 2, ... of MoD)."""

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None) -> LayerOutput:
        return LayerOutput(self.block(x_BTD, ctx.rope, ctx.dense_mask), carry, {}, {})


def _router_logits(weight_1D: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
    """r = w . x in fp32 (autocast off), [B, T]."""
    with torch.autocast(x_BTD.device.type, enabled=False):
        return (x_BTD.float() @ weight_1D.float().t()).squeeze(-1)


class Predictor(nn.Module):
    """Causal stand-in for top-k membership: D -> D/2 -> 1 with SiLU, on the detached input."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 2)
        self.fc2 = nn.Linear(hidden_size // 2, 1)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_BTD.device.type, enabled=False):
            return self.fc2(F.silu(self.fc1(x_BTD.detach().float()))).squeeze(-1)


class MoDLayer(DecoderBlock):
    """Mixture-of-Depths routed block (Raposo et al. 2024, arXiv 2404.02258, section 3)."""

    # differs from standard: a router picks k tokens per row; only they run the block.

    def __init__(self, config: MoDConfig) -> None:
        super().__init__(config)
        self.router = nn.Linear(config.hidden_size, 1, bias=False)
        self.predictor = Predictor(config.hidden_size) if config.mod_use_predictor else None
        self.capacity = config.mod_capacity
        self.force_unit_gate = config.force_unit_gate

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None) -> LayerOutput:
        B, T, _ = x_BTD.shape
        key_mask = ctx.key_mask_BT
        r_BT = _router_logits(self.router.weight, x_BTD)
        idx_BK = topk_sorted(r_BT, capacity_k(self.capacity, T), key_mask)
        topk_BT = membership(idx_BK, T)
        target_BT = topk_BT.float()
        # Eq. (1) of the paper: the router weight scales the block's change, never the stream.
        gate_BT = torch.ones_like(r_BT) if self.force_unit_gate else torch.sigmoid(r_BT)
        aux = {"mod_aux": masked_mean(F.binary_cross_entropy_with_logits(r_BT, target_BT, reduction="none"), key_mask)}
        if self.predictor is not None:
            p_BT = self.predictor(x_BTD)
            aux["mod_predictor"] = masked_mean(
                F.binary_cross_entropy_with_logits(p_BT, target_BT, reduction="none"), key_mask)
            causal_BT = p_BT > 0.0
        else:
            causal_BT = r_BT > 0.0  # sigmoid(r) > 0.5, made a stand-in for top-k by the aux loss
        if key_mask is not None:
            causal_BT = causal_BT & key_mask
        if ctx.routing_mode == "topk":
            x_BTD, sel_BT = routed_update(self, x_BTD, gate_BT, ctx, idx_BK=idx_BK), topk_BT
        else:
            x_BTD, sel_BT = routed_update(self, x_BTD, gate_BT, ctx, sel_BT=causal_BT), causal_BT
        stats = selection_stats(sel_BT, topk_BT, causal_BT, gate_BT.detach(), r_BT.detach(), key_mask)
        stats.update({k: v.detach() for k, v in aux.items()})
        return LayerOutput(x_BTD, carry, aux, stats)


class DTFDecisionLayer(DecoderBlock):
    """DTF decision layer: the full block plus a cheap prior of its output."""

    # differs from standard: also predicts its own output with a small prior network.

    def __init__(self, config: DTFConfig) -> None:
        super().__init__(config)
        self.prior_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.prior = MLP(config.hidden_size, config.prior_intermediate_size)

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None) -> LayerOutput:
        h_post = self.block(x_BTD, ctx.rope, ctx.dense_mask)
        # The prior is a side network on the detached input: the prior loss trains the prior
        # alone. Through H the loss would pull the residual stream towards stop_grad(H_post)
        # = H + update(H), a chase that grows the stream without bound (measured: D_st 0.9 ->
        # 1.8e6 in 300 steps of the quick experiment; with this detach it stays below 1).
        h_in = x_BTD.detach()
        h_prior = h_in + self.prior(self.prior_norm(h_in))
        err_BT = (h_prior.float() - h_post.detach().float()).pow(2).mean(-1)
        prior_loss = masked_mean(err_BT, ctx.key_mask_BT)
        return LayerOutput(h_post, (x_BTD, h_prior), {"dtf_prior": prior_loss}, {"prior_loss": prior_loss.detach()})


class DTFRouter(nn.Module):
    """The four router scalars of a dynamic layer and its causal threshold."""

    def __init__(self, config: DTFConfig) -> None:
        super().__init__()
        self.config = config
        if config.beta_mode == "learnable":
            self.beta_ce = nn.Parameter(torch.tensor(float(config.beta_ce_init)))
            self.beta_cu = nn.Parameter(torch.tensor(float(config.beta_cu_init)))
        self.log_o_ce = nn.Parameter(torch.tensor(math.log(config.o_ce_init)))  # o_ce = exp(.) > 0
        self.m_cu = nn.Parameter(torch.tensor(float(config.m_cu_init)))
        # Running (1 - c) quantile of G, updated in training; `causal` mode selects G >= it.
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("threshold_updates", torch.tensor(0.0))

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

    def betas(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if c.beta_mode == "learnable":
            return self.beta_ce, self.beta_cu
        p = (step.float() / c.beta_schedule_steps).clamp(0.0, 1.0)
        if c.beta_schedule == "cosine":
            p = 0.5 * (1.0 - torch.cos(math.pi * p))
        beta_ce = c.beta_ce_start + (c.beta_ce_end - c.beta_ce_start) * p
        return beta_ce, c.beta_cu_start + (c.beta_cu_end - c.beta_cu_start) * p

    @torch.no_grad()
    def update_threshold(self, gate_BT: torch.Tensor, idx_BK: torch.Tensor, key_mask_BT: torch.Tensor | None) -> None:
        """EMA of the mean per-row k-th largest gate: the (1 - c) quantile of G."""
        g_BK = gate_BT.gather(1, idx_BK)
        ok_BK = torch.ones_like(g_BK, dtype=torch.bool) if key_mask_BT is None else key_mask_BT.gather(1, idx_BK)
        row_min_B = g_BK.masked_fill(~ok_BK, float("inf")).amin(1)
        row_ok_B = ok_BK.any(1)
        q = row_min_B.where(row_ok_B, 0.0).sum() / row_ok_B.sum().clamp_min(1)
        m = self.config.dtf_threshold_momentum
        new = torch.where(self.threshold_updates > 0, m * self.threshold + (1 - m) * q, q)
        self.threshold.copy_(torch.where(row_ok_B.any(), new, self.threshold))
        self.threshold_updates.add_(1.0)

    def forward(self, h_BTD, h_post_BTD, h_prior_BTD, ctx: Context) -> dict[str, torch.Tensor]:
        """The gate G [B, T] and its parts, all fp32 (spec section 3)."""
        with torch.autocast(h_BTD.device.type, enabled=False):
            h, h_post, h_prior = h_BTD.float(), h_post_BTD.float(), h_prior_BTD.float()
            d_st = (h_post - h).pow(2).mean(-1)  # static surprise
            d_ch = (h_post - h_prior).pow(2).mean(-1)  # change surprise
            o_ce = self.log_o_ce.exp()
            ce = d_st - (d_ch - torch.log(o_ce + 1e-10))  # expected change
            ma = causal_window_mean(d_st.detach(), self.config.ma_window, ctx.key_mask_BT)
            cu = d_st - self.m_cu * ma  # unexpected change
            beta_ce, beta_cu = self.betas(ctx.step)
            s_ce = torch.sigmoid(F.softplus(beta_ce) * ce)
            s_cu = torch.sigmoid(F.softplus(beta_cu) * cu)
            gate = s_ce + s_cu - s_ce * s_cu  # probabilistic OR
        return dict(gate=gate, d_st=d_st, d_ch=d_ch, ce=ce, cu=cu, s_ce=s_ce, s_cu=s_cu,
                    beta_ce=beta_ce, beta_cu=beta_cu, o_ce=o_ce, m_cu=self.m_cu)


class DTFDynamicLayer(DecoderBlock):
    """DTF dynamic layer: the block runs on the top-k tokens by surprise gate G."""

    # differs from standard: G from the decision layer's surprise selects k tokens per row.

    def __init__(self, config: DTFConfig) -> None:
        super().__init__(config)
        self.router = DTFRouter(config)
        self.capacity = config.dtf_capacity
        self.force_unit_gate = config.force_unit_gate

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None) -> LayerOutput:
        assert carry is not None, "a DTF dynamic layer must follow its decision layer"
        h_BTD, h_prior_BTD = carry
        B, T, _ = x_BTD.shape
        key_mask = ctx.key_mask_BT
        parts = self.router(h_BTD, x_BTD, h_prior_BTD, ctx)
        g_BT = parts["gate"]
        idx_BK = topk_sorted(g_BT, capacity_k(self.capacity, T), key_mask)
        topk_BT = membership(idx_BK, T)
        if ctx.training:
            self.router.update_threshold(g_BT.detach(), idx_BK, key_mask)
        causal_BT = g_BT >= self.router.threshold
        if key_mask is not None:
            causal_BT = causal_BT & key_mask
        gate_BT = torch.ones_like(g_BT) if self.force_unit_gate else g_BT
        if ctx.routing_mode == "topk":
            x_BTD, sel_BT = routed_update(self, x_BTD, gate_BT, ctx, idx_BK=idx_BK), topk_BT
        else:
            x_BTD, sel_BT = routed_update(self, x_BTD, gate_BT, ctx, sel_BT=causal_BT), causal_BT
        logit_BT = torch.logit(g_BT.detach().clamp(1e-6, 1 - 1e-6))
        stats = selection_stats(sel_BT, topk_BT, causal_BT, g_BT.detach(), logit_BT, key_mask)
        for name in ("d_st", "d_ch", "ce", "cu", "s_ce", "s_cu"):
            stats[name] = masked_mean(parts[name].detach(), key_mask)
        for name in ("beta_ce", "beta_cu", "o_ce", "m_cu"):
            stats[name] = torch.as_tensor(parts[name]).detach().float()
        stats["threshold"] = self.router.threshold.detach().clone()
        return LayerOutput(x_BTD, None, {}, stats)


LAYER_CLASSES: dict[str, type[nn.Module]] = {
    "dense": DenseLayer,
    "mod": MoDLayer,
    "dtf_decision": DTFDecisionLayer,
    "dtf_dynamic": DTFDynamicLayer,
}
# How the aux losses of several layers combine, and which config field weighs each.
AUX_LOSS_WEIGHTS = {"mod_aux": "mod_aux_loss_weight", "mod_predictor": "mod_predictor_loss_weight",
                    "dtf_prior": "prior_loss_weight"}


@dataclass
class DTLabCausalLMOutput(CausalLMOutputWithPast):
    """`loss` = lm_loss + sum of weighted aux losses; each part and the routing stats, separately."""

    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    routing_stats: dict[int, dict[str, torch.Tensor]] | None = None


class DTLabPreTrainedModel(PreTrainedModel):
    config_class = DTLabConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _no_split_modules = ["DenseLayer", "MoDLayer", "DTFDecisionLayer", "DTFDynamicLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DTFRouter):
            module.reset_parameters()
        elif isinstance(module, RotaryEmbedding):  # buffers are not in checkpoints: recompute
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, DTLabModel):
            init.zeros_(module.schedule_step)


class DTLabModel(DTLabPreTrainedModel):
    """Embedding -> layers (by `config.layer_kinds`) -> final RMSNorm."""

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LAYER_CLASSES[kind](config) for kind in config.layer_kinds)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.register_buffer("schedule_step", torch.tensor(0, dtype=torch.long), persistent=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        ctx = Context(
            rope=self.rotary_emb(position_ids, x.dtype),
            key_mask_BT=key_mask,
            dense_mask=sdpa_mask(key_mask, T, x.device),
            routing_mode=self.config.routing_mode,
            step=self.schedule_step,
            training=self.training,
        )
        aux: dict[str, list[torch.Tensor]] = {}
        stats: dict[int, dict[str, torch.Tensor]] = {}
        carry = None
        for i, layer in enumerate(self.layers):
            x, carry, layer_aux, layer_stats = layer(x, ctx, carry)
            for name, value in layer_aux.items():
                aux.setdefault(name, []).append(value)
            if layer_stats:
                stats[i] = layer_stats
        # Aux losses are averaged over the layers that produce them (spec sections 2 and 3).
        aux_mean = {name: torch.stack(values).mean() for name, values in aux.items()}
        return self.norm(x), aux_mean, stats


def lm_loss_from_logits(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from full logits; labels are shifted here, exactly once."""
    V = logits_BTV.shape[-1]
    y_N = labels_BT[:, 1:].reshape(-1)
    total = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V).float(), y_N, ignore_index=-100, reduction="sum")
    return total / (y_N != -100).sum().clamp_min(1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy(h @ W.T, y) over tokens, chunk by chunk, gradients made in forward.

    Per chunk the fp32 logits [n, V] are turned in place into d(loss)/d(logits)
    (softmax minus one-hot) and multiplied straight into the gradients of h and W, so neither
    the batch's logits nor a recomputation of them are ever needed (cf. Liger-Kernel's fused
    linear cross-entropy). Ignored targets (-100) contribute nothing.
    """

    @staticmethod
    def forward(ctx, h_ND, weight_VD, y_N, chunk_tokens: int):
        w = weight_VD.to(h_ND.dtype)
        grad_h = torch.empty_like(h_ND)
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for start in range(0, h_ND.shape[0], chunk_tokens):
            h, y = h_ND[start:start + chunk_tokens], y_N[start:start + chunk_tokens]
            logits = (h @ w.t()).float()
            valid = y != -100
            y_safe = y.clamp_min(0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total = total + ((lse - logits.gather(1, y_safe).squeeze(1)) * valid).sum()
            logits.sub_(lse[:, None]).exp_()  # softmax, in place
            logits.scatter_add_(1, y_safe, -valid.to(logits.dtype)[:, None])  # minus one-hot
            g = (logits * valid[:, None]).to(h.dtype)
            grad_h[start:start + chunk_tokens] = g @ w
            grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight_VD.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None


def chunked_lm_loss(hidden_BTD, weight_VD, labels_BT, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are shifted here, exactly once.

    fp32 logits exist for at most `chunk_tokens` tokens at a time. With gradients wanted the
    loss and its gradients come from one pass (`_LinearCrossEntropy`); without, plain chunks.
    """
    D = hidden_BTD.shape[-1]
    h_ND = hidden_BTD[:, :-1].reshape(-1, D)
    y_N = labels_BT[:, 1:].reshape(-1)
    count = (y_N != -100).sum().clamp_min(1)
    if torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, weight_VD, y_N, chunk_tokens) / count
    total = h_ND.new_zeros((), dtype=torch.float32)
    w = weight_VD.to(h_ND.dtype)
    for start in range(0, h_ND.shape[0], chunk_tokens):
        logits = (h_ND[start:start + chunk_tokens] @ w.t()).float()
        total = total + F.cross_entropy(logits, y_N[start:start + chunk_tokens], ignore_index=-100, reduction="sum")
    return total / count


class DTLabForCausalLM(DTLabPreTrainedModel):
    """Causal LM head over `DTLabModel`. Subclassed once per variant for the Auto classes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__(config)
        self.model = DTLabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_schedule_step(self, step: int) -> None:
        """Training step read by scheduled DTF temperatures (a buffer: no recompilation)."""
        self.model.schedule_step.fill_(int(step))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> DTLabCausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 real, 0 padding); labels [B, T], unshifted
        (-100 ignored). Returns logits [B, T, V] (unless `return_logits=False`), the total loss,
        `lm_loss`, unweighted `aux_losses` and detached per-layer `routing_stats`.
        """
        hidden_BTD, aux, stats = self.model(input_ids, attention_mask, position_ids)
        logits = self.lm_head(hidden_BTD) if return_logits else None
        loss = lm_loss = None
        if labels is not None:
            if logits is not None:  # computed anyway: no second pass through the head
                lm_loss = lm_loss_from_logits(logits, labels)
            else:
                lm_loss = chunked_lm_loss(hidden_BTD, self.lm_head.weight, labels, self.config.loss_chunk_tokens)
            loss = lm_loss
            for name, value in aux.items():
                loss = loss + getattr(self.config, AUX_LOSS_WEIGHTS[name]) * value
        return DTLabCausalLMOutput(loss=loss, logits=logits, lm_loss=lm_loss, aux_losses=aux, routing_stats=stats)


class StandardForCausalLM(DTLabForCausalLM):
    config_class = DTLabConfig


class MoDForCausalLM(DTLabForCausalLM):
    config_class = MoDConfig


class DTFForCausalLM(DTLabForCausalLM):
    config_class = DTFConfig
