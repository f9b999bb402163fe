import pytest


@pytest.fixture(autouse=True, scope="session")
def _dtlab_cache(tmp_path_factory):
    """One cache (tokenizers, packed data) for the whole test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DTLAB_CACHE", str(tmp_path_factory.mktemp("dtlab-cache")))
    yield
    mp.undo()


def tiny_spec(**sections):
    """A spec dict that trains the debug model in seconds."""
    spec = {
        "name": "t",
        "model": {"type": "mod", "size": "debug"},
        "data": {"source": "builtin", "vocab_size": 512, "block_size": 64, "max_bytes": 300_000},
        "training": {"max_steps": 12, "batch_size": 4, "eval_every": 4, "eval_batches": 2, "log_every": 2,
                     "optimizer": {"lr": 3e-3}, "scheduler": {"warmup_steps": 2}},
        "resources": {"use_ray": False, "device": "cpu"},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec
