"""Ends the embedded Ray cluster's processes when its driver dies without stopping them (SIGKILL, OOM).

Started by `pipeline.cluster.init_ray` with a pipe on stdin that only the driver holds: lines
"track <pid>" name Ray's processes (the GCS, the raylet, its agents); "done" means the driver stopped the
cluster itself. End of input without "done" means the driver died: every process of the tracked trees (as
last seen, once a second, since orphans lose their parent links) is sent SIGTERM, then SIGKILL.

Runs as `python -m pipeline._watchdog <psutil-dir>`, importing nothing but psutil (as Ray ships it).
"""

from __future__ import annotations

import sys
import threading

__all__ = ["main"]

# How often the tracked trees are re-read (workers and agents start after the raylet).
_POLL_S = 1.0
_GRACE_S = 2.0


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    import psutil

    roots: dict[int, float] = {}
    seen: dict[int, psutil.Process] = {}
    done = threading.Event()
    ended = threading.Event()

    def read() -> None:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["track"] and len(words) == 2:
                try:
                    p = psutil.Process(int(words[1]))
                    roots[p.pid] = p.create_time()
                except (psutil.Error, ValueError):
                    pass
            elif words == ["done"]:
                done.set()
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    while not ended.wait(_POLL_S):
        for pid in list(roots):
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    seen.setdefault(p.pid, p)
            except psutil.Error:
                pass
    if done.is_set():
        return
    alive = [p for p in seen.values() if p.is_running()]  # is_running also checks the pid was not reused
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    main()
