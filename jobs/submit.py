"""Offline jobs on a running Ray cluster: `shardwise submit` and `shardwise jobs list|status|logs|stop`.

`submit` validates the spec here (a bad spec never reaches the cluster), checks that every path in it is
one the cluster can read, and hands the job to Ray's Job Submission API. The driver then runs on the
cluster (`python -m jobs run job.yaml --address auto --no-progress`) and this process returns at once.

What travels: the resolved spec (the YAML after `--set`) as the job's `working_dir`, one small file. The
shardwise code does not travel: every node must have shardwise installed (the cluster image, see
infra/Dockerfile), the same version as the client. Models and data do not travel either; the driver and
workers read them from where the spec points, so the spec may only name places the cluster can see:

    s3://, gs://, hf://, ... URIs     always allowed (credentials come from the cluster's environment)
    hub ids (org/name)                allowed (the cluster must be able to reach or cache the hub)
    relative local paths, ~/...       always refused: the driver's working directory on the cluster is
                                      the job's package directory, not yours, and ~ is another home
    absolute local paths, file://     refused unless --local-paths-ok: say so when every node mounts the
                                      path (a shared filesystem, or a cluster on this machine)
    memory://                         always refused (it lives inside one process)

Authentication: Ray clusters with token authentication (`RAY_AUTH_MODE=token`) need a bearer token on
every request. `--auth-token-file PATH`, else `RAY_AUTH_TOKEN`, else the file named by
`RAY_AUTH_TOKEN_PATH` is sent as `Authorization: Bearer <token>`; with none of them, Ray's own client
rules apply (`RAY_AUTH_MODE=token` and `~/.ray/auth_token`). The token is never written into the job.

Address: `--address`, else `RAY_API_SERVER_ADDRESS`, else `RAY_ADDRESS`, else http://127.0.0.1:8265. An
explicit `--address` wins over the environment (Ray's own client lets the environment win).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import shlex
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.bind import load_job as load_spec
from pipeline.errors import ShardwiseError, SpecError
from pipeline.spec import JobSpec, apply_overrides, parse_spec

__all__ = [
    "ClusterError",
    "JobInfo",
    "check_paths",
    "connect",
    "job_info",
    "job_logs",
    "list_jobs",
    "stop_job",
    "submit",
    "wait_job",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Metadata keys on every job shardwise submits; `jobs list` shows only jobs that carry them.
_META_NAME = "shardwise.name"
_META_OUTPUT = "shardwise.output"
_META_SPEC = "shardwise.spec"
# Same rule as models.loading: a hub id is `name` or `org/name` that is not a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SPEC_FILE = "job.yaml"


class ClusterError(ShardwiseError):
    """The Ray job server cannot be reached, refuses the request, or does not know the job."""


@dataclass(frozen=True)
class JobInfo:
    """One submitted job as the cluster reports it."""

    submission_id: str
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    name: str | None
    output: str | None
    message: str | None
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    entrypoint: str

    @property
    def terminal(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")


# -------------------------------------------------------------------------------------------------------
# Paths the cluster can see


def _path_keys(spec: JobSpec) -> Iterator[tuple[str, str, bool]]:
    """(key, value, is_model) for every location a spec names."""
    yield "input.uri", spec.input.uri, False
    yield "output.uri", spec.output.uri, False
    for i, stage in enumerate(spec.stages):
        yield f"stages[{i}].model", stage.model, True
    if spec.train is not None:
        if spec.train.eval_input is not None:
            yield "train.eval_input.uri", spec.train.eval_input.uri, False
        if spec.train.checkpoint_uri is not None:
            yield "train.checkpoint_uri", spec.train.checkpoint_uri, False


def check_paths(spec: JobSpec, *, local_paths_ok: bool = False) -> None:
    """Refuse locations the cluster cannot read (rules in the module docstring); SpecError names the key."""
    for key, value, is_model in _path_keys(spec):
        if value.startswith("memory://"):
            raise SpecError(
                key,
                f"{value!r} is an in-memory filesystem of this process; the cluster cannot see it. "
                "Write the data to shared storage (e.g. s3://bucket/...) and point the spec there",
            )
        if "://" in value and not value.startswith("file://"):
            continue  # s3://, gs://, hf://, ...: readable wherever the credentials are
        local = value[len("file://") :] if value.startswith("file://") else value
        if is_model and _HUB_ID.match(value) and not local.startswith((".", "/", "~")):
            if not Path(local).exists():
                continue  # a hub id, resolved by the cluster
        if not local.startswith("/"):
            raise SpecError(
                key,
                f"{value!r} is a relative local path; the driver runs on the cluster, where the working "
                "directory is the job's package directory, not yours (and ~ is another home). Use a URI "
                "(s3://bucket/...) or an absolute path on storage every node mounts, with --local-paths-ok",
            )
        if not local_paths_ok:
            raise SpecError(
                key,
                f"{value!r} is a path on this machine, which the cluster's nodes cannot see. Upload it to "
                "storage the cluster reads (e.g. s3://bucket/...) and use that URI; or, if every node "
                "mounts this path (a shared filesystem, or a cluster on this machine), pass --local-paths-ok",
            )


# -------------------------------------------------------------------------------------------------------
# The client


def _auth_token(token_file: str | None) -> str | None:
    path = token_file
    if path is None:
        if os.environ.get("RAY_AUTH_TOKEN"):
            return os.environ["RAY_AUTH_TOKEN"].strip()
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path is None:
        return None
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise ClusterError(
            f"cannot read the Ray auth token file {path!r}: {e.strerror or e}; point --auth-token-file "
            "(or RAY_AUTH_TOKEN_PATH) at the file `ray get-auth-token` printed the token into"
        ) from e
    if not token:
        raise ClusterError(f"the Ray auth token file {path!r} is empty")
    return token


def resolve_address(address: str | None) -> str:
    return (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its `address` argument."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _cluster_error(address: str, e: BaseException) -> ClusterError:
    text = str(e)
    if type(e).__name__ == "AuthenticationError" or "Authentication" in text or "status code 40" in text:
        if "401" in text or "required" in text.lower():
            return ClusterError(
                f"the Ray cluster at {address} requires token authentication and no token was sent: set "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or pass --auth-token-file) to the cluster's token"
            )
        return ClusterError(
            f"the Ray cluster at {address} refused the request ({text.splitlines()[0]}); check the token in "
            "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / --auth-token-file is the cluster's"
        )
    if isinstance(e, ConnectionError) or "Failed to connect" in text:
        return ClusterError(
            f"cannot reach the Ray job server at {address}: {text}. Start the head node with the dashboard "
            "(ray start --head --include-dashboard=true) or pass --address http://HOST:8265"
        )
    return ClusterError(f"the Ray job server at {address} failed the request: {text}")


class _Client:
    """JobSubmissionClient with shardwise's address, token and error rules."""

    def __init__(self, address: str | None, *, token_file: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        token = _auth_token(token_file)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            with _without_address_env():
                self.ray = JobSubmissionClient(self.address, headers=headers)
        except Exception as e:  # noqa: BLE001 - connection, auth and version errors all mean "cannot use it"
            raise _cluster_error(self.address, e) from e

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if "does not exist" in str(e):
                raise ClusterError(
                    f"no job {args[0] if args else ''!r} on the cluster at {self.address}; "
                    "`shardwise jobs list` shows the submitted ones"
                ) from e
            raise _cluster_error(self.address, e) from e


def connect(address: str | None = None, *, token_file: str | None = None) -> _Client:
    """A client for the job server at `address` (rules in the module docstring); ClusterError otherwise."""
    return _Client(address, token_file=token_file)


# -------------------------------------------------------------------------------------------------------
# Submit


_SECRET_WORDS = ("secret", "password", "token", "key", "credential")


def secret_keys(spec: JobSpec) -> list[str]:
    """Spec keys under storage_options that look like credentials (they travel inside the job)."""
    found = []
    for section, options in (("input", spec.input.storage_options), ("output", spec.output.storage_options)):
        found += [
            f"{section}.storage_options.{k}" for k in options if any(w in k.lower() for w in _SECRET_WORDS)
        ]
    return found


def _resolved_data(spec_path: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    data = yaml.safe_load(Path(spec_path).read_text())
    return apply_overrides(copy.deepcopy(data), overrides)


def _submission_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"shardwise-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def entrypoint(*, overwrite: bool = False, wait_s: float = 0.0) -> str:
    """The driver's command on the cluster; `--address auto` joins the cluster the job runs on."""
    args = ["python", "-m", "jobs", "run", SPEC_FILE, "--address", "auto", "--no-progress"]
    if overwrite:
        args.append("--overwrite")
    if wait_s:
        args += ["--wait", f"{wait_s:g}"]
    return shlex.join(args)


def submit(
    spec_path: str | Path,
    *,
    overrides: Sequence[str] = (),
    address: str | None = None,
    overwrite: bool = False,
    local_paths_ok: bool = False,
    token_file: str | None = None,
    wait_s: float = 0.0,
    warn: Callable[[str], Any] | None = None,
) -> str:
    """Validate `spec_path`, check its paths, submit it; returns the submission id at once."""
    spec = load_spec(spec_path, overrides)  # SpecError names the key: nothing is sent
    check_paths(spec, local_paths_ok=local_paths_ok)
    if warn is not None and (keys := secret_keys(spec)):
        warn(
            f"{', '.join(keys)} travel inside the job (Ray keeps its package); prefer credentials from "
            "the cluster's environment (instance roles, AWS_* variables on the nodes)"
        )
    data = _resolved_data(spec_path, overrides)
    if parse_spec(data) != spec:  # the shipped YAML must be the job that was validated
        raise SpecError("", f"{spec_path}: the resolved spec does not round-trip; this is a shardwise bug")
    client = connect(address, token_file=token_file)
    submission_id = _submission_id(spec.name)
    with tempfile.TemporaryDirectory(prefix="shardwise-submit-") as tmp:
        # The working_dir holds only the spec: Ray zips and uploads it during submit_job.
        (Path(tmp) / SPEC_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
        client.call(
            client.ray.submit_job,
            entrypoint=entrypoint(overwrite=overwrite, wait_s=wait_s),
            submission_id=submission_id,
            runtime_env={"working_dir": tmp},
            metadata={
                _META_NAME: spec.name,
                _META_OUTPUT: spec.output.uri,
                _META_SPEC: str(spec_path),
            },
        )
    return submission_id


# -------------------------------------------------------------------------------------------------------
# jobs list | status | logs | stop


def _info(details: Any) -> JobInfo:
    meta = details.metadata or {}
    return JobInfo(
        submission_id=details.submission_id or details.job_id,
        status=str(details.status),
        name=meta.get(_META_NAME),
        output=meta.get(_META_OUTPUT),
        message=details.message,
        start_time=details.start_time / 1000 if details.start_time else None,
        end_time=details.end_time / 1000 if details.end_time else None,
        entrypoint=details.entrypoint,
    )


def list_jobs(client: _Client) -> list[JobInfo]:
    """Shardwise jobs on the cluster (submitted with `submit`), oldest first."""
    jobs = [
        _info(d)
        for d in client.call(client.ray.list_jobs)
        if d.submission_id and _META_NAME in (d.metadata or {})
    ]
    return sorted(jobs, key=lambda j: j.start_time or 0.0)


def job_info(client: _Client, submission_id: str) -> JobInfo:
    return _info(client.call(client.ray.get_job_info, submission_id))


def job_logs(
    client: _Client, submission_id: str, *, follow: bool = False, write: Callable[[str], Any]
) -> JobInfo:
    """Write the job's driver log; with `follow`, keep writing until the job ends. Returns its final info."""
    if not follow:
        write(client.call(client.ray.get_job_logs, submission_id))
        return job_info(client, submission_id)
    job_info(client, submission_id)  # a ClusterError naming the id beats a websocket error

    async def tail() -> None:
        async for chunk in client.ray.tail_job_logs(submission_id):
            write(chunk)

    client.call(asyncio.run, tail())
    return wait_job(client, submission_id, timeout_s=30.0)


def wait_job(client: _Client, submission_id: str, *, timeout_s: float, poll_s: float = 0.5) -> JobInfo:
    """Poll until the job is in a terminal state (or `timeout_s` passed); returns its last info."""
    deadline = time.monotonic() + timeout_s
    info = job_info(client, submission_id)
    while not info.terminal and time.monotonic() < deadline:
        time.sleep(poll_s)
        info = job_info(client, submission_id)
    return info


def stop_job(client: _Client, submission_id: str, *, timeout_s: float = 60.0) -> JobInfo:
    """Ask Ray to stop the job (SIGTERM to the driver, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S) and wait
    until it is terminal. Committed shards stay committed: resubmitting the same spec resumes."""
    client.call(client.ray.stop_job, submission_id)
    return wait_job(client, submission_id, timeout_s=timeout_s)
