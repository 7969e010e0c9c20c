"""Fine-tuning progress: rank 0 posts its step to a tiny actor (`Board`); a driver thread draws the bar
(`watch`: the driver itself is blocked in `trainer.fit()`, and worker output does not reach its console)."""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

from pipeline.train.loop import LoopConfig

__all__ = ["Board", "watch"]


class Board:
    """Holds rank 0's latest progress; a Ray actor with no CPU (`ray.remote(num_cpus=0)(Board)`).

    It lives on the driver's side of a worker failure, so after a restart it still knows the furthest
    step any worker reached: a resumed run reports how many steps the failure cost (`steps_redone`)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.furthest = 0

    def post(self, state: dict[str, Any]) -> None:
        self.state = state
        self.furthest = max(self.furthest, int(state.get("step", 0)))

    def get(self) -> dict[str, Any]:
        return self.state

    def furthest_step(self) -> int:
        return self.furthest


def watch(board: Any, stop: threading.Event, loop: LoopConfig) -> threading.Thread:
    def run() -> None:
        import ray
        from tqdm import tqdm

        per_worker = max(1, loop.train.batch_size // loop.train.num_workers)
        steps = math.ceil((loop.train_rows // loop.train.num_workers) / per_worker) * loop.train.epochs
        bar = tqdm(total=steps, unit="step", file=sys.stderr, dynamic_ncols=True, desc="shardwise finetune")
        shown: dict[str, Any] = {}
        try:
            while not stop.wait(0.5):
                try:
                    state = ray.get(board.get.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - progress must never fail the job
                    continue
                if state and state != shown:
                    bar.n = min(state["step"], steps)
                    bar.set_postfix({k: v for k, v in state.items() if k != "step"}, refresh=False)
                    bar.refresh()
                    shown = state
        finally:
            bar.close()

    thread = threading.Thread(target=run, name="shardwise-finetune-progress", daemon=True)
    thread.start()
    return thread
