"""`dtlab sample`: text from a trained run's best checkpoint, always in `causal` routing.

A run directory holds `run.json` (which tokenizer), `tokenizer.json` when the tokenizer was trained
here, and `checkpoints/best` (a `save_pretrained` folder). Generation is transformers' `generate`
on the dtlab model, with its routed KV cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from dtlab.trainers.run.checkpoint import CheckpointError, read_trainer_state, why_not_loadable
from dtlab.trainers.run.data import Tokenizer, load_hf_tokenizer
from dtlab.trainers.spec import SpecError

if TYPE_CHECKING:
    from dtlab.models.modeling import DTLabForCausalLM

log = logging.getLogger(__name__)


class LoadedRun(NamedTuple):
    model: Any  # a DTLabForCausalLM in eval mode
    tokenizer: Tokenizer
    checkpoint: Path
    step: int


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """The run's best checkpoint (its last when no best was kept) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from dtlab import models

    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise SpecError(f"{run_dir}: not a dtlab run directory (no run.json); expected the --out of `dtlab train` "
                        "or one run folder inside an experiment")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"{info_path}: not readable JSON ({err})") from err
    ckpt = run_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (checkpoints/best or checkpoints/last)")
    if (why := why_not_loadable(ckpt)) is not None:
        raise CheckpointError(f"{ckpt}: {why}")
    from transformers.utils import logging as hf_logging

    models.register_auto_classes()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    return LoadedRun(model, run_tokenizer(run_dir, info), ckpt, _step(ckpt.resolve()))


def run_checkpoint(run_dir: str | Path) -> Path | None:
    """`checkpoints/best`, else `checkpoints/last`, else None."""
    return next((p for n in ("best", "last") if (p := Path(run_dir) / "checkpoints" / n).exists()), None)


def best_step(run_dir: str | Path) -> int | None:
    """The step of the checkpoint `load_run` would load, or None when there is none."""
    ckpt = run_checkpoint(run_dir)
    return None if ckpt is None else _step(ckpt.resolve())


def _step(ckpt: Path) -> int:
    """The training step a checkpoint holds (`step-NNNNNNN`; older dtlab: its trainer state)."""
    if ckpt.name.startswith("step-") and ckpt.name[5:].isdigit():
        return int(ckpt.name[5:])
    return int(read_trainer_state(ckpt).get("step", 0))


def run_tokenizer(run_dir: Path, info: dict[str, Any]) -> Tokenizer:
    """The tokenizer file trained for the run, or the Hugging Face tokenizer it names."""
    local = run_dir / "tokenizer.json"
    if local.is_file():
        import tokenizers

        return Tokenizer(tokenizers.Tokenizer.from_file(str(local)), False, "tokenizer.json (trained for the run)")
    name = (info.get("data") or {}).get("tokenizer")
    if not name or "trained here" in str(name):
        raise SpecError(f"{run_dir}: no tokenizer.json and run.json names no Hugging Face tokenizer")
    return load_hf_tokenizer(name)


def generate_text(run: LoadedRun, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> tuple[str, torch.Tensor, int]:
    """The continuation of `prompt` (greedy at temperature 0), the full token ids [1, P + n] and P."""
    tok, model = run.tokenizer, run.model
    ids = tok.encode_batch([prompt])[0] if prompt else []
    ids = ids or [tok.eot_id]  # an empty prompt starts from the end-of-text token, as documents do
    positions = int(model.config.max_position_embeddings)
    if len(ids) + max_new_tokens > positions:  # known before any token is generated
        raise SpecError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
                        f"{positions} positions: ask for at most {max(positions - len(ids), 0)} new tokens"
                        + ("" if len(ids) < positions else " (and shorten the prompt)"))
    x = torch.tensor([ids], device=model.device)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    return tok.decode(out[0, len(ids):].tolist()), out, len(ids)


def routed_fractions(model: DTLabForCausalLM, ids: torch.Tensor, prompt_len: int) -> dict[int, float]:
    """Per routed layer, the fraction of generated tokens its block processed (the decisions of the
    full-sequence causal forward, which cached decoding reproduces)."""
    if ids.shape[1] <= prompt_len:
        return {}
    with torch.no_grad(), model.routing("causal"):
        masks = model(ids).routing_masks
    return {i: float(m[:, prompt_len:].float().mean()) for i, m in sorted(masks.items())}


# Fixed prompts for the samples a report shows (the builtin corpus is Python's docs and sources).
SAMPLE_PROMPTS = ("The", "def ", "import ")
SAMPLES = "samples.json"


def write_samples(run_dir: str | Path, prompts: Sequence[str] = SAMPLE_PROMPTS, max_new_tokens: int = 32) -> Path:
    """Greedy samples of the run's best checkpoint from fixed prompts, into `samples.json`."""
    from dtlab.analysis.rundir import write_atomic

    run = load_run(run_dir)
    samples = []
    for prompt in prompts:
        text, ids, prompt_len = generate_text(run, prompt, max_new_tokens=max_new_tokens)
        fractions = routed_fractions(run.model, ids, prompt_len)
        samples.append({"prompt": prompt, "text": text, "tokens": int(ids.shape[1] - prompt_len),
                        "routed_fraction": {str(k): v for k, v in fractions.items()}})
    path = Path(run_dir) / SAMPLES
    write_atomic(path, json.dumps({"step": run.step, "checkpoint": run.checkpoint.resolve().name,
                                   "routing_mode": "causal", "decoding": "greedy", "samples": samples}, indent=1))
    return path


def ensure_samples(run_dir: Path, replace: bool = False) -> None:
    """`samples.json` for a trained run, unless it has one (or `replace`: it was just trained further).
    Samples illustrate: a failure is logged, never raised, since the run itself trained."""
    if ((Path(run_dir) / SAMPLES).is_file() and not replace) or not (Path(run_dir) / "checkpoints").is_dir():
        return
    try:
        write_samples(run_dir)
    except Exception as err:
        log.debug(f"{Path(run_dir).name}: no samples ({type(err).__name__}: {err})")
