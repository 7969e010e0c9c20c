"""One writer per output: a lease file in the output folder, created only if absent, kept alive by a heartbeat.

    <output>/_lease.json   {"run_id", "host", "pid", "started_at", "heartbeat_at", "ttl_s", "what"}

Creating it is one atomic "create if absent": a hard link of a complete temp file on local disks (`link`
fails if the name exists, and readers never see a half-written lease), a conditional PUT (`If-None-Match:
*`) on S3. A holder rewrites `heartbeat_at` every `ttl/6` seconds. Another run finds the lease and either
waits (`--wait`) or stops with a message naming the holder. A lease is taken over when its holder is gone:
no heartbeat for `ttl_s` seconds (default 60, `SHARDWISE_LEASE_TTL_S`), or at once when the holder ran on
this host and its process no longer exists (a SIGKILLed driver does not block a rerun on the same machine).

The heartbeat re-reads the lease before renewing it: a holder that finds another run's id there (it was
paused for longer than the TTL and lost the lease) stops writing and the job fails with a message instead of
racing the new holder. Filesystems with neither link nor conditional PUT (e.g. `memory://`) check-then-write,
which is not atomic: two runs started in the same instant could both start there.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import OutputError, OutputLocked

if TYPE_CHECKING:
    from pipeline.commit import OutputDir

__all__ = ["LEASE", "Lease", "LeaseInfo", "lease_ttl_s", "read_lease"]

LEASE = "_lease.json"
# Without a heartbeat for this long, the holder is taken to be gone. A minute rides out a driver's GC pause
# or a slow object store while a killed driver blocks reruns only briefly (at once on the same host).
_DEFAULT_TTL_S = 60.0


def lease_ttl_s() -> float:
    return float(os.environ.get("SHARDWISE_LEASE_TTL_S", _DEFAULT_TTL_S))


@dataclass(frozen=True)
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    ttl_s: float
    what: str = "job"

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.heartbeat_at > self.ttl_s

    def holder_dead(self) -> bool:
        """The holder ran on this host and its process is gone (pids are only comparable on one host)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def live(self) -> bool:
        return not self.expired() and not self.holder_dead()

    def describe(self) -> str:
        age = time.time() - self.heartbeat_at
        return (
            f"run {self.run_id} ({self.what}, pid {self.pid} on {self.host}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}, last heartbeat "
            f"{age:.0f} s ago)"
        )


def read_lease(out: OutputDir) -> LeaseInfo | None:
    """The lease in `out`, or None. An unreadable lease counts as held by an unknown run until it ages out."""
    try:
        raw = out.read_bytes(LEASE)
    except FileNotFoundError:
        return None
    try:
        return LeaseInfo(**json.loads(raw))
    except (ValueError, TypeError):
        mtime = out.mtime(LEASE) or time.time()
        return LeaseInfo("unknown", "unknown", -1, mtime, mtime, lease_ttl_s(), "unreadable lease")


class Lease:
    """`with Lease(out, run_id):` holds the output for one run. `check()` raises if the lease was lost."""

    def __init__(
        self,
        out: OutputDir,
        run_id: str,
        *,
        what: str = "job",
        wait_s: float = 0.0,
        ttl_s: float | None = None,
    ) -> None:
        self.out = out
        self.run_id = run_id
        self.what = what
        self.wait_s = wait_s
        self.ttl_s = ttl_s if ttl_s is not None else lease_ttl_s()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: LeaseInfo | None = None
        self._started = time.time()

    def _info(self) -> bytes:
        info = LeaseInfo(
            self.run_id, socket.gethostname(), os.getpid(), self._started, time.time(), self.ttl_s, self.what
        )
        return json.dumps(asdict(info)).encode()

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        while True:
            if self.out.create_exclusive(LEASE, self._info()):
                break
            holder = read_lease(self.out)
            if holder is None:
                continue  # released between our attempt and the read: try again
            if holder.run_id == self.run_id:
                break
            if holder.expired() or holder.holder_dead():
                self._take_over(holder)
                continue
            if time.monotonic() >= deadline:
                raise OutputLocked(
                    f"output.uri {self.out.uri!r} is being written by {holder.describe()}; two runs on one "
                    "output would compute every shard twice and could interleave overwrite and commit. Wait for "
                    "it to finish (or pass --wait), stop it, or choose another output.uri. A killed run's lease "
                    f"expires {holder.ttl_s:.0f} s after its last heartbeat"
                )
            time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._beat, name="shardwise-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale: LeaseInfo) -> None:
        # Remove the stale lease only if it is still the one we judged stale (another run may have taken it).
        current = read_lease(self.out)
        if current is not None and current == stale:
            self.out.remove(LEASE)

    def _beat(self) -> None:
        every = max(0.05, self.ttl_s / 6)
        while not self._stop.wait(every):
            try:
                holder = read_lease(self.out)
                if holder is None or holder.run_id != self.run_id:
                    self._lost = holder
                    return
                self.out.write_bytes(LEASE, self._info())
            except Exception:  # noqa: BLE001 - a transient storage error: the next beat retries
                continue

    def check(self) -> None:
        """Raise if another run holds the output now (this one was paused past the TTL)."""
        if self._lost is not None or (self._thread is not None and not self._thread.is_alive()):
            holder = read_lease(self.out)
            if holder is None or holder.run_id != self.run_id:
                raise OutputError(
                    f"this run ({self.run_id}) lost its lease on output.uri {self.out.uri!r}"
                    + (f" to {holder.describe()}" if holder else "")
                    + "; it stopped without finishing. Rerun once the other run is done to resume"
                )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = read_lease(self.out)
        if holder is not None and holder.run_id == self.run_id:
            self.out.remove(LEASE)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
