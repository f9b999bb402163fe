"""Standard, MoD and DTF causal LMs: one model class, per-layer structure as data.

`config.layer_kinds` names each layer's class; the forward loop is the same for every variant.
Shape legend: B batch, T sequence length, K tokens per routed block and row, D hidden, V vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .config import DTFConfig, DTLabConfig, MoDConfig
from .dtf import DTFDecisionLayer, DTFDynamicLayer, DTFRouter
from .layers import DecoderBlock, KVStore, RMSNorm, RotaryEmbedding, Slots, init, sdpa_mask
from .mod import MoDLayer
from .routing import Context, LayerOutput

if TYPE_CHECKING:
    from transformers.generation.utils import GenerateOutput


class DenseLayer(DecoderBlock):
    """A plain Qwen2 block (all of Standard; the unrouted layers of MoD and DTF)."""

    def forward(self, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None,
                store: KVStore | None = None) -> LayerOutput:
        slots = None if store is None else Slots(ctx.real_BT)
        return LayerOutput(self.block(x_BTD, ctx.rope, ctx.dense_mask, store, slots), carry, {}, {})


# Per-layer structure is data: `config.layer_kinds` names each layer's class.
LAYER_CLASSES: dict[str, type[nn.Module]] = {
    "dense": DenseLayer,
    "mod": MoDLayer,
    "dtf_decision": DTFDecisionLayer,
    "dtf_dynamic": DTFDynamicLayer,
}
# Which config field weighs each auxiliary loss, as the layers declare it.
AUX_LOSS_WEIGHTS = {name: field for cls in LAYER_CLASSES.values()
                    for name, field in getattr(cls, "aux_loss_weights", {}).items()}


class BackboneOutput(NamedTuple):
    hidden_BTD: torch.Tensor  # after the final norm
    aux: dict[str, torch.Tensor]  # unweighted aux losses, each averaged over the layers that make it
    stats: dict[int, dict[str, torch.Tensor]]  # per routed layer: detached statistics
    masks: dict[int, torch.Tensor]  # per routed layer: [B, T] bool, the tokens its block processed


# transformers renamed `past_key_values` to `cache` during 5.x; its outputs alias the old name since.
_OUTPUT_ALIASES_CACHE = isinstance(getattr(ModelOutput, "past_key_values", None), property)


class DTLabCache:
    """The KV cache of cached inference (`use_cache=True`, `generate`): one `KVStore` per layer.

    A dense block's store holds every column; a routed block's holds, per row, only the tokens it
    processed (spec section 4). `seen` counts the columns fed so far.
    """

    is_compileable = False  # read by transformers' generation utilities
    is_croppable = False

    def __init__(self, num_layers: int, batch: int) -> None:
        self.layers = [KVStore(batch) for _ in range(num_layers)]
        self.batch = batch
        self.seen = 0
        self.real_B: torch.Tensor | None = None  # real (not padding) tokens seen per row: the next position

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep, for each row, the cache of the beam it continues (every per-row count too)."""
        for store in self.layers:
            store.reorder(beam_idx)
        if self.real_B is not None:  # the next position of each row: it moves with its row
            self.real_B = self.real_B.index_select(0, beam_idx.to(self.real_B.device))

    def stored(self, layer: int) -> torch.Tensor:
        """[B] tokens layer `layer` holds per row (for a routed block: those it processed), on the CPU:
        the logical size of its cache."""
        return torch.tensor(self.layers[layer].lens, dtype=torch.long)

    def slots(self, layer: int) -> torch.Tensor:
        """[B] physical slots of layer `layer`'s buffers per row (at least the row's `stored` count)."""
        return torch.tensor(self.layers[layer].slots(), dtype=torch.long)

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes the cache holds, of one layer or of all: its physical size."""
        stores = self.layers if layer is None else [self.layers[layer]]
        return sum(store.nbytes() for store in stores)


@dataclass
class DTLabCausalLMOutput(ModelOutput):
    """`loss` = lm_loss + sum of weighted aux losses; each part and the routing stats, separately.
    `cache` (`past_key_values` in older transformers) is the `DTLabCache` when one was used."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DTLabCache | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    routing_stats: dict[int, dict[str, torch.Tensor]] | None = None
    routing_masks: dict[int, torch.Tensor] | None = None


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

    schedule_step: torch.Tensor  # a buffer (annotation only: `register_buffer` sets it)

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LAYER_CLASSES[kind](config) for kind in config.layer_kinds)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        # persistent: a reloaded model with scheduled DTF temperatures runs at the step it was saved at
        self.register_buffer("schedule_step", torch.tensor(0, dtype=torch.long))
        # how a pass without a KV cache runs each layer: `runner(layer, x, ctx, carry)` (None: a plain
        # call); the trainer's activation checkpointing sets it
        self.layer_runner: Callable[[nn.Module, torch.Tensor, Context, tuple | None], LayerOutput] | None = None
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DTLabCache | None = None) -> BackboneOutput:
        """input_ids [B, T]: the next T columns. attention_mask [B, past + T] (1 real, 0 padding),
        covering the columns a `cache` has seen too; positions count real tokens from 0 (so a
        left-padded row reads as the same row unpadded) unless `position_ids` [B, T] say otherwise."""
        self._check_lengths(input_ids, attention_mask, cache)
        x = self.embed_tokens(input_ids)
        ctx = self._context(input_ids, attention_mask, position_ids, cache, x.dtype)
        aux: dict[str, list[torch.Tensor]] = {}
        stats: dict[int, dict[str, torch.Tensor]] = {}
        masks: dict[int, torch.Tensor] = {}
        carry = None
        for i, layer in enumerate(self.layers):
            if cache is None and self.layer_runner is not None:
                out = self.layer_runner(layer, x, ctx, carry)
            else:
                out = layer(x, ctx, carry, None if cache is None else cache.layers[i])
            x, carry, layer_aux, layer_stats, selected = out
            for name, value in layer_aux.items():
                aux.setdefault(name, []).append(value)
            if layer_stats:
                stats[i] = layer_stats
            if selected is not None:
                masks[i] = selected
        if cache is not None:
            cache.seen += input_ids.shape[1]
        # Aux losses are averaged over the layers that produce them (spec sections 2 and 3).
        aux_mean = {name: torch.stack(values).mean() for name, values in aux.items()}
        return BackboneOutput(self.norm(x), aux_mean, stats, masks)

    def _check_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache: DTLabCache | None) -> None:
        B, T = input_ids.shape
        past = 0 if cache is None else cache.seen
        if T == 0:
            raise ValueError(f"input_ids has no columns to process (the cache has seen {past}): pass the columns "
                             "after those, with an attention_mask over all of them")
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {past + T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, past + T)} "
                             f"(batch, columns seen before + input_ids' {T})")

    def _context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 cache: DTLabCache | None, dtype: torch.dtype) -> Context:
        """What every layer needs for these columns; counts a cache's real tokens."""
        T = input_ids.shape[1]
        key_mask = None if attention_mask is None else attention_mask[:, -T:].to(torch.bool)
        if position_ids is None:
            position_ids = self.positions(input_ids, attention_mask, cache)
        real = None
        if cache is not None:
            new_real = torch.full_like(input_ids[:, 0], T) if key_mask is None else key_mask.sum(1)
            cache.real_B = new_real if cache.real_B is None else cache.real_B + new_real
            # None when every new token is real (one host read: lets attention skip masks)
            real = None if key_mask is None or bool(key_mask.all()) else key_mask
        return Context(rope=self.rotary_emb(position_ids, dtype), key_mask_BT=key_mask,
                       dense_mask=None if cache is not None else sdpa_mask(key_mask, T, input_ids.device),
                       routing_mode=self.config.routing_mode, step=self.schedule_step, training=self.training,
                       real_BT=real)

    @staticmethod
    def positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  cache: DTLabCache | None) -> torch.Tensor:
        """RoPE positions of the new columns: real tokens counted from 0 in each row (with a cache,
        from the real tokens it has seen when no attention_mask is given)."""
        B, T = input_ids.shape
        past = 0 if cache is None else cache.seen
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        start = 0 if cache is None or cache.real_B is None else cache.real_B[:, None]
        return torch.arange(T, device=input_ids.device)[None] + start


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
    def forward(ctx: Any, h_ND: torch.Tensor, weight_VD: torch.Tensor, y_N: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
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
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None


def chunked_lm_loss(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor,
                    chunk_tokens: int) -> torch.Tensor:
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


class DTLabForCausalLM(DTLabPreTrainedModel, GenerationMixin):
    """Causal LM head over `DTLabModel`. Subclassed once per variant for the Auto classes.

    `generate()` is transformers' own (greedy, sampling, EOS, left-padded batches) and always runs
    in `causal` routing, with a `DTLabCache`: a routed block stores and computes only the tokens
    it selects.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DTLabConfig) -> None:
        super().__init__(config)
        self.model = DTLabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_schedule_step(self, step: int) -> None:
        """Training step read by scheduled DTF temperatures (a buffer: no recompilation)."""
        self.model.schedule_step.fill_(int(step))

    @contextlib.contextmanager
    def routing(self, mode: str) -> Iterator[DTLabForCausalLM]:
        """Run in routing `mode` ("topk" | "causal") inside the block, then restore the config's."""
        if mode not in ("topk", "causal"):
            raise ValueError(f"routing mode {mode!r}: expected 'topk' or 'causal'")
        saved, self.config.routing_mode = self.config.routing_mode, mode
        try:
            yield self
        finally:
            self.config.routing_mode = saved

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_logits: bool = True,
        cache: DTLabCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> DTLabCausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 real, 0 padding; with a cache [B, past + T]);
        labels [B, T], unshifted (-100 ignored). Returns logits [B, T, V] (the last `logits_to_keep`
        positions when > 0; none with `return_logits=False`), the total loss, `lm_loss`, unweighted
        `aux_losses`, detached per-layer `routing_stats` (0-d tensors, and [T] by position) and
        `routing_masks` ([B, T] bool: the tokens each routed block processed).

        `use_cache=True` or a `cache` (`past_key_values` is accepted as its older name) runs cached
        inference: eval mode and `causal` routing only. Anything else is refused, not ignored.
        """
        cache = self._check_inputs(input_ids, labels, cache, use_cache, logits_to_keep, kwargs)
        hidden_BTD, aux, stats, masks = self.model(input_ids, attention_mask, position_ids, cache)
        if logits_to_keep:
            hidden_BTD = hidden_BTD[:, -logits_to_keep:]
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
        out = DTLabCausalLMOutput(loss=loss, logits=logits, cache=cache, lm_loss=lm_loss, aux_losses=aux,
                                  routing_stats=stats, routing_masks=masks)
        if cache is not None and not _OUTPUT_ALIASES_CACHE:  # transformers before `cache` read this name
            out["past_key_values"] = cache
        return out

    def _check_inputs(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None, cache: DTLabCache | None,
                      use_cache: bool | None, logits_to_keep: int, kwargs: dict[str, Any]) -> DTLabCache | None:
        """Refuse what `forward` does not support; return the cache to use (made when asked for)."""
        past = kwargs.pop("past_key_values", None)
        for name, default in (("return_dict", True), ("output_attentions", False), ("output_hidden_states", False)):
            if kwargs.pop(name, None) not in (None, default):
                raise ValueError(f"{type(self).__name__}.forward: {name}={not default} is not supported")
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward got unsupported argument(s): {', '.join(sorted(kwargs))}"
                            + (" (pass input_ids)" if "inputs_embeds" in kwargs else ""))
        if input_ids is None:
            raise TypeError(f"{type(self).__name__}.forward needs input_ids [batch, length]")
        if cache is not None and past is not None and cache is not past:
            raise ValueError("pass the cache once: `cache` and `past_key_values` name the same thing")
        cache = cache if cache is not None else past
        if cache is not None and not isinstance(cache, DTLabCache):
            raise TypeError(f"cache must be the DTLabCache a previous call returned, not {type(cache).__name__}: "
                            "a routed block's cache holds only the tokens it processed")
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep with labels: the loss needs the logits of every position")
        if cache is None and not use_cache:
            return None
        if use_cache is False:
            raise ValueError("use_cache=False with a cache: drop one")
        if self.training:
            raise ValueError("a KV cache is for inference: call model.eval() first")
        if self.config.routing_mode != "causal":
            raise ValueError(f"a KV cache needs causal routing, not {self.config.routing_mode!r}: top-k routing "
                             "looks at the whole row (use `with model.routing('causal'):`; generate() does)")
        if cache is None:
            return DTLabCache(len(self.model.layers), input_ids.shape[0])
        if cache.batch != input_ids.shape[0]:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]}; the cache was made for {cache.batch}")
        return cache

    # ---- generation (transformers' GenerationMixin) ----------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own DTLabCache on the first call (use_cache=True)

    def generate(self, *args: Any, **kwargs: Any) -> GenerateOutput | torch.LongTensor:
        """transformers' `generate`, always in `causal` routing (top-k would read future tokens)."""
        with self.routing("causal"):
            return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """The columns the cache has not seen, the full attention mask, and the cache."""
        cache = kwargs.pop("cache", None)
        past = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else past
        for name in _GENERATION_INTERNALS:
            kwargs.pop(name, None)
        if kwargs.get("inputs_embeds", 0) is None:
            del kwargs["inputs_embeds"]  # given: left for forward to refuse
        if cache is not None:  # new columns: the mask covers every column; input_ids all, or only the new ones
            new = (attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]) - cache.seen
            input_ids = input_ids[:, input_ids.shape[1] - max(new, 0):]
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            position_ids = position_ids[:, -input_ids.shape[1]:]
        return {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask, "position_ids": position_ids,
                "cache": cache, **kwargs}


# What transformers' generate passes to `prepare_inputs_for_generation` for its own bookkeeping.
_GENERATION_INTERNALS = ("next_sequence_length", "is_first_iteration", "cache_position")


class StandardForCausalLM(DTLabForCausalLM):
    config_class = DTLabConfig


class MoDForCausalLM(DTLabForCausalLM):
    config_class = MoDConfig


class DTFForCausalLM(DTLabForCausalLM):
    config_class = DTFConfig
