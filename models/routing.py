"""Token routing shared by MoD and DTF: the `RoutedLayer` template, top-k, the routed update.

A routed layer is the shared `DecoderBlock` plus a router. Subclasses (`mod.MoDLayer`,
`dtf.DTFDynamicLayer`) supply only `route()`, which scores the tokens and returns a typed
`Routing`, and optionally `on_topk()`, which learns from the training-time top-k decision;
selecting, applying the update and collecting statistics happen here, once, for both.

Shape legend: B batch, T sequence length, K tokens a routed block takes per row (k), D hidden.
Everything here keeps shapes static (k is a Python int from the config and T), computes
routing math in fp32 and never reads a tensor value on the host, so forward has no syncs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from .flops import capacity_k
from .layers import DecoderBlock, KVStore, Rope, Slots, sdpa_mask

if TYPE_CHECKING:
    from .config import DTLabConfig


class Context(NamedTuple):
    """What every layer of one forward pass needs besides its input."""

    rope: Rope  # cos/sin at positions 0..T-1 (or the given position ids)
    key_mask_BT: torch.Tensor | None  # True for real tokens; None when there is no padding
    dense_mask: torch.Tensor | None  # SDPA mask of the dense blocks (None = plain causal)
    routing_mode: str  # "topk" | "causal"
    step: torch.Tensor  # training step (scalar tensor), read by scheduled DTF temperatures
    training: bool
    real_BT: torch.Tensor | None = None  # cached inference: key_mask_BT, None when every token is real


class LayerOutput(NamedTuple):
    x: torch.Tensor
    carry: tuple | None  # DTF decision -> dynamic hand-over: (H, H_prior)
    aux: dict[str, torch.Tensor]  # unweighted auxiliary losses, with gradients
    stats: dict[str, torch.Tensor]  # detached statistics: 0-d, or [T] by position
    selected: torch.Tensor | None = None  # [B, T] bool: the tokens a routed block processed


class Routing(NamedTuple):
    """A router's decision for one layer and batch; [B, T] tensors, fp32 unless noted."""

    score_BT: torch.Tensor  # ranked per row by top-k (training semantics: looks at the whole row)
    gate_BT: torch.Tensor  # scales the block's change of each selected token
    causal_BT: torch.Tensor  # bool: the `causal` decision, from tokens <= t only
    logit_BT: torch.Tensor  # the router's logit, for statistics
    stats: dict[str, torch.Tensor]  # the router's own detached statistics
    extra: Any = None  # what `on_topk` needs beyond the above (e.g. MoD's predictor logits)


class RoutedLayer(DecoderBlock):
    """A `DecoderBlock` that processes only the tokens its router selects.

    Selected tokens: `x + gate * (Block(x) - x)`; the others pass bit for bit. In `topk` mode
    each row's k = max(1, floor(c T)) best-scored tokens are selected (sorted, so the block
    stays causal in the original order); in `causal` mode the router's causal decision is.
    """

    # Auxiliary losses this layer returns, and the config field that weighs each.
    aux_loss_weights: ClassVar[dict[str, str]] = {}

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__(config)
        assert config.capacity is not None, "a routed layer's config names its capacity"
        self.capacity: float = config.capacity
        self.force_unit_gate = config.force_unit_gate  # ablation: gate = 1 (contract item 4)

    def route(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None, store: KVStore | None) -> Routing:
        """Score the tokens. `store` is set in cached inference (a router may keep state in `extra`)."""
        raise NotImplementedError

    def on_topk(self, routing: Routing, idx_BK: torch.Tensor, topk_BT: torch.Tensor,
                ctx: Context) -> dict[str, torch.Tensor]:
        """After `route`: what the router learns from the top-k decision (auxiliary losses)."""
        return {}

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None,
                store: KVStore | None = None) -> LayerOutput:
        T, key_mask = x_BTD.shape[1], ctx.key_mask_BT
        r = self.route(x_BTD, ctx, carry, store)
        if store is not None:  # cached inference: causal routing, nothing learnt, no statistics
            causal_BT = r.causal_BT if key_mask is None else r.causal_BT & key_mask
            gate_BT = torch.ones_like(r.gate_BT) if self.force_unit_gate else r.gate_BT
            return LayerOutput(causal_update(self, x_BTD, gate_BT, causal_BT, ctx, store), None, {}, {}, causal_BT)
        idx_BK = topk_sorted(r.score_BT, capacity_k(self.capacity, T), key_mask)
        topk_BT = membership(idx_BK, T)
        aux = self.on_topk(r, idx_BK, topk_BT, ctx)
        causal_BT = r.causal_BT if key_mask is None else r.causal_BT & key_mask
        gate_BT = torch.ones_like(r.gate_BT) if self.force_unit_gate else r.gate_BT
        if ctx.routing_mode == "topk":
            x_BTD, sel_BT = routed_update(self, x_BTD, gate_BT, ctx, idx_BK=idx_BK), topk_BT
        else:
            # Gathering a variable number of tokens reads counts on the host: inference only. With
            # gradients or under torch.compile, the same update runs over all T tokens, masked.
            static = torch.is_grad_enabled() or torch.compiler.is_compiling()
            update = masked_causal_update if static else causal_update
            x_BTD, sel_BT = update(self, x_BTD, gate_BT, causal_BT, ctx), causal_BT
        stats = selection_stats(sel_BT, topk_BT, causal_BT, r.gate_BT.detach(), r.logit_BT.detach(), key_mask)
        stats.update(r.stats)
        stats.update({k: v.detach() for k, v in aux.items()})
        return LayerOutput(x_BTD, None, aux, stats, sel_BT)


def topk_sorted(scores_BT: torch.Tensor, k: int, key_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """Per row, the positions of the k highest scores, SORTED ascending: [B, K].

    Sorting keeps the original token order, so causal attention over the gathered tokens
    is causal in the original sequence (an unsorted top-k lets tokens see the future).
    Padding ranks below every real token: it fills slots only when a row has fewer than k
    real tokens.
    """
    if key_mask_BT is not None:
        scores_BT = scores_BT.masked_fill(~key_mask_BT, float("-inf"))
    idx_BK = scores_BT.topk(k, dim=1, sorted=False).indices
    return idx_BK.sort(dim=1).values


def routed_update(
    layer: DecoderBlock,
    x_BTD: torch.Tensor,
    gate_BT: torch.Tensor,
    ctx: Context,
    idx_BK: torch.Tensor,
) -> torch.Tensor:
    """Top-k routing: the k tokens `idx_BK` of each row get `x + gate * (Block(x) - x)`; others
    keep `x`, bit for bit. The block sees only the selected tokens [B, K, D]: they attend to each
    other, causally in their original order, with RoPE at their original positions."""
    B, K = idx_BK.shape
    idx_BKD = idx_BK[..., None].expand(B, K, x_BTD.shape[-1])
    x_BKD = x_BTD.gather(1, idx_BKD)
    key_ok_BK = None if ctx.key_mask_BT is None else ctx.key_mask_BT.gather(1, idx_BK)
    y_BKD = layer.block(x_BKD, ctx.rope.gather(idx_BK), sdpa_mask(key_ok_BK, K, x_BTD.device))
    g_BK1 = gate_BT.gather(1, idx_BK)[..., None]
    return x_BTD.scatter(1, idx_BKD, x_BKD + (g_BK1 * (y_BKD - x_BKD)).to(x_BTD.dtype))


def masked_causal_update(layer: DecoderBlock, x_BTD: torch.Tensor, gate_BT: torch.Tensor, sel_BT: torch.Tensor,
                         ctx: Context) -> torch.Tensor:
    """`causal_update` with static shapes (no host sync, compilable, differentiable): the block runs
    over all T tokens with attention restricted to the selected keys; only selected outputs are kept."""
    y_BTD = layer.block(x_BTD, ctx.rope, sdpa_mask(sel_BT, x_BTD.shape[1], x_BTD.device))
    update_BTD = x_BTD + (gate_BT[..., None] * (y_BTD - x_BTD)).to(x_BTD.dtype)
    return torch.where(sel_BT[..., None], update_BTD, x_BTD)


def causal_update(
    layer: DecoderBlock,
    x_BTD: torch.Tensor,
    gate_BT: torch.Tensor,
    sel_BT: torch.Tensor,
    ctx: Context,
    store: KVStore | None = None,
) -> torch.Tensor:
    """Causal routing: a variable number of tokens per row, `sel_BT` (real tokens only), get the
    routed update; the others keep `x`, bit for bit, and cost the block nothing.

    The selected tokens are gathered in order into [R, N, D], N the largest count of a row, R the
    rows that selected any (rows that selected nothing are not computed at all), and the block runs
    on them alone, with RoPE at their original positions; with a KV `store` they also attend to the
    tokens this block processed before, and are stored. Reads the counts on the host (one sync).
    """
    T = x_BTD.shape[1]
    n_B = sel_BT.sum(1)
    counts = n_B.tolist()
    if max(counts) == 0:
        return x_BTD
    row_ids = None if min(counts) > 0 else [b for b, n in enumerate(counts) if n > 0]
    rows = None if row_ids is None else torch.tensor(row_ids, device=x_BTD.device)
    counts_R = [n for n in counts if n > 0]  # host counts of these R rows: the store sizes its reads by them
    if all(c in (0, T) for c in counts):  # rows take all their tokens or none (every decode step): no gather
        out_RTD = _whole_rows_update(layer, _rows(x_BTD, rows), _rows(gate_BT, rows), _rope_rows(ctx.rope, rows),
                                     store, row_ids)
    else:
        out_RTD = _gathered_update(layer, _rows(x_BTD, rows), _rows(gate_BT, rows), _rows(sel_BT, rows),
                                   _rows(n_B, rows), counts_R, _rope_rows(ctx.rope, rows), store, row_ids)
    return out_RTD if rows is None else x_BTD.index_copy(0, rows, out_RTD)


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _rope_rows(rope: Rope, rows: torch.Tensor | None) -> Rope:
    """The RoPE tables of `rows` (tables shared by every row stay as they are)."""
    return rope if rows is None or rope.cos.shape[0] == 1 else Rope(rope.cos[rows], rope.sin[rows])


def _gathered_update(layer: DecoderBlock, x_RTD: torch.Tensor, gate_RT: torch.Tensor, sel_RT: torch.Tensor,
                     n_R: torch.Tensor, counts_R: list[int], rope: Rope,
                     store: KVStore | None, rows: list[int] | None) -> torch.Tensor:
    """`causal_update` of rows that select some of their tokens: gathered in order into [R, N, D]
    (`n_R` the counts, `counts_R` the same on the host, N their largest)."""
    R, _, D = x_RTD.shape
    N = max(counts_R)
    # selected positions first, in their original order (a stable sort of "not selected")
    idx = torch.sort((~sel_RT).to(torch.uint8), dim=1, stable=True).indices[:, :N]
    ok_RN = torch.arange(N, device=x_RTD.device) < n_R[:, None]
    idx_RND = idx[..., None].expand(R, N, D)
    x_RND = x_RTD.gather(1, idx_RND)
    if store is None:
        y_RND = layer.block(x_RND, rope.gather(idx), sdpa_mask(ok_RN, N, x_RTD.device))
    else:
        y_RND = layer.block(x_RND, rope.gather(idx), None, store, Slots(None, rows, counts_R))
    g_RN1 = gate_RT.gather(1, idx)[..., None]
    new_RND = torch.where(ok_RN[..., None], x_RND + (g_RN1 * (y_RND - x_RND)).to(x_RTD.dtype), x_RND)
    return x_RTD.scatter(1, idx_RND, new_RND)


def _whole_rows_update(layer: DecoderBlock, x_RTD: torch.Tensor, g_RT: torch.Tensor, rope: Rope,
                       store: KVStore | None, rows: list[int] | None) -> torch.Tensor:
    """`causal_update` of rows that each selected every one of their T tokens: no gather."""
    R, T = g_RT.shape
    if store is None:
        y = layer.block(x_RTD, rope, None)
    else:
        y = layer.block(x_RTD, rope, None, store, Slots(None, rows, [T] * R))
    return x_RTD + (g_RT[..., None] * (y - x_RTD)).to(x_RTD.dtype)


def router_logits(weight_1D: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
    """r = w . x in fp32 (autocast off), [B, T]."""
    with torch.autocast(x_BTD.device.type, enabled=False):
        return (x_BTD.float() @ weight_1D.float().t()).squeeze(-1)


def membership(idx_BK: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] bool: True where a token is among its row's top-k."""
    out = torch.zeros(idx_BK.shape[0], T, dtype=torch.bool, device=idx_BK.device)
    return out.scatter(1, idx_BK, True)


def masked_mean(v: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    """Mean of v [B, T] over real tokens."""
    if mask_BT is None:
        return v.mean()
    m = mask_BT.to(v.dtype)
    return (v * m).sum() / m.sum().clamp_min(1.0)


def masked_std(v: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    mean = masked_mean(v, mask_BT)
    return masked_mean((v - mean).pow(2), mask_BT).sqrt()


def causal_window_mean(v_BT: torch.Tensor, window: int, valid_BT: torch.Tensor | None) -> torch.Tensor:
    """Mean of v over the previous `window` positions of the same row (t excluded).

    Positions with no previous (real) token use their own value. Built from prefix sums, so
    position t reads only positions < t: causal by construction.
    """
    B, T = v_BT.shape
    c_BT = torch.ones_like(v_BT) if valid_BT is None else valid_BT.to(v_BT.dtype)
    sum_BT1 = F.pad((v_BT * c_BT).cumsum(1), (1, 0))  # [B, T+1]: entry t = sum over s < t
    cnt_BT1 = F.pad(c_BT.cumsum(1), (1, 0))
    lo_T = (torch.arange(T, device=v_BT.device) - window).clamp_min(0)
    num_BT = sum_BT1[:, :T] - sum_BT1[:, lo_T]
    den_BT = cnt_BT1[:, :T] - cnt_BT1[:, lo_T]
    return torch.where(den_BT > 0.5, num_BT / den_BT.clamp_min(1.0), v_BT)


def selection_stats(
    sel_BT: torch.Tensor,
    topk_BT: torch.Tensor,
    causal_BT: torch.Tensor,
    gate_BT: torch.Tensor,
    logit_BT: torch.Tensor,
    key_mask_BT: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Detached per-layer statistics of the decision actually applied (`sel_BT`): 0-d tensors,
    and `selected_by_pos` [T], the selected fraction at each position over the batch."""
    with torch.no_grad():
        m_BT = torch.ones_like(gate_BT) if key_mask_BT is None else key_mask_BT.to(gate_BT.dtype)
        return {
            "selected_frac": masked_mean(sel_BT.to(gate_BT.dtype), key_mask_BT),
            "selected_by_pos": (sel_BT.to(gate_BT.dtype) * m_BT).sum(0) / m_BT.sum(0).clamp_min(1.0),
            "gate_mean": masked_mean(gate_BT, key_mask_BT),
            "gate_std": masked_std(gate_BT, key_mask_BT),
            "router_logit_mean": masked_mean(logit_BT, key_mask_BT),
            "router_logit_std": masked_std(logit_BT, key_mask_BT),
            "causal_frac": masked_mean(causal_BT.to(gate_BT.dtype), key_mask_BT),
            "causal_agreement": masked_mean((causal_BT == topk_BT).to(gate_BT.dtype), key_mask_BT),
        }
