"""Compute accounting as pure functions of the config (no model, no torch).

Forward FLOPs per token, counting a multiply-add as 2 FLOPs (the convention of Kaplan et al.
2020 and nanoGPT's `estimate_mfu`); a training step is forward + backward = 3 x forward.

Per block taking part with S of the row's T tokens (S = T dense, S = k routed):
  linear    2 * (D*H*d + 2*D*Hkv*d + H*d*D + 3*D*I)            for each of the S tokens
  attention 2 * 2 * H*d * (S + 1) / 2                           QK^T and AV; a causal query
                                                                sees (S + 1) / 2 keys on average
and the block's cost per token of the row is (S / T) times that. Routed blocks count what training
computes in the config's routing mode: `topk` runs a block on its k gathered tokens (S = k); `causal`
runs it, with gradients, in its static masked form (`routing.masked_causal_update`: all T tokens
through the block, attention restricted to the selected keys), so it costs a dense block (S = T).
(Causal routing without gradients, as evaluation and generation run it, computes only the selected
tokens, a number known only at run time: not what these records count.) Also counted: the LM head
(2*D*V), MoD routers (2*D) and predictors (2*(D*D/2 + D/2)), DTF priors (2*3*D*P) and the DTF
router's two surprise reductions (3*D each). Norms, softmax, RoPE and the embedding lookup are
left out. For the 0.5B shape at T = 2048 this gives MoD (c = 0.125) 0.669 of dense.

Importing this module imports no torch (a test checks it in a fresh process): any object with
the config's attributes will do, a `dtlab.models` config or a namespace read from `config.json`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings")


def capacity_k(capacity: float, T: int) -> int:
    """Tokens a routed block takes per row: k = max(1, floor(c * T)); the epsilon keeps e.g.
    0.29 * 100 from flooring to 28. Routing and compute accounting both use this one."""
    return max(1, min(T, math.floor(capacity * T + 1e-9)))


def _block_flops(config: Any, S: int) -> float:
    """Forward FLOPs of one block for ONE of the S tokens that take part."""
    D, H, Hkv, d, I = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                       config.hidden_size // config.num_attention_heads, config.intermediate_size)
    linear = 2 * (D * H * d + 2 * D * Hkv * d + H * d * D + 3 * D * I)
    attention = 2 * 2 * H * d * (S + 1) / 2
    return linear + attention


def _routed_block_flops(config: Any, T: int) -> float:
    """Per token of the row: the block over its k selected tokens (top-k routing), or over all T
    (causal routing: training's static masked form computes every token)."""
    if getattr(config, "routing_mode", "topk") == "causal":
        return _block_flops(config, T)
    k = capacity_k(config.capacity, T)
    return (k / T) * _block_flops(config, k)


def forward_flops_per_token(config: Any, seq_len: int) -> float:
    """Forward FLOPs per token of a row of `seq_len` tokens, as training computes it in the config's
    routing mode (see the module doc: `causal` costs routed blocks as dense ones)."""
    T, D = seq_len, config.hidden_size
    total = 2 * D * config.vocab_size  # LM head
    for kind in config.layer_kinds:
        if kind in ("dense", "dtf_decision"):
            total += _block_flops(config, T)
        if kind == "mod":
            total += _routed_block_flops(config, T) + 2 * D
            if config.mod_use_predictor:
                total += 2 * (D * (D // 2) + D // 2)
        if kind == "dtf_decision":
            total += 2 * 3 * D * config.prior_intermediate_size
        if kind == "dtf_dynamic":
            total += _routed_block_flops(config, T) + 2 * 3 * D
    return total


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at sequence length `seq_len`."""
    return 3.0 * forward_flops_per_token(config, seq_len)


def dense_equivalent(config: Any, num_hidden_layers: int | None = None) -> SimpleNamespace:
    """The same shape as a Standard model (optionally with another depth), for FLOP ratios."""
    shape = {key: getattr(config, key) for key in SHAPE_KEYS}
    if num_hidden_layers is not None:
        shape["num_hidden_layers"] = num_hidden_layers
    return SimpleNamespace(**shape, layer_kinds=["dense"] * shape["num_hidden_layers"], capacity=None)


def matched_dense_depth(config: Any, target_flops_per_token: float, seq_len: int) -> int:
    """The depth (1..L) of a Standard model of `config`'s shape whose training FLOPs per token are
    closest to `target_flops_per_token`: a compute-matched dense control."""
    depths = range(1, config.num_hidden_layers + 1)
    return min(depths, key=lambda n: abs(flops_per_token(dense_equivalent(config, n), seq_len)
                                         - target_flops_per_token))


def flop_ratio_vs_dense(config: Any, seq_len: int) -> float:
    return flops_per_token(config, seq_len) / flops_per_token(dense_equivalent(config), seq_len)


def param_count(config: Any) -> int:
    """Parameters of the model `build_model` makes for `config` (tied head counted once)."""
    D, H, Hkv, I, V = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                       config.intermediate_size, config.vocab_size)
    d = D // H
    block = (D * H * d + H * d) + 2 * (D * Hkv * d + Hkv * d) + H * d * D + 3 * D * I + 2 * D
    total = V * D + D + (0 if config.tie_word_embeddings else V * D)
    for kind in config.layer_kinds:
        total += block
        if kind == "mod":
            total += D + (D * (D // 2) + D // 2 + D // 2 + 1 if config.mod_use_predictor else 0)
        if kind == "dtf_decision":
            total += D + 3 * D * config.prior_intermediate_size
        if kind == "dtf_dynamic":
            total += 4 if config.beta_mode == "learnable" else 2
    return total
