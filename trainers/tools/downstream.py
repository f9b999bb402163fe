"""`dtlab eval`: downstream tasks with EleutherAI's lm-evaluation-harness, always in `causal` routing.

A routed model scored in `topk` routing would cheat: its routing would look at the answer tokens.
The run's best checkpoint is wrapped in lm-eval's own Hugging Face model class (`HFLM`, given the
loaded model and the run's tokenizer) and scored with `lm_eval.simple_evaluate`. Tasks are lm-eval's
(from the hub, where it is reachable) or the shipped offline ones (`trainers/tools/tasks/*.jsonl`, built
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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtlab.trainers.spec import SpecError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

    from dtlab.trainers.run.data import Tokenizer

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


def hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerBase:
    """The run's tokenizer as a transformers tokenizer (lm-eval's HFLM needs one)."""
    if tok.hf:
        return tok.backend
    from transformers import PreTrainedTokenizerFast

    eot = tok.backend.id_to_token(tok.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=eot, pad_token=eot)


class RoutingProbe:
    """Counts, over the forwards lm-eval makes, the routing modes used and the real tokens each routed
    block processed (its realised capacity). Padding is not counted: generation passes an attention
    mask; log-likelihood batches are right-padded with token 0 after each row's last real token."""

    def __init__(self, model) -> None:
        self.modes: set[str] = set()
        self.processed: dict[int, float] = {}
        self.tokens = 0.0
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        self.modes.add(module.config.routing_mode)
        masks = output.routing_masks or {}
        if not masks:
            return
        ids = args[0] if args else kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            real = mask[:, -ids.shape[1]:].bool()
        else:  # positions up to each row's last non-zero token
            pos = torch.arange(ids.shape[1], device=ids.device)
            last = torch.where(ids != 0, pos, -1).amax(1, keepdim=True)
            real = pos <= last
        self.tokens += float(real.sum())
        for layer, m in masks.items():
            self.processed[layer] = self.processed.get(layer, 0.0) + float((m & real).sum())

    def capacity(self) -> dict[str, float]:
        return {str(k): v / self.tokens for k, v in sorted(self.processed.items())} if self.tokens else {}

    def close(self) -> None:
        self.handle.remove()


_MANAGER: list[TaskManager] = []


def task_manager() -> TaskManager:
    """lm-eval's task index with the shipped offline tasks added (built once per process: ~5 s)."""
    if not _MANAGER:
        import atexit
        import shutil

        from lm_eval.tasks import TaskManager

        folder = Path(tempfile.mkdtemp(prefix="dtlab-tasks-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _MANAGER.append(TaskManager(include_path=str(write_task_dir(folder, local_task_configs()))))
    return _MANAGER[0]


def check_tasks(tasks: list[str], routing: str = "causal", known: bool = True) -> None:
    """Refused before any work: top-k routing, an empty task list, and (`known`) a name lm-eval does
    not know as a task, group or tag."""
    if routing != "causal":
        raise SpecError(f"routing {routing!r}: downstream tasks are scored only in causal routing; top-k routing "
                        "chooses each token's blocks by looking at the whole row, answer tokens included")
    if not tasks or any(not t.strip() for t in tasks):
        raise SpecError(f"tasks {tasks!r}: expected task names, e.g. {','.join(LOCAL_TASKS)}")
    if known:
        names = set(task_manager().all_tasks)
        unknown = [t for t in tasks if t not in names]
        if unknown:
            from dtlab.models.config import did_you_mean

            raise SpecError(f"unknown lm-eval task {unknown[0]!r}{did_you_mean(unknown[0], names)}; offline tasks "
                            f"shipped with dtlab: {', '.join(LOCAL_TASKS)} (others load their data from the hub)")


def evaluate_run(run_dir: str | Path, tasks: Sequence[str] = LOCAL_TASKS, limit: int | None = None, batch_size: int = 8,
                 out: str | Path | None = None, device: str = "cpu", seed: int = 0) -> list[dict[str, Any]]:
    """Score one run's best checkpoint on `tasks` in causal routing, task by task; returns (and
    writes) its records."""
    from lm_eval.models.huggingface import HFLM

    from dtlab.trainers.tools.sample import load_run

    check_tasks(list(tasks))
    run = load_run(run_dir, device=device)
    model = run.model
    model.config.routing_mode = "causal"  # the loaded copy only: never top-k (see the module doc)
    lm = HFLM(pretrained=model, tokenizer=hf_tokenizer(run.tokenizer), batch_size=batch_size, backend="causal",
              max_length=_context_length(Path(run_dir), model), device=device, add_bos_token=False)
    records, results = [], {}
    for task in tasks:  # one at a time: each task's records carry its own realised capacity
        res, probe = _score(lm, model, task, limit, seed)
        results = _merge(results, res)
        records += task_records(res, run.step, probe, limit)
    write_results(Path(run_dir), Path(out) if out else Path(run_dir), results, records)
    return records


def _score(lm, model, task: str, limit: int | None, seed: int):
    import lm_eval

    probe = RoutingProbe(model)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=task_manager(),
                                      log_samples=False, bootstrap_iters=1000, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        probe.close()
    return res, probe


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """lm-eval results of several calls as one: their per-task sections joined."""
    if not a:
        return b
    for key in ("results", "n-samples", "configs", "versions", "higher_is_better", "group_subtasks"):
        if isinstance(b.get(key), dict):
            a.setdefault(key, {}).update(b[key])
    return a


def _context_length(run_dir: Path, model) -> int:
    """The sequence length the run trained on (positions beyond it were never seen in training)."""
    try:
        return int(json.loads((run_dir / "run.json").read_text())["data"]["block_size"])
    except (OSError, KeyError, TypeError, ValueError):
        return int(model.config.max_position_embeddings)


def task_records(results: dict[str, Any], step: int, probe: RoutingProbe,
                 limit: int | None) -> list[dict[str, Any]]:
    """One record per task and metric from lm-eval's results, with the routing the probe saw."""
    records = []
    mode, capacity = ",".join(sorted(probe.modes)) or "none", probe.capacity()
    for task, metrics in sorted(results.get("results", {}).items()):
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            records.append({"task": task, "metric": metric, "value": _num(value), "stderr": _num(stderr),
                            "routing_mode": mode, "capacity": capacity, "step": step, "limit": limit,
                            "samples": n})
    return records


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def results_path(run_dir: Path, out: Path | None) -> Path:
    """Where lm-eval's results JSON of `run_dir` goes: in the run, or in `out` named after the run."""
    if out is None or Path(out) == Path(run_dir):
        return Path(run_dir) / RESULTS
    return Path(out) / f"{Path(run_dir).parent.name}-{Path(run_dir).name}-{RESULTS}"


def write_results(run_dir: Path, out: Path, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """lm-eval's results JSON into `out`; the records into the run's `eval_tasks.jsonl`, replacing
    earlier records of the same tasks (other tasks' records are kept)."""
    from dtlab.analysis.rundir import read_jsonl, rewrite_jsonl, write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(results_path(run_dir, out), json.dumps(results, indent=1, default=_plain))
    path = run_dir / RECORDS
    tasks = {r["task"] for r in records}
    if path.is_file() and read_jsonl(path).records:
        rewrite_jsonl(path, lambda r: r.get("task") not in tasks, append=records)
    else:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def _plain(value: Any) -> Any:
    """JSON for what lm-eval's results hold besides plain values (numpy scalars, objects)."""
    return value.item() if hasattr(value, "item") else str(value)
