"""Ray Train driver: the per-worker loop inside a `TorchTrainer` (DDP: gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import logging
import os
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
        starts = os.environ.get("DTLAB_WORKER_STARTS")
        if starts:  # tests count worker-group starts: one line per worker process that starts this run
            with open(starts, "a") as f:
                f.write(f"{self.run_dir.name} {os.getpid()}\n")

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
                _host_barrier()

    def export(self, record: dict[str, Any]) -> None:
        from dtlab.dashboards.metrics import export_record

        export_record(record)


def _host_barrier() -> None:
    """A barrier over every rank that needs no GPU of its own: over gloo (a NCCL barrier refuses two
    ranks on one GPU, as a trial's seeds side by side on a shared GPU are)."""
    dist = torch.distributed
    if dist.get_backend() == "gloo":
        dist.barrier()
        return
    group = dist.new_group(backend="gloo")  # every rank calls this at the same point: a collective
    dist.barrier(group=group)
    dist.destroy_process_group(group)


# What a worker on another node needs from the driver's environment: dtlab's own settings (the data
# cache, DTLAB_*), Hugging Face's (cache, token, offline mode), the trackers' and the object stores'
# credentials for `resources.storage`. Only those set here are sent.
FORWARDED_PREFIXES = ("DTLAB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "WANDB_", "MLFLOW_", "AWS_", "GOOGLE_",
                      "AZURE_STORAGE_")
FORWARDED = ("TOKENIZERS_PARALLELISM", "CUDA_LAUNCH_BLOCKING", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
             "GLOO_SOCKET_IFNAME")


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables every Ray task and worker of this job gets (`runtime_env`), so that
    a worker on another node reads the same cache, token and storage credentials as the driver."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in sorted(environ.items()) if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED}


def init_ray(dashboard_host: str = "127.0.0.1") -> Any:
    """Join the cluster at RAY_ADDRESS, or start a local one; the dashboard listens on
    `dashboard_host` (loopback by default). Every task and worker of the job gets `worker_env()`
    through the job's `runtime_env`, on whichever node it runs. (Ray 2.60's own gRPC servers, GCS,
    raylet and workers, listen on every interface whatever the node's address, and no public setting
    changes that; a strict xfail test says when a Ray release does.)"""
    import ray

    return ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=True, dashboard_host=dashboard_host,
                    runtime_env={"env_vars": worker_env()})


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


def node_data(config: dict[str, Any], poll_s: float = 1.0) -> Path:
    """The prepared data where this worker can read it: the driver's folder when this node sees it
    (one machine, a shared cache), else prepared on this node from the spec, deterministically (the
    same cache key, hence the same rows, or a refusal): by its first local rank (`LOCAL_RANK`, which
    Ray Train's torch backend sets; 0 where unset), while the node's other ranks wait for the folder's
    manifest, which appears only once the folder is whole. The cache's file lock still keeps any two
    processes from preparing one key at once. (A first rank that fails fails the worker group, and
    Ray Train stops the ranks that wait.)"""
    import time

    from dtlab.trainers.run.data import prepare_data, prepared_folder

    folder = Path(config["data_dir"])
    if (folder / "meta.json").is_file():
        return folder
    data = Spec.model_validate(config["spec"]).data
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if local_rank == 0:
        here = prepare_data(data).path
    else:
        here = prepared_folder(data)  # its key, from the spec (reads no corpus)
        if not (here / "meta.json").is_file():
            log.info(f"local rank {local_rank}: waiting for local rank 0 to prepare the data in {here}")
        while not (here / "meta.json").is_file():
            time.sleep(poll_s)
    if here.name != folder.name:
        raise RuntimeError(f"data prepared on this node ({here.name}) differs from the driver's ({folder.name}): "
                           "the source or tokenizer is not the same on every node")
    return here


def run_config(spec: Spec, name: str, local: Path, callbacks: Sequence[Any] = ()) -> RunConfig:
    """A run's Ray `RunConfig`: storage in `resources.storage` (a URI or a path all nodes share) or
    `local`; at most one latest and one best (lowest val_loss) checkpoint kept there. Ray Train
    restarts nothing itself (its `FailureConfig` retries every worker-group error, a divergence or an
    out-of-memory too, with no way to tell them apart): the one retry layer is the caller's,
    `runner.launch` for a run and Tune's for a sweep's trial (`resources.max_failures`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=spec.resources.storage or str(local), callbacks=list(callbacks),
                     checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                                        checkpoint_score_order="min"),
                     failure_config=FailureConfig(max_failures=0, max_preemption_failures=0))


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is part of (not of the node it runs on: a sweep's trial
    driver holds no GPU and may sit on a node without one)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


def scaling(spec: Spec, seeds: int = 1) -> ScalingConfig:
    """The workers of a run, decided from the cluster's resources: Ray then places each rank where
    what it asks for is. A trial of several seeds gets `num_workers` ranks for each, so that its
    seeds train side by side, each on devices of its own (`replicates.train_side_by_side`)."""
    from ray.train import ScalingConfig

    res = spec.resources
    use_gpu = res.device in ("auto", "cuda") and cluster_gpus() > 0
    if res.device == "cuda" and not use_gpu:
        raise ValueError("resources.device='cuda' but the Ray cluster has no GPU")
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker if res.gpus_per_worker is not None else 1.0
    return ScalingConfig(num_workers=res.num_workers * max(1, seeds), use_gpu=use_gpu,
                         resources_per_worker=per_worker)


def train_with_ray(config: dict[str, Any], spec: Spec) -> dict[str, Any]:
    import ray
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        init_ray()
    run_dir = Path(config["run_dir"])
    seeds = len(config.get("seeds") or []) or 1
    trainer = TorchTrainer(ray_worker, train_loop_config=config, scaling_config=scaling(spec, seeds),
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
