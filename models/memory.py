"""Memory of one training run per device, as pure functions of the config (no model, no torch).

    mem = training_memory(config, batch=8, seq_len=2048, precision="bf16", strategy="ddp", world=8)
    mem.peak, mem.activations, mem.state

What is counted is what the training loop (`trainers/run/loop.py`) holds for one optimizer step:

- **state**: the parameters in fp32 (autocast computes in bf16/fp16 but the weights stay fp32), their
  fp32 gradients, AdamW's two fp32 moments, and under DDP (more than one rank) its gradient buckets, a
  second fp32 copy of the gradients. FSDP (`trainers/run/parallel.py`) shards weights, gradients and
  moments over the ranks and gathers, per device, the root's parameters (embedding, final norm) and two
  decoder layers at a time in fp32 (autocast computes in bf16, as under DDP), with one layer's
  unsharded gradients in flight.
- **activations**: what autograd saves for the backward pass, counted per decoder layer from the code
  (`layers.py`, `routing.py`, `mod.py`, `dtf.py`): the RMSNorms' fp32 inputs and outputs, each linear
  layer's input (under autocast every projection keeps its own low-precision cast of it), SDPA's q, k,
  v, output and log-sum-exp (a flash-type kernel: no T x T matrix), the SwiGLU's four [tokens, I]
  tensors, and, under autocast, the low-precision copies of the block's weights that the linears keep
  for backward. A routed block (MoD, DTF dynamic, `topk` routing) runs on its k = capacity_k(c, T)
  gathered tokens only, plus the router's own saved tensors over all T; in `causal` routing a routed
  block runs masked over all T tokens (as `flops.py` counts it). DTF decision layers add their prior.
- **activation checkpointing** (per decoder layer): only each layer's inputs stay saved; in backward one
  layer at a time is recomputed, so one layer's full saved set is live.
- **loss chunk**: the LM loss (`modeling.chunked_lm_loss`) never makes the batch's logits: it keeps fp32
  gradients of the head [V, D] and of the hidden states [tokens, D] for backward, and while it runs holds
  fp32 logits of `loss_chunk_tokens` tokens a few times over ([chunk, V] each).
- **peak**: the largest of three moments: the end of the forward pass (the loss computing), the
  backward pass layer by layer (saved tensors freed as gradients appear), and the optimizer step.

The model of what is saved was checked tensor by tensor against autograd's saved tensors, and the peak
against measured peaks of training steps on CPU (fp32 and bf16 autocast), in `tests/trainers/test_plan.py`.
What it leaves out: torch.compile (which usually saves less), the CUDA caching allocator's fragmentation
and workspace (cuBLAS, NCCL: a few hundred MiB), and the evaluation pass (no gradients: less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .flops import capacity_k, param_count

GiB = 2**30
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Memory:
    """Bytes per device of one run's training step (see the module doc for what each part holds)."""

    weights: int  # parameters (fp32; under fsdp this rank's shard)
    gradients: int  # fp32 gradients (sharded under fsdp)
    optimizer: int  # AdamW's exp_avg and exp_avg_sq (fp32, sharded under fsdp)
    buckets: int  # DDP's gradient buckets (ddp with more than one rank)
    gathered: int  # fsdp: unsharded parameters and gradients in flight
    activations: int  # saved for backward at the end of the forward pass, without checkpointing
    activations_checkpointed: int  # the same with per-layer activation checkpointing (inputs kept)
    checkpointing: bool  # which of the two the peak counts
    loss_chunk: int  # the loss's own peak: its saved gradients plus fp32 logits of one chunk in flight
    transient: int  # backward's temporaries of one layer and the optimizer step's
    peak: int  # the largest total at any moment of the step

    @property
    def state(self) -> int:
        """What stays resident whatever the batch: weights, gradients, optimizer state, buckets."""
        return self.weights + self.gradients + self.optimizer + self.buckets

    @property
    def saved(self) -> int:
        """The activations the peak counts (with or without checkpointing)."""
        return self.activations_checkpointed if self.checkpointing else self.activations

    def gib(self) -> dict[str, Any]:
        """The parts in GiB (and the flag), for records and tables."""
        return {f.name: (getattr(self, f.name) if f.name == "checkpointing" else getattr(self, f.name) / GiB)
                for f in fields(self)}


@dataclass(frozen=True)
class _Dtypes:
    c: int  # bytes of the compute dtype (matmul inputs and outputs)
    r: int  # bytes of the residual stream and of the norms' outputs
    casts: bool  # autocast casts each linear's input separately (fp32 weights, low-precision compute)


def _dtypes(precision: str) -> _Dtypes:
    """fp32; or autocast over fp32 weights (ddp and fsdp alike: FSDP gathers the parameters in fp32 and
    autocast makes the compute low-precision), whose residual stream stays fp32 (the embedding's output)."""
    if precision == "fp32":
        return _Dtypes(4, 4, False)
    return _Dtypes(2, 4, True)


# ---- what one layer saves for backward, per token ------------------------------------------------------
def _norm(dt: _Dtypes, D: int) -> int:
    """RMSNorm of an input that needs gradients: its fp32 input (a copy when the input is not fp32),
    the rsqrt per token, the normalised value (in the residual dtype) the weight multiplies."""
    return 4 * D + 4 + dt.r * D


def _linear_inputs(dt: _Dtypes, D: int, consumers: int) -> int:
    """The inputs that `consumers` linears fed by one norm output keep: one shared tensor, or under
    autocast one low-precision cast each."""
    return consumers * dt.c * D if dt.casts else dt.r * D


def _block(config: Any, dt: _Dtypes) -> int:
    """A decoder block, per token it processes: norm, q/k/v inputs, SDPA's q, k, v, out and log-sum-exp
    (o_proj reads SDPA's output in place), norm, the MLP's inputs and its four [tokens, I] tensors."""
    D, H, Hkv, I = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    d = D // H
    attn = dt.c * (2 * H * d + 2 * Hkv * d) + 4 * H
    return _norm(dt, D) + _linear_inputs(dt, D, 3) + attn + _norm(dt, D) + _linear_inputs(dt, D, 2) + 4 * dt.c * I


def _block_linear_params(config: Any) -> int:
    D, H, Hkv, I = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    d = D // H
    return D * H * d + 2 * D * Hkv * d + H * d * D + 3 * D * I


@dataclass(frozen=True)
class _Layer:
    saved: int  # bytes saved for backward (weight copies included)
    inputs: int  # bytes kept when the layer is checkpointed (its inputs)
    params: int  # parameters
    transient: int  # peak temporaries of its backward


def _layers(config: Any, B: int, T: int, dt: _Dtypes) -> list[_Layer]:
    """Per decoder layer, what it saves (see the module doc), in bytes for B rows of T tokens."""
    D, I = config.hidden_size, config.intermediate_size
    d = D // config.num_attention_heads
    n = B * T
    causal = getattr(config, "routing_mode", "topk") == "causal"
    k = T if causal else capacity_k(config.capacity, T) if config.capacity else T
    copies = 2 * _block_linear_params(config) if dt.casts else 0  # autocast's cached weight casts
    out = []
    for kind in config.layer_kinds:
        params = param_count(_one_layer(config, kind)) - param_count(_one_layer(config, "none"))
        inputs = n * dt.r * D
        if kind in ("dense", "dtf_decision"):
            saved = n * _block(config, dt) + copies
            work = n
        else:  # routed: the router over T, the block over the k gathered tokens (B*k of them)
            nk = B * k
            selected = _block(config, dt) + dt.r * D + 4 + 2 * dt.r * d  # + (y - x), gate, gathered RoPE
            if kind == "mod":
                router = dt.r * D + (0 if dt.r == 4 else 4 * D) + 8  # input (and its fp32 copy), logits
                if getattr(config, "mod_use_predictor", False):
                    router += 4 * D
            else:  # dtf_dynamic: the input, two fp32 surprise differences [T, D], the gate's [T] parts
                router = dt.r * D + 8 * D + 24
                inputs += n * dt.r * D  # the decision layer's prior output, carried in
            saved = n * router + nk * selected + 16 * nk + copies
            work = nk
        if kind == "dtf_decision":  # the prior: norm output, MLP inputs and its tensors, the prior loss
            P = config.prior_intermediate_size
            saved += n * (dt.r * D + _linear_inputs(dt, D, 2) + 4 * dt.c * P + 4 * D)
            saved += 2 * 3 * D * P if dt.casts else 0
        # backward's temporaries: gradients of the MLP's [tokens, I] tensors and of a few [tokens, D]
        transient = work * (2 * dt.c * I + 2 * dt.r * D) + 4 * params
        out.append(_Layer(saved, inputs, params, transient))
    return out


def _one_layer(config: Any, kind: str) -> Any:
    """A stand-in config of one layer of `kind` (or none), for `param_count` by difference."""
    from types import SimpleNamespace

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "tie_word_embeddings")
    shape = {key: getattr(config, key) for key in keys}
    extra = {key: getattr(config, key, None) for key in ("mod_use_predictor", "prior_intermediate_size",
                                                          "beta_mode")}
    return SimpleNamespace(**shape, **extra, layer_kinds=[] if kind == "none" else [kind])


# ---- the loss ------------------------------------------------------------------------------------------
def _loss(config: Any, B: int, T: int, dt: _Dtypes) -> tuple[int, int, int]:
    """(saved, forward peak, backward extra) of the chunked LM loss, bytes.

    Saved for backward: the head's fp32 gradient [V, D] and the hidden states' [N, D] (N = B*(T-1)).
    While it runs, per chunk of c tokens: the fp32 logits, their gradient (softmax minus one-hot, fp32),
    and the previous chunk's pair until the names are rebound (two chunks' worth), under autocast a
    low-precision copy of the chunk's logits gradient and of the head; at the end of a chunk the head's
    gradient of that chunk [V, D] is made (in the compute dtype, then fp32) and added.
    """
    V, D = config.vocab_size, config.hidden_size
    N = B * (T - 1)
    c = min(config.loss_chunk_tokens, N)
    cV = c * V
    saved = 4 * V * D + dt.r * N * D
    several = N > c
    if dt.c == 4:
        at_logits = (8 * cV if several else 0) + 4 * cV
        at_grad = 8 * cV + (4 * cV if several else 0)
        at_head = 8 * cV + 4 * V * D
    else:
        cache = 2 * V * D if dt.casts else 0  # autocast keeps the head's cast for the rest of the forward
        at_logits = (8 * cV if several else 0) + 6 * cV + 2 * V * D + cache
        at_grad = 8 * cV + (4 * cV if several else 0) + cache
        at_head = 10 * cV + 6 * V * D + cache
    forward = saved + max(at_logits, at_grad, at_head)
    backward = 4 * V * D + 2 * dt.r * N * D + dt.r * B * T * D  # its gradients, handed on to the final norm
    return saved, forward, backward


# ---- one step ---------------------------------------------------------------------------------------------
def training_memory(config: Any, batch: int, seq_len: int, precision: str = "bf16", strategy: str = "ddp",
                    world: int = 1, checkpointing: bool = False, fused_adamw: bool | None = None) -> Memory:
    """Per-device memory of one training step of `config` at micro-batch `batch` x `seq_len` tokens.

    `precision`: fp32, bf16 or fp16 (autocast over fp32 weights, under ddp and fsdp alike);
    `strategy`: ddp or fsdp over `world` ranks (ddp with one rank is the plain model: no buckets);
    `checkpointing`: per-layer activation checkpointing. `fused_adamw` (default: not fp32, i.e. CUDA):
    the fused AdamW step makes no temporaries; the single-tensor one (CPU) two of the largest parameter.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if batch < 1 or seq_len < 2 or world < 1:
        raise ValueError(f"batch={batch}, seq_len={seq_len}, world={world}: expected batch >= 1, seq_len >= 2, "
                         "world >= 1")
    dt = _dtypes(precision)
    B, T, D, V = batch, seq_len, config.hidden_size, config.vocab_size
    P = param_count(config)
    shards = world if strategy == "fsdp" else 1
    weights, gradients, optimizer = 4 * _ceil(P, shards), 4 * _ceil(P, shards), 8 * _ceil(P, shards)
    buckets = 4 * P if strategy == "ddp" and world > 1 else 0
    layers = _layers(config, B, T, dt)
    root = P - sum(layer.params for layer in layers)  # embedding (and an untied head), final norm
    gathered = 0
    if strategy == "fsdp" and world > 1:
        biggest = max((layer.params for layer in layers), default=0)
        gathered = 4 * (root + 2 * biggest) + 4 * biggest  # fp32 gathered: the root, two layers, one's gradient
    fixed = 8 * B * T + 2 * T * (D // config.num_attention_heads) * dt.r  # token ids, RoPE tables
    final_norm = B * T * _norm(dt, D)
    loss_saved, loss_forward, loss_backward = _loss(config, B, T, dt)
    activations = fixed + sum(layer.saved for layer in layers) + final_norm + loss_saved
    inputs = fixed + sum(layer.inputs for layer in layers) + final_norm + loss_saved
    biggest_saved = max((layer.saved for layer in layers), default=0)
    checkpointed = inputs + biggest_saved
    copies_all = 2 * _block_linear_params(config) * len(layers) if dt.casts else 0
    base = weights + optimizer + buckets + gathered

    # end of the forward pass: every layer's saved tensors (checkpointed: their inputs, and autocast's
    # weight casts, held until autocast exits), the loss computing
    layers_saved = (sum(layer.inputs for layer in layers) + copies_all if checkpointing
                    else sum(layer.saved for layer in layers))
    at_loss = base + fixed + layers_saved + final_norm + loss_forward
    # backward, layer by layer from the last: saved tensors freed as the gradients appear
    running = fixed + final_norm + loss_saved + (sum(layer.inputs for layer in layers) if checkpointing
                                                 else sum(layer.saved for layer in layers))
    head = 4 * (P - sum(layer.params for layer in layers) - D)  # the head's (tied: embedding's) gradient
    grads = 0
    backward = running + loss_backward
    running -= loss_saved + final_norm  # the loss's and the final norm's saved tensors, freed
    for layer in reversed(layers):
        live = running + (layer.saved if checkpointing else 0) + grads + head + layer.transient
        backward = max(backward, live)
        running -= layer.inputs if checkpointing else layer.saved
        grads += 4 * layer.params
    backward = base + max(backward, running + grads + head)
    # the optimizer step: every gradient, and (single-tensor AdamW) temporaries of the largest parameter
    fused = precision != "fp32" if fused_adamw is None else fused_adamw
    largest = max(V * D, D * config.intermediate_size)
    step_tmp = 0 if fused else 2 * 4 * _ceil(largest, shards)
    at_step = base + gradients + step_tmp
    peak = max(at_loss, backward, at_step)
    transient = max((layer.transient for layer in layers), default=0) + step_tmp
    return Memory(weights=weights, gradients=gradients, optimizer=optimizer, buckets=buckets, gathered=gathered,
                  activations=activations, activations_checkpointed=checkpointed, checkpointing=checkpointing,
                  loss_chunk=loss_forward, transient=transient, peak=peak)


def _ceil(n: int, k: int) -> int:
    return math.ceil(n / k)
