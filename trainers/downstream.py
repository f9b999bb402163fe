"""`dtlab eval`: downstream tasks with EleutherAI's lm-evaluation-harness, always in `causal` routing.

A routed model scored in `topk` routing would cheat: its routing would look at the answer tokens.
The run's best checkpoint is wrapped in lm-eval's own Hugging Face model class (`HFLM`, given the
loaded model and the run's tokenizer) and scored with `lm_eval.simple_evaluate`. Tasks are lm-eval's
(from the hub, where it is reachable) or the shipped offline ones (`trainers/tasks/*.jsonl`, built
from Python's documentation by `scripts/make_eval_tasks.py`): `dtlab_next_line` (multiple choice)
and `dtlab_cloze` (the last word of a sentence). They come from the builtin corpus, so a model
trained on it has seen their text: they check the path and compare variants on equal terms, not
generalisation.

Each evaluated run gets `lm_eval_results.json` (lm-eval's own results) and `eval_tasks.jsonl` (one
record per task and metric: value, stderr, routing mode, realised capacity per routed layer,
checkpoint step), which the report reads.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from .spec import SpecError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("dtlab_next_line", "dtlab_cloze")
RESULTS, RECORDS = "lm_eval_results.json", "eval_tasks.jsonl"


def local_task_configs(data_dir: Path = TASKS_DIR) -> dict[str, dict[str, Any]]:
    """lm-eval task configs of the shipped offline tasks (data paths made absolute)."""
    def data(name: str) -> dict[str, Any]:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_dir / f"{name}.jsonl")}},
                "test_split": "test", "metadata": {"version": 1.0}}

    return {
        "dtlab_next_line": {**data("dtlab_next_line"), "task": "dtlab_next_line", "output_type": "multiple_choice",
                            "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
                            "target_delimiter": "\n",
                            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        "dtlab_cloze": {**data("dtlab_cloze"), "task": "dtlab_cloze", "output_type": "loglikelihood",
                        "doc_to_text": "{{context}}", "doc_to_target": "{{target}}", "target_delimiter": "",
                        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                         "higher_is_better": False},
                                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }


def write_task_dir(folder: Path, configs: dict[str, dict[str, Any]]) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def hf_tokenizer(tok):
    """The run's tokenizer as a transformers tokenizer (lm-eval's HFLM needs one)."""
    if tok.hf:
        return tok.backend
    from transformers import PreTrainedTokenizerFast

    eot = tok.backend.id_to_token(tok.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=eot, pad_token=eot)


class RoutingProbe:
    """Counts, over every forward lm-eval makes, the routing mode used and the tokens each routed
    block processed (its realised capacity)."""

    def __init__(self, model) -> None:
        self.modes: set[str] = set()
        self.processed: dict[int, float] = {}
        self.tokens = 0.0
        self.model = model
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.modes.add(module.config.routing_mode)
        masks = output.routing_masks or {}
        if masks:
            self.tokens += float(next(iter(masks.values())).numel())
        for layer, mask in masks.items():
            self.processed[layer] = self.processed.get(layer, 0.0) + float(mask.sum())

    def capacity(self) -> dict[str, float]:
        return {str(k): v / self.tokens for k, v in sorted(self.processed.items())} if self.tokens else {}

    def close(self) -> None:
        self.handle.remove()


def check_tasks(tasks: list[str], routing: str = "causal") -> None:
    """Refused before any work: top-k routing, and an empty task list."""
    if routing != "causal":
        raise SpecError(f"routing {routing!r}: downstream tasks are scored only in causal routing; top-k routing "
                        "chooses each token's blocks by looking at the whole row, answer tokens included")
    if not tasks or any(not t.strip() for t in tasks):
        raise SpecError(f"tasks {tasks!r}: expected task names, e.g. {','.join(LOCAL_TASKS)}")


def evaluate_run(run_dir: str | Path, tasks=LOCAL_TASKS, limit: int | None = None, batch_size: int = 8,
                 out: str | Path | None = None, device: str = "cpu", seed: int = 0) -> list[dict[str, Any]]:
    """Score one run's best checkpoint on `tasks` in causal routing; returns (and writes) its records."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .sample import load_run

    check_tasks(list(tasks))
    run = load_run(run_dir, device=device)
    model = run.model
    model.config.routing_mode = "causal"  # the loaded copy only: never top-k (see the module doc)
    lm = HFLM(pretrained=model, tokenizer=hf_tokenizer(run.tokenizer), batch_size=batch_size, backend="causal",
              max_length=model.config.max_position_embeddings, device=device)
    probe = RoutingProbe(model)
    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(write_task_dir(Path(tmp), local_task_configs())))
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                              log_samples=False, bootstrap_iters=1000, random_seed=seed,
                                              numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
        finally:
            probe.close()
    if probe.modes - {"causal"}:
        raise RuntimeError(f"lm-eval ran the model in {sorted(probe.modes)} routing; expected causal only")
    records = task_records(results, run.step, probe.capacity(), limit)
    write_results(Path(run_dir), Path(out) if out else Path(run_dir), results, records)
    return records


def task_records(results: dict[str, Any], step: int, capacity: dict[str, float],
                 limit: int | None) -> list[dict[str, Any]]:
    """One record per task and metric from lm-eval's results."""
    records = []
    for task, metrics in sorted(results.get("results", {}).items()):
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            records.append({"task": task, "metric": metric, "value": _num(value), "stderr": _num(stderr),
                            "routing_mode": "causal", "capacity": capacity, "step": step, "limit": limit,
                            "samples": n})
    return records


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def write_results(run_dir: Path, out: Path, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """lm-eval's results JSON into `out`; the records into the run's `eval_tasks.jsonl`, replacing
    earlier records of the same tasks (other tasks' records are kept)."""
    from .records import read_jsonl, rewrite_jsonl
    from .runner import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    name = RESULTS if out == run_dir else f"{run_dir.name}-{RESULTS}"
    write_atomic(out / name, json.dumps(results, indent=1, default=str))
    path = run_dir / RECORDS
    tasks = {r["task"] for r in records}
    if path.is_file() and read_jsonl(path).records:
        rewrite_jsonl(path, lambda r: r.get("task") not in tasks, append=records)
    else:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def torch_threads_note() -> int:
    return torch.get_num_threads()
