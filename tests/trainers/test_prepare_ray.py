"""Preparation through Ray Data on a local Ray instance: the same shards and split, byte for byte, as one
process, for a source read in several parts (parquet row groups, jsonl files), cut by `max_bytes` inside a
document and by `max_tokens`."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dtlab.trainers.run import data as D
from dtlab.trainers.spec import DataSpec
from tests.trainers.test_prepare import _corpus, _jsonl

pytestmark = pytest.mark.slow  # a Ray instance and three Ray Data pipelines: about 30 s here


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "meta.json"}


def test_ray_data_writes_the_shards_of_one_process(tmp_path, ray_instance, monkeypatch):
    from dtlab.trainers.orchestrate import prepare_ray as R

    monkeypatch.setattr(R, "TOKENIZE_CPUS", 0.75)  # two tokenizing actors and a read task in 2 CPUs
    monkeypatch.setattr(D, "BATCH_DOCS", 40)  # several blocks a part, tokenized by either actor
    monkeypatch.setattr("dtlab.trainers.run.shards.SHARD_TOKENS", 32 * 400)  # several shards a split
    docs = _corpus(600)
    pd.DataFrame({"text": docs}).to_parquet(tmp_path / "c.parquet", row_group_size=150)
    (tmp_path / "j").mkdir()
    for i in range(3):
        _jsonl(tmp_path / "j" / f"part{i}.jsonl", docs[i::3])
    chars = np.cumsum([len(d) for d in docs])
    cut = int(chars[250]) - 100  # inside the 251st document (of the parquet's order), cut short
    assert chars[249] < cut < chars[250]
    cases = {"parquet": {"source": str(tmp_path / "c.parquet")},
             "parquet, max_bytes inside a document": {"source": str(tmp_path / "c.parquet"), "max_bytes": cut},
             "jsonl files, max_tokens": {"source": str(tmp_path / "j"), "max_tokens": 60_000}}
    for name, extra in cases.items():
        spec = DataSpec(vocab_size=300, block_size=32, **extra)
        assert len(D.read_parts(spec, D.resolve_source(spec))) >= 3, name  # read in parts, on any node
        one = D.prepare_data(spec.model_copy(update={"cache_dir": str(tmp_path / name / "one")}))
        ray = R.prepare_with_ray(spec.model_copy(update={"cache_dir": str(tmp_path / name / "ray")}), actors=2)
        assert ray.path.name == one.path.name and ray.meta["engine"].startswith("Ray Data: 2 tokenizing actor")
        assert one.meta["split"].startswith("by document") and one.meta["split"] == ray.meta["split"]
        assert len(one.meta["shards"]["train"]) > 1, name
        assert _files(ray.path) == _files(one.path), name  # shards and document index, byte for byte
        for key in ("shards", "tokens", "documents", "train_rows", "val_rows", "val_bytes"):
            assert ray.meta[key] == one.meta[key], (name, key)
        if "max_bytes" in extra:
            assert one.meta["characters"] == ray.meta["characters"] == cut and one.meta["documents"] == 251
        if "max_tokens" in extra:
            assert ray.meta["tokens"] == 60_000 < D.prepare_data(spec.model_copy(update={
                "max_tokens": None, "cache_dir": str(tmp_path / name / "full")})).meta["tokens"]


def test_prepare_command_with_ray(tmp_path, ray_instance):
    """`dtlab prepare SPEC --ray` joins the cluster at RAY_ADDRESS and says how it prepared; the shards are
    those of one process."""
    import os
    import subprocess
    import sys

    path = _jsonl(tmp_path / "c.jsonl", _corpus(300))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\ndata:\n  source: {path}\n  vocab_size: 300\n  block_size: 32\n")
    env = {**os.environ, "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address}
    res = subprocess.run([sys.executable, "-m", "dtlab.trainers", "prepare", str(spec), "--ray", "--workers", "1",
                          "--out", str(tmp_path / "shared")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "tokens/s with Ray Data: 1 tokenizing actor(s) on a cluster of 1 node(s), 2 CPUs" in res.stdout, res.stdout
    folder = Path(res.stdout.split("shards: ")[1].split()[0])
    one = D.prepare_data(DataSpec(source=str(path), vocab_size=300, block_size=32, cache_dir=str(tmp_path / "one")))
    assert folder.name == one.path.name and _files(folder) == _files(one.path)
