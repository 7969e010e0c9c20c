"""Bind a spec: the typed job the engine runs, built once on the driver and shipped as is to the workers.

`parse_spec` checks what a key may hold whatever the task; `bind` checks what it means for the task — the
task exists, the stage's inputs are the task's, its `params` parse, a `<stage>.<field>` input names a field
of an earlier stage whose type the task can read — and keeps the results: parsed params, output schemas,
the block column each task input reads, the resources of each replica pool. Workers receive these objects
(frozen, picklable) and never parse a spec again.

    inputs: {text: summarize.summary_text}     the `summary_text` field of stage `summarize`'s output
    inputs: {text: review}                     the input column `review`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from models.registry import check_inputs, get_task, input_kind
from pipeline.block import prediction_column
from pipeline.errors import SpecError
from pipeline.spec import JobSpec, StageSpec, load_spec, spec_to_dict, stage_reference

__all__ = ["BoundJob", "BoundStage", "StageInput", "bind", "kind_accepts", "load_job"]

# Arrow types each kind of task input reads (a value of another type is refused when the job is bound).
_KIND_TYPES: dict[str, tuple[str, ...]] = {
    "text": ("string",),
    "messages": ("list",),
    "image": ("binary", "string", "struct"),
    "audio": ("binary", "string", "struct", "list"),
}


def _type_family(tp: pa.DataType) -> str:
    if pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp):
        return "string"
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_fixed_size_binary(tp):
        return "binary"
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return "list"
    if pa.types.is_struct(tp):
        return "struct"
    return str(tp)


def kind_accepts(kind: str, tp: pa.DataType) -> bool:
    """Whether a task input of `kind` (text, image, audio, messages) can read values of Arrow type `tp`."""
    if kind == "messages":
        return _type_family(tp) == "list" and pa.types.is_struct(tp.value_type)
    return _type_family(tp) in _KIND_TYPES.get(kind, ("string",))


@dataclass(frozen=True)
class StageInput:
    """Where one task input's values come from: an input column, or a field of an earlier stage's output."""

    source: str  # as written in the spec
    column: str  # the block column that holds the values
    stage: str | None = None
    field: str | None = None


@dataclass(frozen=True)
class BoundStage:
    """One stage, checked and parsed: what its preprocess, replicas and postprocess need, and nothing raw."""

    index: int
    name: str
    task_name: str
    model: str
    revision: str | None
    params: Any  # the task's params dataclass
    output_schema: pa.Schema
    inputs: tuple[tuple[str, StageInput], ...]  # task input → source, in the spec's order
    write: bool  # the stage's fields go to the output
    batch_size: int
    max_batch_tokens: int | None
    replicas: tuple[int, int]  # (min, max) replicas
    num_gpus: float
    num_cpus: float | None  # as the spec says (None: see `cpus`)
    dtype: str
    device: str
    # Identifies what the stage loads (model, params): workers cache loaded processors under it.
    key: str

    @property
    def task(self) -> Any:
        """The task object (a registry lookup: cheap, and the same object in every process)."""
        return get_task(self.task_name)

    @property
    def cpus(self) -> float:
        """CPUs reserved per replica: num_cpus, else 1 (logical; torch threads are set apart, see
        `pipeline.graph.replica_threads`)."""
        return self.num_cpus if self.num_cpus is not None else 1.0

    @property
    def input_columns(self) -> dict[str, str]:
        """Task input → the block column that holds its values."""
        return {name: src.column for name, src in self.inputs}

    @property
    def prediction_columns(self) -> dict[str, str]:
        """Output field → its block column."""
        return {f.name: prediction_column(self.name, f.name) for f in self.output_schema}


@dataclass(frozen=True)
class BoundJob:
    """A bound job: its spec, its stages in run order, and the columns each step keeps."""

    spec: JobSpec
    stages: tuple[BoundStage, ...]
    # Input column → its name in the output, the id column first.
    keep_columns: tuple[tuple[str, str], ...]
    # Input columns the read step loads.
    read_columns: tuple[str, ...]
    # Per stage: the data columns (input columns, earlier stages' fields) kept after its preprocess and after
    # its postprocess. Everything else is dropped as soon as no later step reads it.
    carry_after_preprocess: tuple[frozenset[str], ...]
    carry_after_postprocess: tuple[frozenset[str], ...]

    @property
    def multi(self) -> bool:
        """Several stages: each written stage's fields go to one struct column named after it."""
        return len(self.stages) > 1

    @property
    def id_column(self) -> str | None:
        return self.spec.input.id_column

    @property
    def written(self) -> tuple[BoundStage, ...]:
        return tuple(s for s in self.stages if s.write)

    def output_schema(self) -> pa.Schema:
        """The task part of the predictions' schema: one stage's fields, or one struct column per written
        stage (the id and kept columns come first in the part files)."""
        if not self.multi:
            return self.stages[0].output_schema
        return pa.schema([pa.field(s.name, pa.struct(list(s.output_schema))) for s in self.written])


def _keep_columns(spec: JobSpec) -> dict[str, str]:
    """Input column → output name, the id column first (under its own name unless renamed)."""
    kept = spec.input.kept_as()
    id_column = spec.input.id_column
    if id_column is None:
        return kept
    return {id_column: kept.get(id_column, id_column), **{k: v for k, v in kept.items() if k != id_column}}


def _bind_stage(stage: StageSpec, index: int, earlier: dict[str, BoundStage]) -> BoundStage:
    key = f"stages[{index}]"
    try:
        task = get_task(stage.task)
    except KeyError as e:
        raise SpecError(f"{key}.task", str(e.args[0])) from None
    check_inputs(task, stage.inputs, key=f"{key}.inputs")
    params = task.parse_params(stage.params, key=f"{key}.params")
    schema = task.output_schema(params)
    inputs = []
    for name, source in stage.inputs.items():
        ref = stage_reference(source, list(earlier))
        if ref is None:
            inputs.append((name, StageInput(source, source)))
            continue
        ref_stage, ref_field = ref
        fields = earlier[ref_stage].output_schema
        if ref_field not in fields.names:
            raise SpecError(
                f"{key}.inputs.{name}",
                f"stage {ref_stage!r} ({earlier[ref_stage].task_name}) has no field {ref_field!r}; its fields: "
                f"{fields.names}",
            )
        kind = input_kind(task, name)
        tp = fields.field(ref_field).type
        if not kind_accepts(kind, tp):
            raise SpecError(
                f"{key}.inputs.{name}",
                f"{source!r} holds {tp} values, but input {name!r} of task {stage.task!r} takes {kind}; map it "
                f"to a field of type {' or '.join(_KIND_TYPES.get(kind, ('string',)))}",
            )
        inputs.append(
            (name, StageInput(source, prediction_column(ref_stage, ref_field), ref_stage, ref_field))
        )
    params_json = json.dumps(spec_to_dict(params), sort_keys=True, default=str)
    return BoundStage(
        index=index,
        name=stage.name,
        task_name=stage.task,
        model=stage.model,
        revision=stage.revision,
        params=params,
        output_schema=schema,
        inputs=tuple(inputs),
        write=stage.output,
        batch_size=stage.batch_size,
        max_batch_tokens=stage.max_batch_tokens,
        replicas=stage.replica_range(),
        num_gpus=stage.num_gpus,
        num_cpus=stage.num_cpus,
        dtype=stage.dtype,
        device=stage.device,
        key=f"{stage.name}|{stage.task}|{stage.model}|{stage.revision}|{params_json}",
    )


def _check_names(spec: JobSpec, stages: tuple[BoundStage, ...], kept: dict[str, str]) -> None:
    """In a multi-stage job each written stage is an output column: it must not take a kept column's name."""
    if len(stages) < 2:
        return
    taken = set(kept.values()) | ({"id"} if spec.input.id_column is None else set())
    for s in stages:
        if s.write and s.name in taken:
            raise SpecError(
                f"stages[{s.index}].name",
                f"stage {s.name!r} writes its fields to an output column of that name, which a kept input "
                "column (or the row id) already has; rename the stage or the kept column",
            )


def _carry(
    stages: tuple[BoundStage, ...], kept: dict[str, str]
) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    written = {c for s in stages if s.write for c in s.prediction_columns.values()}
    after_pre, after_post = [], []
    for k, stage in enumerate(stages):
        later = {c for s in stages[k + 1 :] for c in s.input_columns.values()}
        base = set(kept) | written | later
        post_inputs = {
            stage.input_columns[n] for n in stage.task.postprocess_inputs if n in stage.input_columns
        }
        after_pre.append(frozenset(base | post_inputs))
        after_post.append(frozenset(base))
    return after_pre, after_post


def bind(spec: JobSpec) -> BoundJob:
    """Check a parsed spec against its tasks and build the bound job (raises SpecError naming the key)."""
    bound: dict[str, BoundStage] = {}
    for i, stage in enumerate(spec.stages):
        bound[stage.name] = _bind_stage(stage, i, dict(bound))
    stages = tuple(bound.values())
    kept = _keep_columns(spec)
    _check_names(spec, stages, kept)
    if spec.kind == "finetune" and spec.train is not None:
        task = get_task(spec.stage.task)
        parse_options = getattr(task, "parse_training_options", None)
        if callable(parse_options):
            parse_options(spec.train.options, key="train.options")
        elif spec.train.options:
            raise SpecError(
                f"train.options.{next(iter(spec.train.options))}",
                f"task {spec.stage.task!r} takes no training options; remove train.options",
            )
    read = [src.column for s in stages for _, src in s.inputs if src.stage is None] + list(kept)
    if spec.input.id_column:
        read.append(spec.input.id_column)
    after_pre, after_post = _carry(stages, kept)
    return BoundJob(
        spec=spec,
        stages=stages,
        keep_columns=tuple(kept.items()),
        read_columns=tuple(dict.fromkeys(read)),
        carry_after_preprocess=tuple(after_pre),
        carry_after_postprocess=tuple(after_post),
    )


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """`load_spec` and `bind`: a spec file checked against its tasks (SpecError names the key), for callers
    that must refuse a bad job before anything runs (the CLI, submit, schedule)."""
    spec = load_spec(path, overrides)
    bind(spec)
    return spec
