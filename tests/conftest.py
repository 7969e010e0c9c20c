"""Session fixtures shared by every test package: a real S3-compatible server (moto, in server mode).

The server listens on 127.0.0.1 on a free port and speaks the S3 HTTP API, so s3fs/botocore go through
their real request path (signing, multipart, listings) rather than an in-process mock.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# Credentials moto accepts; nothing here can reach a real AWS account (the endpoint is local).
_S3_KEY = "testing"
_S3_SECRET = "testing"
# Test-only tasks the Ray workers must find (models/registry.py imports them through SHARDWISE_TASK_MODULES).
_TEST_TASK_MODULES = ("tests.engine.faulty_task",)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server for the whole session: {"endpoint_url", "key", "secret", "region"}.

    AWS_* variables are set for the session too, so clients that read credentials from the environment
    (boto3, s3fs without explicit options) find the test ones and never a developer's real profile.
    """
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = {
        "endpoint_url": f"http://{host}:{port}",
        "key": _S3_KEY,
        "secret": _S3_SECRET,
        "region": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", _S3_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", _S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", info["region"])
        mp.setenv("AWS_ENDPOINT_URL_S3", info["endpoint_url"])
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        # A proxy from the environment must not capture requests to the local server.
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield info
    server.stop()


@pytest.fixture(scope="session")
def s3_storage_options(s3_server: dict[str, str]) -> dict[str, Any]:
    """fsspec/s3fs storage_options for the test server, as a job spec would carry them."""
    return {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}


@pytest.fixture
def s3_bucket(s3_storage_options: dict[str, Any]) -> str:
    """A fresh, empty bucket per test (its name), so tests never see each other's objects."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **s3_storage_options).mkdir(name)
    return name


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray cluster with 4 logical CPUs: 2 replicas + a read task + a commit task always fit.

    Its workers inherit this process's environment as it is when the cluster starts, so the test-only
    tasks are added to SHARDWISE_TASK_MODULES first (kept for the session: a CLI subprocess that starts its own cluster sees them too).
    """
    import ray

    from models.registry import TASK_MODULES_ENV
    from pipeline.execute import init_ray

    with pytest.MonkeyPatch.context() as mp:
        modules = [m for m in os.environ.get(TASK_MODULES_ENV, "").split(",") if m.strip()]
        mp.setenv(TASK_MODULES_ENV, ",".join(dict.fromkeys([*modules, *_TEST_TASK_MODULES])))
        init_ray(address=None, num_cpus=4)
        yield ray
        ray.shutdown()
