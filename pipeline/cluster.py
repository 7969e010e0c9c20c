"""The Ray cluster a job runs on: a joined one (`--address`) or the embedded one shardwise starts.

The embedded cluster is private to the user who runs the job:

- **Loopback only.** Its node address is 127.0.0.1, and Ray binds every listener it opens to the node
  address: the GCS, the raylet (node manager and object manager), every worker's and the driver's gRPC
  server, the runtime-env agent. Seen with ray 2.60 (tests/engine/test_cluster_security.py lists them);
  without this they listened on all interfaces (`:::port`) and the runtime-env agent on the host's IP.
  Not started at all: the dashboard (`include_dashboard=False`), the Ray Client server (only with a
  client port), the metrics export (the dashboard agent runs `--minimal` without the dashboard and opens
  no port). Ray Train's torch process group (fine-tuning) is set up by torch from the worker's node
  address, so it uses 127.0.0.1 too.
- **Token authentication, set explicitly.** `RAY_AUTH_MODE=token` with a fresh random token per process in
  `RAY_AUTH_TOKEN` (inherited by the cluster's processes only, never written to disk; Ray's own default
  would write a shared `~/.ray/auth_token`, mode 0644). A user's own `RAY_AUTH_MODE` / token settings win.
- **Shut down with the driver.** On normal exit (atexit) and on SIGTERM/SIGINT the driver calls
  `ray.shutdown()` and then ends whatever is left of the processes Ray started (agents outlived a killed
  driver by more than 20 s), then re-delivers the signal's previous behaviour (SIGINT: KeyboardInterrupt;
  SIGTERM: the process ends by the signal). Never for a joined cluster: the driver only disconnects.
  A SIGKILLed driver cannot do this: then a small watchdog process (pipeline/_watchdog.py), which sees
  the driver's end as the end of a pipe, ends them (Ray's own fate sharing stops only the GCS and the
  raylet; its agents outlived the driver by more than 20 s).
- **A quiet console.** `quiet_console()` (the CLI, unless `--verbose`) sends what Ray prints in the driver
  (its Python loggers and warnings, the cluster errors it relays such as "(raylet) A worker died", its C++
  log lines on file descriptor 2) to a log file under
  `<cache>/logs/`; shardwise's own output (`sys.stderr`: progress bar, errors) stays on the terminal.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import io
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.loading import cache_dir

__all__ = ["init_ray", "quiet_console", "ray_log_file", "shutdown_embedded"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# How long Ray's processes get to exit after ray.shutdown(), then after SIGTERM, before SIGKILL.
_EXIT_GRACE_S = 3.0
# Log files of earlier runs kept in <cache>/logs (one per CLI run).
_KEEP_LOGS = 20
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# <time>-<pid>.log: the names quiet_console writes, the only ones it ever deletes.
_LOG_NAME = re.compile(r"\d{8}T\d{6}-\d+\.log")


@dataclass
class _Embedded:
    """The cluster this process started: the pids of its children before ray.init, then the GCS address and
    Ray's processes (psutil.Process)."""

    before: set[int]
    gcs_address: str | None = None
    procs: list[Any] = field(default_factory=list)
    # Write end of the pipe to pipeline/_watchdog.py, which ends Ray's processes if this driver dies.
    watchdog: Any = None


_embedded: _Embedded | None = None
_previous_handlers: dict[int, Any] = {}
_atexit_registered = False
_log_file: Path | None = None


def init_ray(*, address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join `address` (a running cluster; "auto" finds it) or start the embedded local cluster once."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        if _is_loopback_address(address):
            # A cluster on this machine, addressed by loopback: ray.init would swap 127.0.0.1 for the host's
            # IP, which a cluster bound to loopback does not answer on. Stay on loopback.
            with _loopback_node():
                ray.init(
                    address=address,
                    runtime_env=env,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    _node_ip_address=LOOPBACK,
                )
        else:
            ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=False)
        _route_ray_logs()
        return
    shutdown_embedded()  # leftovers of an earlier embedded cluster that someone else disconnected
    _require_token_auth()
    global _embedded, _atexit_registered
    psutil = _psutil()
    # Recorded before ray.init, so that a signal or error while Ray starts still ends what it started.
    state = _Embedded(before={p.pid for p in psutil.Process().children(recursive=True)})
    _embedded = state
    if not _atexit_registered:
        atexit.register(shutdown_embedded)
        _atexit_registered = True
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    with _loopback_node():
        # address="local" always starts a new cluster; plain init() would join a stale one from a file.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            runtime_env=env,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _node_ip_address=LOOPBACK,
        )
    state.gcs_address = _gcs_address()
    state.procs = _started_by_ray(state)
    state.watchdog = _start_watchdog(state.procs)
    # After ray.init: it installs its own SIGTERM handler (sys.exit) and its C++ core one that aborts.
    _install_signal_handlers(previous)  # type: ignore[arg-type]
    _route_ray_logs()


def shutdown_embedded() -> None:
    """Stop the embedded cluster this process started (no-op otherwise): ray.shutdown(), then end any of
    Ray's processes still alive (SIGTERM, then SIGKILL)."""
    global _embedded
    state, _embedded = _embedded, None
    if state is None:
        return
    import ray

    psutil = _psutil()
    procs = _with_descendants(state.procs or _started_by_ray(state))
    if ray.is_initialized() and state.gcs_address in (None, _gcs_address()):
        with contextlib.suppress(Exception):  # shutting down a half-broken cluster must not raise
            ray.shutdown()
    _, alive = psutil.wait_procs(procs, timeout=_EXIT_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=_EXIT_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if state.watchdog is not None:
        with contextlib.suppress(OSError):
            state.watchdog.write("done\n")
            state.watchdog.close()


def _start_watchdog(procs: list[Any]) -> Any:
    """A small process that outlives a SIGKILLed driver and then ends Ray's processes (see _watchdog.py).
    It holds the read end of a pipe whose only writer is this process, so this process's death, however it
    comes, is the end of its input."""
    psutil = _psutil()
    read_end, write_end = os.pipe()  # not inherited by other children (PEP 446)
    try:
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("_watchdog.py")),
                str(Path(psutil.__file__).parents[1]),
            ],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the terminal's process group must not end it first
        )
    except OSError:
        os.close(write_end)
        return None
    finally:
        os.close(read_end)
    pipe = os.fdopen(write_end, "w", buffering=1)
    for p in procs:
        pipe.write(f"track {p.pid}\n")
    return pipe


def _psutil() -> Any:
    """psutil as Ray ships it (ray/thirdparty_files joins sys.path when ray is imported)."""
    importlib.import_module("ray")
    return importlib.import_module("psutil")


def _started_by_ray(state: _Embedded) -> list[Any]:
    psutil = _psutil()
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in state.before]


def _with_descendants(procs: list[Any]) -> list[Any]:
    psutil = _psutil()
    found = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
    return list(found.values())


def _gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def _is_loopback_address(address: str) -> bool:
    """`127.0.0.1:6379`, `localhost:6379`, `ray://127.0.0.1:10001`, `[::1]:6379` (not `auto`)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let `_node_ip_address="127.0.0.1"` stand.

    ray.init replaces a loopback node address with the host's reachable IP (services.resolve_ip_for_localhost)
    unless Ray thinks clusters are off (its macOS/Windows default, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`);
    that flag is read only while the node address is resolved, so it is lowered for ray.init alone. A
    single-node cluster needs no other address: everything connects to 127.0.0.1.
    """
    import ray._private.ray_constants as ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _require_token_auth() -> None:
    """Token authentication for the embedded cluster, unless the user chose a mode themselves."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        if os.environ["RAY_AUTH_MODE"].lower() != "token":
            log.warning("RAY_AUTH_MODE=%s: the embedded Ray cluster runs without token authentication",
                        os.environ["RAY_AUTH_MODE"])  # fmt: skip
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    # Ray caches its config and token per process; both must see the new settings before ray.init.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _install_signal_handlers(previous: dict[int, Any]) -> None:
    """SIGTERM/SIGINT stop the embedded cluster first. `previous`: the handlers from before ray.init, which
    installs its own (and whose C++ core aborts with a stack dump on SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return  # Python allows signal handlers in the main thread only; atexit still stops the cluster
    for signum in _SIGNALS:
        if previous.get(signum) is not _on_signal:
            _previous_handlers[signum] = previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    shutdown_embedded()
    previous = _previous_handlers.pop(signum, signal.SIG_DFL)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # e.g. SIGINT → KeyboardInterrupt: the CLI says how to resume
    elif previous != signal.SIG_IGN:
        os.kill(os.getpid(), signum)  # SIG_DFL: end the way the signal ends a process


# -------------------------------------------------------------------------------------------------------
# Console


def ray_log_file() -> Path | None:
    """Where Ray's console output goes in this process (None: to the terminal)."""
    return _log_file


def quiet_console(*, log_dir: Path | None = None) -> Path | None:
    """From now on Ray's own console output in this process goes to a log file (returned).

    C++ log lines and anything else written to file descriptor 2 go to the file; `sys.stderr` becomes a
    new stream on the original terminal, so Python code (progress bar, CLI errors, tracebacks) is unchanged.
    Ray's Python loggers and warnings are routed to the file when Ray starts (`init_ray`).

    A no-op (None) when Python's stderr is already redirected (e.g. `main()` called under pytest's
    capture): whoever redirected it owns the console, and a process-wide change would outlive the call."""
    global _log_file
    if _log_file is not None:
        return _log_file
    if sys.stderr is not sys.__stderr__:
        return None
    if log_dir is None:
        log_dir = cache_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Only shardwise's own log names: a cache pointed at a user's folder keeps the user's own *.log files.
    ours = sorted(p for p in log_dir.glob("*.log") if _LOG_NAME.fullmatch(p.name) and p.is_file())
    for old in ours[:-_KEEP_LOGS]:
        with contextlib.suppress(OSError):
            old.unlink()
    path = log_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    if sys.stderr is not None:
        sys.stderr.flush()
    terminal = io.TextIOWrapper(
        io.FileIO(os.dup(2), "w"),
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace",
        line_buffering=True,
        write_through=True,
    )
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = terminal
    _log_file = path
    _route_warnings(path)
    return path


def _route_warnings(path: Path) -> None:
    """Python warnings raised inside Ray's own modules go to the log file; all others as before."""
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    roots = tuple(str(Path(p)) + os.sep for p in (spec.submodule_search_locations or [])) if spec else ()
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if roots and str(filename).startswith(roots):
            with path.open("a") as f:
                f.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _route_ray_logs() -> None:
    """After ray.init: Ray's console log handlers (in the driver) write to the log file instead."""
    if _log_file is None:
        return
    import ray._private.worker as ray_worker
    import ray.data  # noqa: F401 - configures the "ray.data" logger (with a console handler) on import

    path = _log_file

    def print_to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        # Ray's driver thread that relays cluster errors ("(raylet) A worker died ...") prints with this.
        with path.open("a", encoding="utf-8") as f:
            f.writelines(f"({data.get('pid')}) {line}\n" for line in data.get("lines", []))

    ray_worker.print_to_stdstream = print_to_log
    to_file = logging.FileHandler(_log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ["ray", *sorted(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]:
        logger = logging.getLogger(name)
        # File handlers (Ray Data's session log) stay; console ones (Ray's PlainRayHandler) are replaced.
        console = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)
                   and "File" not in type(h).__name__]  # fmt: skip
        if console:
            for h in console:
                logger.removeHandler(h)
            logger.addHandler(to_file)
