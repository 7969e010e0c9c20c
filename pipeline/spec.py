"""Job specs: typed, frozen dataclasses loaded from YAML, with `--set a.b=c` overrides.

Every key is validated where it is loaded: unknown keys, wrong types and bad values raise `SpecError`
naming the dotted key and what is allowed. Nothing downstream reads raw dicts with defaults.

This module knows the spec's structure only (it imports no task). What a key means for a task — that the
task exists, its `params`, its inputs, the fields a stage reads from an earlier stage — is checked when the
spec is bound (`pipeline.bind.bind`), still before any Ray work starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from pipeline.errors import SpecError
from pipeline.typed import build, to_plain

__all__ = [
    "DEFAULT_MAX_ROW_BYTES",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_ROWS",
    "FORMATS",
    "FinetuneSpec",
    "InputSpec",
    "JobSpec",
    "LoraSpec",
    "OutputSpec",
    "StageSpec",
    "apply_overrides",
    "format_from_uri",
    "load_spec",
    "parse_spec",
    "spec_to_dict",
    "stage_reference",
]

Format = Literal["parquet", "hf", "jsonl", "csv"]
FORMATS: tuple[str, ...] = get_args(Format)
Mode = Literal["resume", "overwrite", "error-if-exists", "incremental"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]

# A shard is the unit of work and of commit. 4,096 rows keeps a CPU shard of short texts at a few seconds
# of work (a lost shard is cheap to redo) while per-shard overhead (one task, one file) stays small.
DEFAULT_SHARD_ROWS = 4096
# Bounds the memory a shard holds in the object store: images/audio make rows large.
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
# A row larger than this is an error record, never read (JSONL) or passed on whole: one runaway row (a
# file with no newlines, a 1 GB cell) must not take a worker's memory. 64 MiB is far above any text a model
# reads and holds a large photo or minutes of audio.
DEFAULT_MAX_ROW_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InputSpec:
    """Where rows come from."""

    uri: str
    format: Format | None = None
    id_column: str | None = None
    # Columns copied to the output next to predictions: a list of names, or a mapping input name → output
    # name to rename one (e.g. {label: gold_label} keeps a column named like a task field).
    keep_columns: tuple[str, ...] | dict[str, str] | None = None
    shard_rows: int = DEFAULT_SHARD_ROWS
    shard_bytes: int = DEFAULT_SHARD_BYTES
    # The most bytes one row may have (a JSONL line; the text/binary cells of a Parquet, CSV or HF row).
    # A larger row becomes an error record; a JSONL line is skipped in blocks, never held whole.
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    # Passed to fsspec (e.g. {"endpoint_url": ..., "key": ..., "secret": ...} for S3). Never written anywhere.
    storage_options: dict[str, Any] = field(default_factory=dict)
    # An input with no rows is an error (a wrong glob, an empty day) unless this says it is expected.
    allow_empty: bool = False
    # Only the first N rows (in plan order): a trial run. Part of the fingerprint (it changes which rows exist).
    limit: int | None = None

    def resolved_format(self) -> str:
        """The format, from the key or else from the URI's suffix (`sources.resolve_format` also looks
        inside a folder)."""
        if self.format is not None:
            return self.format
        return format_from_uri(self.uri)

    def kept(self) -> tuple[str, ...]:
        """Input columns copied to the output next to predictions."""
        return tuple(self.kept_as())

    def kept_as(self) -> dict[str, str]:
        """Input column → its name in the output."""
        if isinstance(self.keep_columns, dict):
            return dict(self.keep_columns)
        if self.keep_columns is not None:
            return {c: c for c in self.keep_columns}
        return {self.id_column: self.id_column} if self.id_column else {}


@dataclass(frozen=True)
class StageSpec:
    """One model applied to every row. `inputs` maps each task input to an input column or to a field of an
    earlier stage's output, written `<stage>.<field>` (e.g. {text: summarize.summary_text})."""

    name: str
    task: str
    model: str
    inputs: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    batch_size: int = 32
    # Token (or element) budget per micro-batch: padded length × rows stays under it. None: only batch_size.
    max_batch_tokens: int | None = None
    replicas: int | tuple[int, int] = 1
    num_gpus: float = 0.0
    # CPUs reserved per replica. None: 1 with a GPU; on CPU-only replicas also 1 (logical), while torch
    # uses the node's cores split across the replicas (see pipeline.replica).
    num_cpus: float | None = None
    dtype: DType = "auto"
    device: Device = "auto"
    # False: the stage feeds later stages but its fields are not written to the output.
    output: bool = True

    def replica_range(self) -> tuple[int, int]:
        if isinstance(self.replicas, int):
            return (self.replicas, self.replicas)
        return self.replicas


@dataclass(frozen=True)
class OutputSpec:
    uri: str
    mode: Mode = "resume"
    storage_options: dict[str, Any] = field(default_factory=dict)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


@dataclass(frozen=True)
class LoraSpec:
    """`train.lora`: train low-rank adapters (peft LoRA) instead of every weight of the base model."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Module names to adapt (e.g. [query, value] for BERT). None: peft's default for the architecture.
    target_modules: tuple[str, ...] | None = None
    # True: the published folder is the base model with the adapters merged in (loads like any model);
    # False: the adapter folder (adapter_config.json + weights) with the base model's path in it.
    merge: bool = True


@dataclass(frozen=True)
class FinetuneSpec:
    """Training settings for `kind: finetune` (the stage says task, base model and inputs)."""

    label_column: str = "label"
    # Names of the classes in id order. None: taken from the data (sorted distinct labels).
    label_names: tuple[str, ...] | None = None
    eval_input: InputSpec | None = None
    # Held-out share of `input` when there is no eval_input.
    eval_fraction: float = 0.1
    epochs: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    # Where Ray Train keeps per-epoch checkpoints. None: <output.uri>/_checkpoints.
    checkpoint_uri: str | None = None
    # Cap on training rows (None: all); handy for quick runs.
    max_train_rows: int | None = None
    # Task-specific training settings (e.g. token-classification `label_all_tokens`, causal-LM `packing`),
    # validated by the task (`parse_training_options`) before Ray starts.
    options: dict[str, Any] = field(default_factory=dict)
    # Micro-batches whose gradients add up to one optimizer step: the global batch is batch_size × this.
    grad_accum_steps: int = 1
    # Worker failures (a killed or preempted worker) the run survives, restoring from its last checkpoint
    # (Ray Train FailureConfig); -1: no limit.
    max_failures: int = 0
    # Also checkpoint every N optimizer steps within an epoch (None: at the end of each epoch only).
    checkpoint_every_steps: int | None = None
    # Stop when the eval metric has not improved for this many epochs (None: train every epoch).
    early_stopping_patience: int | None = None
    # "balanced": weight each class's loss by n_rows / (n_classes × rows of that class) (classification).
    class_weights: Literal["balanced"] | None = None
    lora: LoraSpec | None = None
    # Where Ray places the workers: pack (fill a node first: fast collectives) or spread (one per node).
    placement: Literal["pack", "spread"] = "pack"


@dataclass(frozen=True)
class JobSpec:
    name: str
    input: InputSpec
    stages: tuple[StageSpec, ...]
    output: OutputSpec
    kind: Literal["inference", "finetune"] = "inference"
    max_error_rate: float = 0.01
    train: FinetuneSpec | None = None

    @property
    def stage(self) -> StageSpec:
        """The first stage: a fine-tune's only stage, or a single-stage job's."""
        return self.stages[0]


def format_from_uri(uri: str, *, key: str = "input.format") -> str:
    path = uri.rstrip("/").lower()
    # "?" starts a query (s3://b/x.parquet?versionId=1) or is a glob wildcard (data/part-?.parquet).
    for base in (path, path.split("?")[0]):
        for suffix, fmt in (
            (".parquet", "parquet"),
            (".pq", "parquet"),
            (".jsonl", "jsonl"),
            (".ndjson", "jsonl"),
            (".json", "jsonl"),
            (".csv", "csv"),
            (".tsv", "csv"),
            (".arrow", "hf"),
        ):
            if base.endswith(suffix) or base.endswith(suffix + ".gz") or base.endswith(suffix + ".bz2"):
                return fmt
    raise SpecError(
        key, f"cannot tell the format of {uri!r} from its name; set {key} to one of {list(FORMATS)}"
    )


def _has_suffix(uri: str) -> bool:
    """Whether the URI's last part names a file (a dot in it) rather than a folder."""
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    return "." in last.lstrip(".") and not uri.endswith("/")


# ---------------------------------------------------------------------------------------------------------


def _positive(key: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise SpecError(key, f"must be greater than 0, got {value!r}")


# A stage name names its fields in the output (`<stage>.<field>`) and in later stages' inputs.
_STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def stage_reference(value: str, earlier: Sequence[str]) -> tuple[str, str] | None:
    """(stage, field) when a stage input `value` names a field of one of the `earlier` stages
    (`<stage>.<field>`), else None: it names an input column."""
    stage, dot, name = value.partition(".")
    if dot and name and stage in earlier:
        return stage, name
    return None


def _validate_stages(spec: JobSpec) -> None:
    if not spec.stages:
        raise SpecError("stages", "at least one stage is required")
    names: list[str] = []
    for i, stage in enumerate(spec.stages):
        key = f"stages[{i}]"
        if not _STAGE_NAME.fullmatch(stage.name):
            raise SpecError(
                f"{key}.name",
                f"{stage.name!r} is not a stage name: use letters, digits, '_' and '-', starting with a letter "
                "(it names the stage's fields in the output and in later stages' inputs)",
            )
        if stage.name in names:
            raise SpecError(f"{key}.name", f"two stages are named {stage.name!r}; stage names must be unique")
        later = [s.name for s in spec.stages[i + 1 :]]
        for task_input, source in stage.inputs.items():
            if stage_reference(source, later) is not None:
                raise SpecError(
                    f"{key}.inputs.{task_input}",
                    f"{source!r} refers to stage {source.partition('.')[0]!r}, which comes later in the list; "
                    "a stage reads only input columns and fields of earlier stages (list order is run order)",
                )
        names.append(stage.name)
        _positive(f"{key}.batch_size", stage.batch_size)
        _positive(f"{key}.max_batch_tokens", stage.max_batch_tokens)
        lo, hi = stage.replica_range()
        if lo < 1 or hi < lo:
            raise SpecError(
                f"{key}.replicas",
                f"expected an int >= 1 or [min, max] with 1 <= min <= max, got {stage.replicas!r}",
            )
        if stage.num_gpus < 0:
            raise SpecError(f"{key}.num_gpus", f"must be >= 0, got {stage.num_gpus}")
        _positive(f"{key}.num_cpus", stage.num_cpus)
        if stage.device == "cuda" and stage.num_gpus == 0:
            raise SpecError(
                f"{key}.num_gpus", "device is 'cuda' but num_gpus is 0; set num_gpus (e.g. 1 or 0.5)"
            )
    if not any(s.output for s in spec.stages):
        raise SpecError(
            f"stages[{len(spec.stages) - 1}].output",
            "every stage has output: false, so the job would write nothing; let at least one stage write",
        )


def _validate(spec: JobSpec) -> JobSpec:
    """Structural checks (what a key's value may be, whatever the task); `pipeline.bind` checks the rest."""
    if not spec.name.strip():
        raise SpecError("name", "must not be empty")
    _validate_stages(spec)
    if _has_suffix(spec.input.uri):
        spec.input.resolved_format()  # raises with the fix if the format cannot be told
    # else: a folder; `sources.resolve_format` looks at its files before the job starts
    _positive("input.shard_rows", spec.input.shard_rows)
    _positive("input.limit", spec.input.limit)
    renamed = list(spec.input.kept_as().values())
    if len(set(renamed)) != len(renamed):
        raise SpecError("input.keep_columns", f"two kept columns get the same output name: {renamed}")
    _positive("input.shard_bytes", spec.input.shard_bytes)
    _positive("input.max_row_bytes", spec.input.max_row_bytes)
    if not 0.0 <= spec.max_error_rate <= 1.0:
        raise SpecError("max_error_rate", f"must be between 0 and 1, got {spec.max_error_rate}")
    if spec.kind == "finetune":
        if len(spec.stages) > 1:
            raise SpecError(
                "stages",
                f"a fine-tune trains one model, got {len(spec.stages)} stages; keep one stage (its task, base model "
                "and inputs), and run a multi-stage inference job with the fine-tuned model afterwards",
            )
        if spec.output.mode == "incremental":
            raise SpecError(
                "output.mode",
                "'incremental' adds predictions for new input files; a fine-tune writes one model. Use resume, "
                "overwrite or error-if-exists",
            )
        if spec.train is None:
            raise SpecError("train", "kind is 'finetune' but the 'train' section is missing")
        t = spec.train
        _positive("train.epochs", t.epochs)
        _positive("train.lr", t.lr)
        _positive("train.batch_size", t.batch_size)
        _positive("train.num_workers", t.num_workers)
        _positive("train.max_length", t.max_length)
        _positive("train.grad_accum_steps", t.grad_accum_steps)
        _positive("train.checkpoint_every_steps", t.checkpoint_every_steps)
        _positive("train.early_stopping_patience", t.early_stopping_patience)
        if t.max_failures < -1:
            raise SpecError("train.max_failures", f"must be >= 0, or -1 for no limit; got {t.max_failures}")
        if t.lora is not None:
            _positive("train.lora.r", t.lora.r)
            _positive("train.lora.alpha", t.lora.alpha)
            if not 0.0 <= t.lora.dropout < 1.0:
                raise SpecError("train.lora.dropout", f"must be in [0, 1), got {t.lora.dropout}")
        if not 0.0 <= t.eval_fraction < 1.0:
            raise SpecError("train.eval_fraction", f"must be in [0, 1), got {t.eval_fraction}")
        if t.eval_input is not None and t.eval_input.format is None and _has_suffix(t.eval_input.uri):
            format_from_uri(t.eval_input.uri, key="train.eval_input.format")
    elif spec.train is not None:
        raise SpecError("train", "the 'train' section is only allowed with kind: finetune")
    return spec


def parse_spec(data: Mapping[str, Any]) -> JobSpec:
    """Build and validate a JobSpec from plain data (as loaded from YAML). Task-aware checks are
    `pipeline.bind.bind`'s: call it (run_inference and the CLI do) before trusting a stage's params."""
    spec = build(JobSpec, data, "")
    return _validate(spec)


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/flow collections: 3, 0.5, true, null, [1, 2], {a: b}, text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to plain spec data. List items are addressed by index: stages.0.batch_size."""
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", f"expected KEY.PATH=VALUE, got {item!r}")
        path, _, raw = item.partition("=")
        # `stages[0].batch_size` (how errors name keys) is the same key as `stages.0.batch_size`.
        parts = re.sub(r"\[(\d+)\]", r".\1", path.strip()).split(".")
        if not all(parts):
            raise SpecError("--set", f"empty key in {path!r}")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(where, f"index {part!r} is out of range (the list has {len(node)} items)")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise SpecError(where, f"cannot set a key inside a {type(node).__name__}")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise SpecError(path, f"index {last!r} is out of range (the list has {len(node)} items)")
            node[int(last)] = _parse_scalar(raw)
        elif isinstance(node, dict):
            node[last] = _parse_scalar(raw)
        else:
            raise SpecError(path, f"cannot set a key inside a {type(node).__name__}")
    return data


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `--set` overrides, validate. Relative local paths stay as written."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError("", f"cannot read job spec {str(p)!r}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError("", f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SpecError("", f"{p} must hold a mapping of job keys (name, input, stages, output, ...)")
    return parse_spec(apply_overrides(data, overrides))


spec_to_dict = to_plain  # plain data for a spec dataclass (fingerprints, the manifest)
