"""Shared test setup: never touch the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging
import socket
import uuid

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on 127.0.0.1 (moto's server, a free port) with one bucket, `embedcache-test`."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    pytest.importorskip("s3fs", reason="s3fs is a test dependency")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    os.environ.update(S3_ENV)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("embedcache-test")
    yield endpoint
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def reduced_array_cache(tmp_path_factory):
    """Reduced arrays (fusion.reduced) made by tests, and by the commands they run, go to a temporary cache."""
    from fusion.reduced import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("embedcache-cache"))
