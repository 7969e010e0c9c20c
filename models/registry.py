"""Task registry: `@register_task("text-classification")` on a class that follows `Task`.

Adding a task touches no engine file: write `models/<task>.py`, decorate its class, list the module in
`_TASK_MODULES`. Registering a name twice is an error; an unknown name lists the valid ones.

Tasks that live outside this package (a plugin, a test-only task) are found through the environment
variable `SHARDWISE_TASK_MODULES`: comma-separated module names, imported after the built-in ones on the
first lookup, e.g. `SHARDWISE_TASK_MODULES=mypkg.my_task`. Every process that looks tasks up needs it —
the driver and the Ray workers: set it before the cluster starts (workers inherit the environment of the
process that started it; for a running cluster, on every node before `ray start`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from pipeline.block import ID
from pipeline.errors import ShardwiseError, SpecError
from pipeline.typed import build, type_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "ROW_ID",
    "TASK_MODULES_ENV",
    "FineTunable",
    "LabelMode",
    "Postprocessor",
    "Preprocessor",
    "RowError",
    "Runner",
    "Task",
    "Trainable",
    "available_tasks",
    "check_inputs",
    "describe_params",
    "get_task",
    "input_kind",
    "label_mode",
    "model_inputs",
    "parse_params_dataclass",
    "register_task",
    "text_inputs",
]

# Modules imported on first lookup; each registers its task(s). Kept as strings so importing the registry
# stays light (no torch, no transformers).
_TASK_MODULES = (
    "models.text_classification",
    "models.token_classification",
    "models.question_answering",
    "models.text_generation",
    "models.summarization",
    "models.translation",
    "models.image_classification",
    "models.object_detection",
    "models.image_segmentation",
    "models.depth_estimation",
    "models.audio_classification",
    "models.automatic_speech_recognition",
)

# Extra task modules (comma-separated), imported after `_TASK_MODULES`: the plugin hook described above.
TASK_MODULES_ENV = "SHARDWISE_TASK_MODULES"

# Key of the row ids in the columns a Preprocessor receives: the block column's own name.
ROW_ID = ID

_TASKS: dict[str, Task] = {}
_loaded = False


class RowError(typing.NamedTuple):
    """A per-row failure: becomes one record in `_errors/`."""

    error_type: str
    message: str


class Preprocessor(Protocol):
    """CPU side, in Ray tasks: raw input columns → numpy features per row (or a RowError).

    `columns` maps each task input the stage maps to its values, plus `ROW_ID` (`pipeline.block.ID`) → the rows' ids
    (stable across retries, resumes and replicas: use it to seed per-row randomness)."""

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]: ...


class Runner(Protocol):
    """Replica side (GPU-resident): features → raw outputs. Only padding and forward belong here."""

    def length(self, features: Mapping[str, Any]) -> int: ...

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]: ...


class Postprocessor(Protocol):
    """CPU side: raw outputs (+ the row's inputs and features) → output fields following `output_schema`."""

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]: ...


class Task(Protocol):
    """What the engine needs of a task. One class per task, in `models/<task>.py`."""

    name: str
    # Task input name → required? (e.g. {"text": True, "text_pair": False})
    inputs: Mapping[str, bool]
    description: str
    # Task inputs that postprocess reads (e.g. the text, for character offsets) and features that the
    # replica passes through to postprocess. Everything else is dropped as early as possible.
    postprocess_inputs: tuple[str, ...]
    postprocess_features: tuple[str, ...]

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> Any: ...

    def output_schema(self, params: Any) -> Any: ...  # pa.Schema

    def load_preprocessor(self, model_dir: str, params: Any) -> Preprocessor: ...

    def load_runner(self, model_dir: str, params: Any, *, device: str, dtype: str) -> Runner: ...

    def load_postprocessor(self, model_dir: str, params: Any) -> Postprocessor: ...


# -------------------------------------------------------------------------------------------------------
# Fine-tuning: what pipeline.train needs of a task that can be trained (`kind: finetune`).
#
# Task hooks. The loop is task-agnostic; what it needs from a task is reached through the task object:
#
#     class FineTunable(Protocol):           # the registered task, e.g. models.text_classification
#         training_labels: str               # how train.label_column is read (absent: "class"):
#                                            # pipeline.train.labels
#         training_text_inputs: tuple[str, ...]  # inputs that must be non-null strings (absent: all)
#         def training(self, base_dir, *, label_names, max_length, options) -> Trainable: ...
#         # optional, on the driver before Ray starts (pipeline.spec calls it when validating):
#         def parse_training_options(self, options, *, key) -> Any: ...
#         # optional, "raw" labels without train.label_names: names derived from the targets (driver side)
#         def training_label_names(self, values, *, options, key) -> tuple[str, ...]: ...
#
#     class Trainable(Protocol):             # built inside each worker
#         def build_model(self, weights_dir) -> torch.nn.Module   # base or checkpoint, head sized to labels
#         def encode(self, columns, labels) -> dict[str, Any]     # model(**batch) gives .loss
#         def save(self, model, out_dir) -> None                  # standard HF folder
#         # optional: (hits, total) for eval_accuracy (default: pipeline.train.loop)
#         def eval_counts(self, output, batch) -> tuple[float, float]: ...
#         # optional, the task metrics of every epoch (all three or none; pipeline.train.loop):
#         eval_score: tuple[str, "max" | "min"]   # the record key that picks the best epoch, and its direction
#         def eval_predictions(self, output, batch, *, model) -> list[tuple[Any, Any]]: ...  # each worker
#         def eval_metrics(self, pairs) -> dict[str, float]: ...  # rank 0, every eval row's pairs
#
# `columns` maps task input names (`text`, `image`, ...) to lists of values as read; `labels` is one entry
# per row (pipeline.train.labels) or None. `encode` returns tensors, or lists/dicts of tensors (DETR's per-image
# targets), moved to the worker's device recursively; keys starting with `_` are not model inputs but extras
# for `eval_predictions` (answer offsets, image sizes, target texts; they stay on the CPU). `options` is
# `train.options`: task-specific settings such as `label_all_tokens` or `packing`. The reported
# `eval_accuracy` is the task's `eval_counts` hits/total summed over the eval set; by default
# `argmax(logits, -1) == labels` over the positions where labels != -100 (sequence, token and next-token
# accuracy alike). A task without `training` is refused with a SpecError naming the tasks that have it.

LabelMode = Literal["class", "class_sequence", "raw", "none"]
_LABEL_MODES = ("class", "class_sequence", "raw", "none")


class Trainable(Protocol):
    """The task-specific pieces of fine-tuning, built inside each Ray Train worker (optional members: the
    comment above, and "Task metrics" in pipeline.train.loop)."""

    def build_model(self, weights_dir: str) -> torch.nn.Module: ...

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any] | None) -> dict[str, Any]: ...

    def save(self, model: torch.nn.Module, out_dir: str) -> None: ...


class FineTunable(Protocol):
    """A registered task that can be fine-tuned (`training_labels`, `training_text_inputs` optional)."""

    def training(
        self, base_dir: str, *, label_names: tuple[str, ...], max_length: int, options: Mapping[str, Any]
    ) -> Trainable: ...


def label_mode(task: Any) -> LabelMode:
    mode = getattr(task, "training_labels", "class")
    if mode not in _LABEL_MODES:
        raise ValueError(f"task {task.name!r}: training_labels must be one of {_LABEL_MODES}, got {mode!r}")
    return cast(LabelMode, mode)


def text_inputs(task: Any, inputs: Mapping[str, str]) -> dict[str, str]:
    """The stage's inputs that training needs as strings (all of them unless the task says otherwise)."""
    names = getattr(task, "training_text_inputs", None)
    return dict(inputs) if names is None else {k: v for k, v in inputs.items() if k in names}


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `Trainable.encode`'s output that go to `model(**...)`: keys starting with "_" are
    extras for `eval_predictions` (answer offsets, image sizes, target texts), not model inputs."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _TASKS:
            raise ValueError(
                f"task {name!r} is registered twice ({type(_TASKS[name]).__module__} and {cls.__module__})"
            )
        cls.name = name  # type: ignore[attr-defined]
        _TASKS[name] = cls()
        return cls

    return deco


def _extra_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(TASK_MODULES_ENV, "").split(",") if m.strip()]


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in _TASK_MODULES:
            importlib.import_module(module)
        for module in _extra_modules():
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ShardwiseError(
                    f"{TASK_MODULES_ENV} names module {module!r}, which cannot be imported ({e}); fix the "
                    "module name or the Python path (every Ray worker needs it too), or unset the variable"
                ) from e
        _loaded = True


def get_task(name: str) -> Task:
    _load_all()
    try:
        return _TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_TASKS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown task {name!r}{hint}; available: {sorted(_TASKS)}") from None


def available_tasks() -> dict[str, Task]:
    _load_all()
    return dict(sorted(_TASKS.items()))


def check_inputs(task: Task, inputs: Mapping[str, str], *, key: str) -> None:
    """Shared validation of a stage's `inputs` mapping (task input → column)."""
    unknown = sorted(set(inputs) - set(task.inputs))
    if unknown:
        raise SpecError(
            f"{key}.{unknown[0]}",
            f"task {task.name!r} has no input {unknown[0]!r}; its inputs: {sorted(task.inputs)}",
        )
    for name, required in task.inputs.items():
        if required and name not in inputs:
            raise SpecError(
                f"{key}.{name}",
                f"task {task.name!r} needs input {name!r}: map it to a column, e.g. inputs: {{{name}: <column>}}",
            )


# What a task input takes (text, image, audio, messages), by the input's name unless the task says otherwise
# in an `input_kinds` mapping. A stage that reads an earlier stage's field is checked against it.
_KIND_BY_NAME = {"image": "image", "audio": "audio", "messages": "messages"}


def input_kind(task: Task, name: str) -> str:
    kinds: Mapping[str, str] = getattr(task, "input_kinds", None) or {}
    return kinds.get(name) or _KIND_BY_NAME.get(name, "text")


def parse_params_dataclass(cls: type, params: Mapping[str, Any], *, key: str) -> Any:
    """Params dataclasses use the same typed loader as the job spec (unknown keys name themselves)."""
    return build(cls, dict(params), key)


def describe_params(cls: type) -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = f"{_fmt_type(hints[f.name])} = {default!r}"
    return out


def _fmt_type(tp: Any) -> str:
    return type_name(tp)
