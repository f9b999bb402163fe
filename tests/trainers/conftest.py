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


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server on loopback (moto's server mode) with a bucket `dtlab`; gives a
    function from a prefix to the URI of that place (endpoint, scheme and region in its query), and
    sets the credentials in the environment (commands started by the test inherit them)."""
    import logging

    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="dtlab")
    yield lambda prefix: f"s3://dtlab/{prefix}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def stored(uri):
    """The filesystem of a storage URI and every checkpoint folder in it (`.../checkpoint_*` of each
    Ray run), found from the files they hold."""
    import re

    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    folders = {m.group(1) for i in infos if (m := re.match(r"(.*/checkpoint_[0-9][^/]*)/", i.path))}
    return fs, sorted(folders)
