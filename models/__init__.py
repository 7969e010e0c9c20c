"""Tasks: one file per task; `models.registry` maps task names to them."""

from models.registry import available_tasks, get_task, register_task

__all__ = ["available_tasks", "get_task", "register_task"]
