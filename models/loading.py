"""Loading Qwen2 / Qwen2.5 checkpoints (hub name or local directory) into any variant.

All three variants keep Hugging Face's parameter names, so the mapping of the spec
(MoD layer i <- pretrained layer i; DTF pair p: decision <- layer 2p, dynamic <- layer 2p+1)
is key identity. What the checkpoint holds must all land in the model, and what the model
has beyond it must be exactly the fresh routing parts (routers, priors, predictors) when
transferring from a dense (standard/Qwen2) checkpoint, and nothing when loading a saved model
of the model's own variant; anything else fails, listing the keys. No silent partial loads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .config import CONFIG_CLASSES, SHAPE_DEFAULTS, DTLabConfig, check_override_keys, check_rope, config_class

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_ModelT = TypeVar("_ModelT", bound="PreTrainedModel")

# Parameters a pretrained Qwen2 cannot have: they start fresh in a transfer from a dense checkpoint
# (and only then: a saved MoD/DTF checkpoint without them is damaged).
FRESH_KEY = re.compile(r"^model\.layers\.\d+\.(router|predictor|prior|prior_norm)\.")
# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# dtlab state a Qwen2 checkpoint has no place for: it starts fresh (the schedule at step 0).
STATE_KEY = re.compile(r"^model\.schedule_step$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub name, downloaded (config and weights only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"pretrained={str(name_or_path)!r} is a file: expected a checkpoint directory or hub name")
    if str(name_or_path).startswith((".", "/", "~")):
        raise ValueError(f"pretrained={str(name_or_path)!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as err:  # network, auth, unknown repo: say which name failed
        raise ValueError(f"pretrained={str(name_or_path)!r}: not a local directory and could not be "
                         f"fetched from the Hugging Face hub ({type(err).__name__}: {err})") from err


# model_type in config.json -> dtlab variant ("qwen2" is a dense Qwen2/Qwen2.5).
CHECKPOINT_VARIANTS = {"qwen2": "standard", **{c.model_type: v for v, c in CONFIG_CLASSES.items()}}


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json, expected a Qwen2/Qwen2.5 checkpoint directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("model_type") not in CHECKPOINT_VARIANTS:
        got = raw.get("model_type") if isinstance(raw, dict) else raw
        raise ValueError(f"{cfg_file}: model_type={got!r}, expected one of {sorted(CHECKPOINT_VARIANTS)}")
    return raw


def checkpoint_shape(path: Path) -> dict[str, Any]:
    """The shape fields of a Qwen2 (or dtlab) `config.json`, in dtlab's names."""
    raw, cfg_file = read_config(path), path / "config.json"
    if raw.get("use_sliding_window"):
        raise ValueError(f"{cfg_file}: use_sliding_window=true is not supported (Qwen2.5 checkpoints do not use it)")
    shape = {key: raw[key] for key in SHAPE_DEFAULTS if key in raw}
    try:
        check_rope(raw.get("rope_scaling"), raw.get("rope_parameters"), shape)
    except ValueError as err:
        raise ValueError(f"{cfg_file}: {err}") from None
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in shape]
    if missing:
        raise ValueError(f"{cfg_file}: missing {missing}")
    return shape


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json",
                                lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        index = path / index_name
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(loader(path / shard))
            return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no weights found, expected one of {WEIGHT_FILES}")


def load_into(model: PreTrainedModel, state: dict[str, torch.Tensor], source: str, transfer: bool) -> None:
    """Copy `state` into `model` by key, accounting for every key on both sides. `transfer`: the
    checkpoint is a dense (standard/Qwen2) one, so the model's routing parts (`FRESH_KEY`) start
    fresh; otherwise it is a saved model of the same variant and must hold every one of them."""
    own = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if tied and head is not None and embed is not None:
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError(f"cannot load {source}: its config ties the LM head to the embedding, but its "
                             "lm_head.weight differs from model.embed_tokens.weight; load it untied "
                             "(tie_word_embeddings=False) to keep both")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # one tensor, loaded once
    unexpected, mismatched, loaded = [], [], set()
    for key, tensor in state.items():
        if IGNORED_KEY.search(key):
            continue
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != tensor.shape:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
        else:
            loaded.add(key)
    missing = [k for k in own if k not in loaded and not (transfer and FRESH_KEY.search(k))
               and not STATE_KEY.search(k)
               and not (tied and k == "lm_head.weight" and "model.embed_tokens.weight" in loaded)]
    problems = []
    if mismatched:
        problems.append(f"shapes that do not fit: {mismatched}")
    if unexpected:
        problems.append(f"checkpoint tensors with no place in the model: {unexpected}")
    if missing:
        routing = [k for k in missing if FRESH_KEY.search(k)]
        why = (f" (a saved {model.config.model_type!r} checkpoint holds its routing parts: only a transfer "
               f"from a dense checkpoint starts them fresh; missing {routing})") if routing else ""
        problems.append(f"model tensors the checkpoint lacks: {missing}{why}")
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems))
    with torch.no_grad():
        for key in loaded:
            own[key].copy_(state[key])
    if tied:
        model.tie_weights()


def checkpoint_config(variant: str, path: Path, overrides: dict[str, Any]) -> DTLabConfig:
    """The config of a `variant` model loaded from `path`: its shape from the checkpoint; a saved
    dtlab model of the same variant also keeps its routing settings; explicit overrides win."""
    raw = read_config(path)
    saved_as = CHECKPOINT_VARIANTS[raw["model_type"]]
    if saved_as not in ("standard", variant):
        raise ValueError(f"{path} holds a {saved_as!r} model: it cannot load as {variant!r} (its routers "
                         f"differ); load it as {saved_as!r}, or transfer from a dense (standard/Qwen2) checkpoint")
    shape = checkpoint_shape(path)
    untie = shape.get("tie_word_embeddings", True) and overrides.get("tie_word_embeddings") is False
    clash = {k: (v, shape[k]) for k, v in overrides.items() if k in shape and shape[k] != v
             and not (k == "tie_word_embeddings" and untie)}
    if clash:
        raise ValueError(f"overrides do not fit the checkpoint {path}: "
                         + ", ".join(f"{k}={v!r} (checkpoint has {c!r})" for k, (v, c) in clash.items()))
    cls = config_class(variant)
    kept = {k: raw[k] for k in cls.field_names() if k in raw and k not in SHAPE_DEFAULTS} if saved_as == variant else {}
    return cls(**{**kept, **shape, **overrides})


def build_pretrained(model_cls: type[_ModelT], variant: str, pretrained: str | os.PathLike,
                     overrides: dict[str, Any]) -> _ModelT:
    """A `model_cls` (the `variant`'s class) whose shape (and, for a dtlab checkpoint of that variant,
    routing settings) comes from the checkpoint and whose weights are loaded from it."""
    path = resolve_checkpoint(pretrained)
    check_override_keys(variant, overrides)
    transfer = CHECKPOINT_VARIANTS[read_config(path)["model_type"]] == "standard"  # else `variant` itself
    model = model_cls(checkpoint_config(variant, path, overrides))
    state = read_state_dict(path)
    if overrides.get("tie_word_embeddings") is False and "lm_head.weight" not in state:  # untied from a tied one
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}
    load_into(model, state, str(path), transfer=transfer)
    model.config.name_or_path = str(pretrained)
    return model
