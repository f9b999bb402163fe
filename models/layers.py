"""The one decoder block every variant shares (Qwen2.5: pre-norm, GQA with RoPE, SwiGLU).

Shape legend: B batch, T sequence length, S tokens taking part in a block (T for dense
blocks, k for routed ones), D hidden size, H query heads, Hkv key/value heads, d head dim.
Parameter names follow Hugging Face `Qwen2ForCausalLM`, so checkpoints load by key identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import DTLabConfig

# Initialisers for the models' `_init_weights` (re-exported): transformers >= 5 has ones that
# respect weights already loaded from a checkpoint.
try:
    from transformers import initialization as init  # noqa: F401
except ImportError:  # pragma: no cover
    from torch.nn import init  # type: ignore[no-redef]  # noqa: F401  (same functions, older transformers)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (as Qwen2 does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Rope(NamedTuple):
    """cos/sin tables [B or 1, T, d] for the tokens of the full sequence."""

    cos: torch.Tensor
    sin: torch.Tensor

    def gather(self, idx_BS: torch.Tensor) -> Rope:
        """The tables at the ORIGINAL positions of the selected tokens: [B, S, d]."""
        B, S = idx_BS.shape
        d = self.cos.shape[-1]
        idx = idx_BS[..., None].expand(B, S, d)
        return Rope(self.cos.expand(B, -1, -1).gather(1, idx), self.sin.expand(B, -1, -1).gather(1, idx))


class RotaryEmbedding(nn.Module):
    """RoPE frequencies, kept in fp32 whatever the model is cast to: `model.to(torch.bfloat16)`
    would otherwise round them (angles off by whole radians at long positions)."""

    inv_freq: torch.Tensor  # a buffer (annotation only: `register_buffer` sets it)

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        d = self.head_dim
        return 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # recomputed, not cast back: the rounding is lost
            self.inv_freq = self.compute_inv_freq(self.inv_freq.device)
        return self

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = position_ids_BT[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return Rope(emb.cos().to(dtype), emb.sin().to(dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHSd: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope.cos[:, None], rope.sin[:, None]
    return x_BHSd * cos + _rotate_half(x_BHSd) * sin


def sdpa_mask(key_ok_BS: torch.Tensor | None, S: int, device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, S, S] (True = may attend): causal, keys restricted to `key_ok`.

    Each query may always attend to itself, so no row is empty (no NaN); a query whose own
    key is not allowed is a padding or unselected token whose output is discarded.
    None means plain causal attention (SDPA's `is_causal` fast path).
    """
    if key_ok_BS is None:
        return None
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    eye_SS = torch.eye(S, dtype=torch.bool, device=device)
    return causal_SS & (key_ok_BS[:, None, None, :] | eye_SS)


class Attention(nn.Module):
    """Grouped-query causal self-attention; bias on q/k/v only (Qwen2)."""

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__()
        D, H, Hkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(D, H * d, bias=True)
        self.k_proj = nn.Linear(D, Hkv * d, bias=True)
        self.v_proj = nn.Linear(D, Hkv * d, bias=True)
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: Rope, mask: torch.Tensor | None,
                store: KVStore | None = None, slots: Slots | None = None) -> torch.Tensor:
        """Attention over these S tokens, or, with a `store`, over the tokens the store holds
        for these rows followed by these ones (which it then holds too)."""
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        causal = True
        if store is not None:
            assert slots is not None, "a KV store needs the slots it keeps"
            k, v, mask, causal = store.extend(k, v, slots)
        return self.o_proj(attend(q, k, v, mask, causal).transpose(1, 2).reshape(B, S, -1))


def attend(q_BHSd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor, mask: torch.Tensor | None,
           causal: bool = True) -> torch.Tensor:
    """SDPA; without a mask, causal (or, for one query after the keys, `causal=False`: every key).

    CUDA's SDPA takes the slow math kernel when given both a mask and `enable_gqa`, so with a mask
    the G query heads that share a KV head are folded into the query axis instead ([B, Hkv, G*S, d],
    the mask repeated per head): no copy of the keys and values, and a fused kernel.
    """
    B, H, S, d = q_BHSd.shape
    Hkv = k_BHLd.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLd, is_causal=causal, enable_gqa=H != Hkv)
    if H == Hkv:
        return F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLd, attn_mask=mask)
    G, L = H // Hkv, k_BHLd.shape[2]
    q = q_BHSd.reshape(B, Hkv, G * S, d)  # head h = kv * G + g reads KV head kv
    m = mask.expand(B, 1, S, L)[:, :, None].expand(B, 1, G, S, L).reshape(B, 1, G * S, L)
    return F.scaled_dot_product_attention(q, k_BHLd, v_BHLd, attn_mask=m).reshape(B, H, S, d)


class Slots(NamedTuple):
    """Which of S new tokens a KV store keeps, for cached inference."""

    ok_RS: torch.Tensor | None  # bool: a real token (not padding, and selected when routed); None: all are
    rows: torch.Tensor | None = None  # the batch rows these R rows are (None: all rows, in order)
    kept_R: torch.Tensor | None = None  # routed: slots kept per row, ok ones first (None: all S)


class KVStore:
    """One block's KV cache: per row, the keys/values of exactly the tokens this block processed.

    Buffers `k`, `v` [B, Hkv, cap, d] grow by doubling; `len_B` counts the tokens stored per row
    (a routed block's rows differ); `ok_BC` marks keys that may be attended (not padding).
    Keys are stored after RoPE, at each token's own position, so no position is kept.
    `extra` holds what a router keeps across steps (DTF: its recent surprise values).
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.ok_BC: torch.Tensor | None = None
        self.len_B: torch.Tensor | None = None
        self.bound = 0  # host-side upper bound of len_B.max(): no sync to size reads
        self.dense = True  # every row holds the same real tokens, no padding: attention needs no mask
        self.extra: dict[str, torch.Tensor] = {}

    def reorder(self, idx_B: torch.Tensor) -> None:
        """Rows `idx_B` of the batch become its rows 0..B-1 (beam search)."""
        if self.k is not None:
            assert self.v is not None and self.ok_BC is not None and self.len_B is not None  # set together
            self.k, self.v = self.k.index_select(0, idx_B), self.v.index_select(0, idx_B)
            self.ok_BC, self.len_B = self.ok_BC.index_select(0, idx_B), self.len_B.index_select(0, idx_B)
        self.extra = {name: t.index_select(0, idx_B) for name, t in self.extra.items()}

    def _reserve(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        B, cap = self.batch, max(need, 16)
        if self.k is None:  # keys and values keep their own dtypes (under autocast RoPE leaves keys fp32)
            self.k = k.new_zeros(B, k.shape[1], cap, k.shape[-1])
            self.v = v.new_zeros(B, v.shape[1], cap, v.shape[-1])
            self.ok_BC = torch.zeros(B, cap, dtype=torch.bool, device=k.device)
            self.len_B = torch.zeros(B, dtype=torch.long, device=k.device)
        assert self.v is not None and self.ok_BC is not None  # set together with `k`
        cap = self.k.shape[2]
        if need > cap:
            grow = max(need, 2 * cap) - cap
            self.k = F.pad(self.k, (0, 0, 0, grow))
            self.v = F.pad(self.v, (0, 0, 0, grow))
            self.ok_BC = F.pad(self.ok_BC, (0, grow), value=False)

    def extend(self, k_RHSd: torch.Tensor, v_RHSd: torch.Tensor,
               slots: Slots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store S new tokens of `slots.rows`; returns the keys and values to attend over
        [R, Hkv, L, d], the SDPA mask [R, 1, S, L] (causal, real stored keys, and each query itself)
        and whether SDPA's causal flag applies; no mask where every stored key is real and shared by
        all rows and the queries are all the new keys or a single one."""
        R, _, S, _ = k_RHSd.shape
        ok_RS, rows = slots.ok_RS, slots.rows
        # a single row holds only real tokens once its padding slots are cut (routed: ok slots first)
        self.dense &= ok_RS is None or (self.batch == 1 and slots.kept_R is not None)
        if ok_RS is None:
            ok_RS = torch.ones(R, S, dtype=torch.bool, device=k_RHSd.device)
        self._reserve(k_RHSd, v_RHSd, self.bound + S)
        assert self.k is not None and self.v is not None and self.ok_BC is not None and self.len_B is not None
        ar = torch.arange(R, device=k_RHSd.device) if rows is None else rows
        start_R = self.len_B[ar]
        pos_RS = start_R[:, None] + torch.arange(S, device=k_RHSd.device)
        r_RS = ar[:, None].expand(R, S)
        self.k[r_RS, :, pos_RS] = k_RHSd.transpose(1, 2)
        self.v[r_RS, :, pos_RS] = v_RHSd.transpose(1, 2)
        self.ok_BC[r_RS, pos_RS] = ok_RS
        n_R = torch.full_like(start_R, S) if slots.kept_R is None else slots.kept_R
        L = self.bound + S
        key_L = torch.arange(L, device=k_RHSd.device)
        if rows is None:
            k_all, v_all, ok_RL = self.k[:, :, :L], self.v[:, :, :L], self.ok_BC[:, :L]
        else:
            k_all, v_all, ok_RL = self.k[rows, :, :L], self.v[rows, :, :L], self.ok_BC[rows, :L]
        first = self.bound == 0
        self.len_B[ar] = start_R + n_R
        self.bound = L
        if self.dense and (S == 1 or first):
            return k_all, v_all, None, first
        ok_RL = ok_RL & (key_L < (start_R + n_R)[:, None])
        mask = (key_L <= pos_RS[..., None]) & ok_RL[:, None, :] | (key_L == pos_RS[..., None])
        return k_all, v_all, mask[:, None], True


class MLP(nn.Module):
    """SwiGLU without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """`x + Attn(RMSNorm(x))`, then `+ MLP(RMSNorm(x))`: the block all three variants share."""

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def block(self, x_BSD: torch.Tensor, rope: Rope, mask: torch.Tensor | None, store: KVStore | None = None,
              slots: Slots | None = None) -> torch.Tensor:
        """The block on S tokens; with a KV `store` (cached inference) their attention also reads the
        tokens stored before, and the store keeps the `slots` it is told to (see `KVStore.extend`)."""
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), rope, mask, store, slots)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))
