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
        if store is None:
            out = attend(q, k, v, mask)
        else:
            assert slots is not None, "a KV store needs the slots it keeps"
            out = store.attend(q, k, v, slots)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


def attend(q_BHSd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor, mask: torch.Tensor | None,
           causal: bool = True) -> torch.Tensor:
    """SDPA; without a mask, causal (or, for one query after the keys, `causal=False`: every key).

    CUDA's SDPA takes the slow math kernel when given both a mask and `enable_gqa`, so with a mask and
    grouped KV heads (G query heads per KV head) one of two equivalent forms runs, whichever costs
    less memory (`gqa_with_mask`): the G query heads folded into the query axis ([B, Hkv, G*S, d],
    the mask repeated G times: G*S*L mask entries per row, which SDPA turns into a bias of the query
    dtype kept for backward), or the keys and values repeated per query head (2*H*L*d entries per
    row, the mask shared by every head). Folding is the cheaper one exactly when S <= 2*Hkv*d.
    """
    B, H, S, d = q_BHSd.shape
    Hkv = k_BHLd.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLd, is_causal=causal, enable_gqa=H != Hkv)
    if H == Hkv:
        return F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLd, attn_mask=mask)
    G, L = H // Hkv, k_BHLd.shape[2]
    if gqa_with_mask(q_BHSd, k_BHLd, v_BHLd) == "repeat":
        k, v = k_BHLd.repeat_interleave(G, dim=1), v_BHLd.repeat_interleave(G, dim=1)  # head h reads kv h // G
        return F.scaled_dot_product_attention(q_BHSd, k, v, attn_mask=mask)
    q = q_BHSd.reshape(B, Hkv, G * S, d)  # head h = kv * G + g reads KV head kv
    m = mask.expand(B, 1, S, L)[:, :, None].expand(B, 1, G, S, L).reshape(B, 1, G * S, L)
    return F.scaled_dot_product_attention(q, k_BHLd, v_BHLd, attn_mask=m).reshape(B, H, S, d)


def gqa_with_mask(q_BHSd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor) -> str:
    """"fold" or "repeat": the form of masked grouped-query attention that holds fewer bytes (see
    `attend`). Shapes only (no host sync): folding makes a [B, 1, G*S, L] mask in the query dtype,
    repeating makes keys and values of H heads [B, H, L, d]."""
    B, H, S, d = q_BHSd.shape
    Hkv, L = k_BHLd.shape[1], k_BHLd.shape[2]
    fold = B * (H // Hkv) * S * L * q_BHSd.element_size()
    repeat = B * H * L * d * (k_BHLd.element_size() + v_BHLd.element_size())
    return "fold" if fold <= repeat else "repeat"


class Slots(NamedTuple):
    """Which of S new tokens a KV store keeps, for cached inference.

    A dense block's store keeps every column (`ok_RS` marks the real ones); a routed block's keeps,
    per row, the first `counts[i]` of the S gathered tokens (its selected ones, in order) of batch row
    `rows[i]`. The counts are host integers: the routed update has read them anyway (one read per layer).
    """

    ok_RS: torch.Tensor | None  # dense: bool, a real token (not padding); None: all are
    rows: list[int] | None = None  # routed: the batch rows these R rows are (None: all rows, in order)
    counts: list[int] | None = None  # routed: tokens kept per row, the first ones (None: a dense store)


class KVStore:
    """One block's KV cache: per row, the keys/values of exactly the tokens this block processed.

    `lens` counts on the host the tokens stored per row, so sizing a read or a buffer needs no device
    sync. A dense block's rows all hold every column: buffers `k`, `v` [B, Hkv, slots, d], with `ok_BC`
    marking the keys that may be attended (not padding). A routed block's rows hold different numbers
    of tokens, so each row has buffers of its own, `row_k[b]`, `row_v[b]` [Hkv, slots, d], holding only
    its tokens (all real) at slots 0..lens[b]-1; a row attends over its own stored tokens only, read in
    place (no copy of a row's keys and values), and a row that does not select a token is not touched.
    Buffers grow to what their row needs rounded up to `GROW` slots (a grow copies the buffer: the
    rounding amortises it), so a routed row's buffers hold at most its count plus `GROW` slots and a
    routed block's cache grows with its rows' counts, whatever the batch.
    Keys are stored after RoPE, at each token's own position, so no position is kept.
    `extra` holds what a router keeps across steps (DTF: its recent surprise values).
    """

    GROW = 16

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.k: torch.Tensor | None = None  # dense stores
        self.v: torch.Tensor | None = None
        self.ok_BC: torch.Tensor | None = None
        self.row_k: list[torch.Tensor | None] = [None] * batch  # routed stores
        self.row_v: list[torch.Tensor | None] = [None] * batch
        self.lens = [0] * batch  # host: tokens stored per row
        self.dense = True  # a dense store whose keys are all real: attention needs no mask
        self.extra: dict[str, torch.Tensor] = {}

    def slots(self) -> list[int]:
        """Physical slots of each row's buffers (at least the row's count)."""
        if self.k is not None:
            return [self.k.shape[2]] * self.batch
        return [0 if t is None else t.shape[1] for t in self.row_k]

    def nbytes(self) -> int:
        """Bytes the store holds: keys, values, the padding mask and the router's state."""
        held = [t for t in (self.k, self.v, self.ok_BC, *self.row_k, *self.row_v, *self.extra.values())
                if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def reorder(self, idx_B: torch.Tensor) -> None:
        """Rows `idx_B` of the batch become its rows 0..B-1 (beam search; reads `idx_B` on the host).
        A routed row taken twice gets a copy of its buffers (each is then extended in place)."""
        idx = idx_B.tolist()
        self.lens = [self.lens[i] for i in idx]
        if self.k is not None:
            assert self.v is not None and self.ok_BC is not None  # set together
            at = idx_B.to(self.k.device)
            self.k, self.v, self.ok_BC = self.k.index_select(0, at), self.v.index_select(0, at), self.ok_BC[at]
        taken: set[int] = set()
        row_k, row_v = [], []
        for i in idx:
            k, v = self.row_k[i], self.row_v[i]
            if i in taken and k is not None and v is not None:
                k, v = k.clone(), v.clone()
            taken.add(i)
            row_k.append(k)
            row_v.append(v)
        self.row_k, self.row_v = row_k, row_v
        self.extra = {name: t.index_select(0, idx_B.to(t.device)) for name, t in self.extra.items()}

    @classmethod
    def _grown(cls, buf: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...], need: int,
               axis: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`buf` with at least `need` slots along `axis` (when None, a new one shaped `shape` on `like`'s
        device, of `like`'s dtype or `dtype`), grown in `GROW`-slot steps."""
        cap = -(-need // cls.GROW) * cls.GROW
        if buf is None:  # keys and values keep their own dtypes (under autocast RoPE leaves keys fp32)
            return like.new_zeros(*shape[:axis], cap, *shape[axis + 1:], dtype=dtype or like.dtype)
        if need <= buf.shape[axis]:
            return buf
        pad = [0, 0] * (buf.dim() - 1 - axis) + [0, cap - buf.shape[axis]]
        return F.pad(buf, pad)

    def attend(self, q_RHSd: torch.Tensor, k_RHSd: torch.Tensor, v_RHSd: torch.Tensor,
               slots: Slots) -> torch.Tensor:
        """Store the S new tokens' keys and values (those `slots` keeps) and return the attention of
        the S queries over what their row holds, causally [R, H, S, d]."""
        if slots.counts is None:
            return self._attend_dense(q_RHSd, k_RHSd, v_RHSd, slots.ok_RS)
        return self._attend_routed(q_RHSd, k_RHSd, v_RHSd, slots.rows, slots.counts)

    def _attend_dense(self, q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor,
                      ok_BS: torch.Tensor | None) -> torch.Tensor:
        """Every row stores every column: one read of the buffers' first L slots (a view), masked where
        some stored key is padding; no mask while every key is real and the queries are all the keys or
        one after them."""
        B, Hkv, S, d = k_BHSd.shape
        past = self.lens[0]
        L = past + S
        self.dense &= ok_BS is None
        self.k = k = self._grown(self.k, k_BHSd, (B, Hkv, 0, d), L, axis=2)
        self.v = v = self._grown(self.v, v_BHSd, (B, Hkv, 0, v_BHSd.shape[-1]), L, axis=2)
        self.ok_BC = ok = self._grown(self.ok_BC, k_BHSd, (B, 0), L, axis=1, dtype=torch.bool)
        k[:, :, past:L], v[:, :, past:L] = k_BHSd, v_BHSd
        ok[:, past:L] = True if ok_BS is None else ok_BS
        self.lens = [L] * B
        if self.dense and (S == 1 or past == 0):
            return attend(q_BHSd, k[:, :, :L], v[:, :, :L], None, causal=past == 0)
        key_L = torch.arange(L, device=k.device)
        pos_S1 = torch.arange(past, L, device=k.device)[:, None]
        # causal, real stored keys, and each query itself (a padding query has no real key)
        mask = (key_L <= pos_S1) & ok[:, None, :L] | (key_L == pos_S1)
        return attend(q_BHSd, k[:, :, :L], v[:, :, :L], mask[:, None])

    def _attend_routed(self, q_RHSd: torch.Tensor, k_RHSd: torch.Tensor, v_RHSd: torch.Tensor,
                       rows: list[int] | None, counts: list[int]) -> torch.Tensor:
        """Row by row: row `rows[i]` stores its first `counts[i]` new tokens after the ones it holds,
        and they attend over that row's tokens alone, read in place. Queries past a row's count are
        padding: their outputs (zeros) are discarded by the caller."""
        R, _, S, _ = q_RHSd.shape
        _, Hkv, _, d = k_RHSd.shape
        outs = []
        for i, (r, n) in enumerate(zip(range(R) if rows is None else rows, counts, strict=True)):
            if n == 0:  # nothing kept: the row's queries are all padding
                outs.append(torch.zeros_like(q_RHSd[i:i + 1]))
                continue
            past = self.lens[r]
            L = past + n
            self.row_k[r] = k = self._grown(self.row_k[r], k_RHSd, (Hkv, 0, d), L, axis=1)
            self.row_v[r] = v = self._grown(self.row_v[r], v_RHSd, (Hkv, 0, v_RHSd.shape[-1]), L, axis=1)
            k[:, past:L], v[:, past:L] = k_RHSd[i, :, :n], v_RHSd[i, :, :n]
            self.lens[r] = L
            mask = None
            if n > 1 and past > 0:  # causal, aligned at the end: query j is key past + j
                mask = torch.arange(L, device=k.device) <= torch.arange(past, L, device=k.device)[:, None]
            o = attend(q_RHSd[i:i + 1, :, :n], k[None, :, :L], v[None, :, :L], mask, causal=past == 0)
            outs.append(F.pad(o, (0, 0, 0, S - n)))
        return torch.cat(outs)


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
