"""Ray Train driver: the per-worker loop inside a `TorchTrainer` (DDP: gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtlab.trainers.orchestrate.replicates import train_trial
from dtlab.trainers.run.checkpoint import pack_for_storage, unpack_from_storage
from dtlab.trainers.run.loop import Hooks
from dtlab.trainers.spec import Spec

if TYPE_CHECKING:
    from ray.train import RunConfig, ScalingConfig

log = logging.getLogger(__name__)


class RayHooks(Hooks):
    """The loop's Ray lines: device from Ray, metrics to `ray.train.report`. With
    `resources.storage` set, Ray's storage holds the checkpoint of record: each checkpoint goes there
    with the run's records (`checkpoint.pack_for_storage`), and a start reads the latest back from
    `ray.train.get_checkpoint()`. Without it, the run directory is the record and Ray keeps no copy."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.run_dir = Path(config["run_dir"])
        self.storage = (config["spec"].get("resources") or {}).get("storage")

    def device(self, requested: str) -> torch.device:
        import ray.train.torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return ray.train.torch.get_device()
        return super().device("cpu" if requested == "cuda" else requested)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        if not (self.storage and checkpoint_dir):
            ray.train.report(metrics)
            return
        # beside the checkpoints (hard links need the same file system); one a kill left is removed here
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        for stale in (self.run_dir / "checkpoints").glob(".storage-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=self.run_dir / "checkpoints", prefix=".storage-", suffix=".tmp") as tmp:
            pack_for_storage(self.run_dir, Path(tmp) / "run")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(Path(tmp) / "run")))

    def restore(self, run_dir: Path) -> None:
        """The latest checkpoint in storage, installed where this run's ranks read it: by the first
        rank, then by the first rank of each node whose run directory is still older (not shared)."""
        import ray.train

        if not self.storage:
            return
        ckpt, ctx = ray.train.get_checkpoint(), ray.train.get_context()
        first = ctx.get_world_rank() == 0
        for turn in (first, not first and ctx.get_local_rank() == 0):
            if ckpt is not None and turn:
                with ckpt.as_directory() as folder:
                    for line in unpack_from_storage(Path(folder), run_dir):
                        log.debug(line)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()

    def export(self, record: dict[str, Any]) -> None:
        from dtlab.dashboards.metrics import export_record

        export_record(record)


def init_ray(dashboard_host: str = "127.0.0.1") -> Any:
    """Join the cluster at RAY_ADDRESS, or start a local one on 127.0.0.1: its nodes advertise and
    connect over loopback and the dashboard listens there only. (Ray 2.60's own gRPC servers, GCS,
    raylet and workers, still listen on every interface and no setting changes that; a strict xfail
    test says when a Ray release does.)"""
    import os

    import ray

    address = os.environ.get("RAY_ADDRESS")
    local = {} if address else {"_node_ip_address": "127.0.0.1"}
    return ray.init(address=address, include_dashboard=True, dashboard_host=dashboard_host, **local)


def ray_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: the `dtlab` log to this process's stdout (Ray sends it to the driver, where
    it lands in output.log), then the run or the trial."""
    dtlab_log = logging.getLogger("dtlab")
    if not dtlab_log.handlers:
        # sys.stdout itself: Ray Train patches `print`, which would show each line twice on the driver
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        dtlab_log.addHandler(handler)
        dtlab_log.setLevel(logging.DEBUG)
    train_trial({**config, "data_dir": str(node_data(config))}, RayHooks(config))


def node_data(config: dict[str, Any]) -> Path:
    """The prepared data where this worker can read it: the driver's folder when this node sees it
    (one machine, a shared cache), else prepared here from the spec, deterministically (the same
    cache key, hence the same rows, or a refusal)."""
    from dtlab.trainers.run.data import prepare_data

    folder = Path(config["data_dir"])
    if (folder / "meta.json").is_file():
        return folder
    here = prepare_data(Spec.model_validate(config["spec"]).data).path
    if here.name != folder.name:
        raise RuntimeError(f"data prepared on this node ({here.name}) differs from the driver's ({folder.name}): "
                           "the source or tokenizer is not the same on every node")
    return here


def run_config(spec: Spec, name: str, local: Path, callbacks: Sequence[Any] = ()) -> RunConfig:
    """A run's Ray `RunConfig`: storage in `resources.storage` (a URI or a path all nodes share) or
    `local`; at most one latest and one best (lowest val_loss) checkpoint kept there; restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=spec.resources.storage or str(local), callbacks=list(callbacks),
                     checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                                        checkpoint_score_order="min"),
                     failure_config=FailureConfig(max_failures=spec.resources.max_failures))


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is part of (not of the node it runs on: a sweep's trial
    driver holds no GPU and may sit on a node without one)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


def scaling(spec: Spec) -> ScalingConfig:
    """The workers of a run, decided from the cluster's resources: Ray then places each rank where
    what it asks for is."""
    from ray.train import ScalingConfig

    res = spec.resources
    use_gpu = res.device in ("auto", "cuda") and cluster_gpus() > 0
    if res.device == "cuda" and not use_gpu:
        raise ValueError("resources.device='cuda' but the Ray cluster has no GPU")
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker if res.gpus_per_worker is not None else 1.0
    return ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker)


def train_with_ray(config: dict[str, Any], spec: Spec) -> dict[str, Any]:
    import ray
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        init_ray()
    run_dir = Path(config["run_dir"])
    trainer = TorchTrainer(ray_worker, train_loop_config=config, scaling_config=scaling(spec),
                           run_config=run_config(spec, storage_name(run_dir), run_dir / "ray"))
    result = trainer.fit()
    if result.error:
        raise result.error
    # the run's own last evaluation (Ray's `result.metrics` are those of its last checkpoint: none when
    # the run directory, not Ray's storage, holds the checkpoints)
    from dtlab.analysis.rundir import METRICS, read_jsonl
    from dtlab.trainers.run.loop import scalars

    evals = read_jsonl(run_dir / METRICS).of_kind("eval")
    return scalars(evals[-1]) if evals else dict(result.metrics or {})


def storage_name(run_dir: Path) -> str:
    """The run's name in Ray's storage: its folder's name and an id kept in `run.json`, so that runs
    of one name from different experiments never share a place in a shared storage."""
    import json
    import uuid

    run_json = run_dir / "run.json"
    run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    if not run.get("storage_name"):
        run["storage_name"] = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        run_json.write_text(json.dumps(run, indent=1))
    return run["storage_name"]
