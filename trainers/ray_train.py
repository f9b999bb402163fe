"""Ray Train driver: the per-worker loop inside a `TorchTrainer` (DDP: gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from .loop import Hooks, train
from .spec import Spec


class RayHooks(Hooks):
    """The loop's Ray lines: device from Ray, metrics and checkpoints to `ray.train.report`."""

    def device(self, requested: str) -> torch.device:
        import ray.train.torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return ray.train.torch.get_device()
        return super().device("cpu" if requested == "cuda" else requested)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


    def log(self, line: str) -> None:
        # Ray Train patches `print` to log and tee, which shows each line twice on the driver.
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def export(self, record: dict[str, Any]) -> None:
        from dtlab.dashboards.metrics import export_record

        export_record(record)


def init_ray(dashboard_host: str = "127.0.0.1"):
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
    train(config, RayHooks())


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is part of (not of the node it runs on: a sweep's trial
    driver holds no GPU and may sit on a node without one)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


def scaling(spec: Spec):
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


def train_with_ray(config: dict[str, Any], spec: Spec, log=print) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        init_ray()
    run_dir = Path(config["run_dir"])
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=config,
        scaling_config=scaling(spec),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=spec.resources.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})
