"""Tasks: one file per task; `models.registry` maps task names to them.

The registry's names below load on first use, so `import models.loading` (model checks, the cluster's log
folder) does not import the registry and what it imports (pyarrow, through `pipeline.block`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.registry import available_tasks, get_task, register_task

__all__ = ["available_tasks", "get_task", "register_task"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("models.registry"), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
