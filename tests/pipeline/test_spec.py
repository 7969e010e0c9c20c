"""pipeline.spec: YAML job specs load into typed values; every mistake names its dotted key and the fix."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.bind import bind
from pipeline.errors import ShardwiseError, SpecError
from pipeline.spec import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_ROWS,
    FORMATS,
    JobSpec,
    apply_overrides,
    format_from_uri,
    load_spec,
    parse_spec,
    spec_to_dict,
)

# The job spec of DESIGN.md, verbatim (comments included).
DESIGN_SPEC = """
name: rt-sentiment
kind: inference                 # inference | finetune
input:
  uri: data/rt/test.parquet     # file, directory or glob; local path or fsspec URI
  format: parquet               # parquet | hf | jsonl | csv (default: from the URI)
  id_column: id                 # optional; default: a stable row id derived from (file, row)
  keep_columns: [id, text]      # copied to the output next to predictions (default: the id column)
stages:
  - name: sentiment
    task: text-classification   # HF pipeline task names
    model: /path/to/model       # local dir, fsspec URI, or hub id (with optional revision)
    inputs: {text: text}        # task input → column
    params: {top_k: 1}          # task parameters, HF pipeline names
    batch_size: 64
    replicas: 2                 # int or [min, max]
    num_gpus: 0                 # per replica, fractional allowed
output:
  uri: out/rt-sentiment
  mode: resume                  # resume (default) | overwrite | error-if-exists
max_error_rate: 0.01
"""


def _design() -> dict[str, Any]:
    return yaml.safe_load(DESIGN_SPEC)


def _minimal() -> dict[str, Any]:
    return {
        "name": "job",
        "input": {"uri": "data/in.parquet"},
        "stages": [{"name": "s", "task": "text-classification", "model": "m", "inputs": {"text": "text"}}],
        "output": {"uri": "out"},
    }


def _error(data: dict[str, Any]) -> SpecError:
    """The error of loading and binding `data` (structural keys fail in parse_spec, task keys in bind)."""
    with pytest.raises(SpecError) as info:
        bind(parse_spec(data))
    return info.value


def _stage(name: str, task: str, inputs: dict[str, str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "task": task, "model": "m", "inputs": inputs, **kw}


def _dag(*stages: dict[str, Any]) -> Any:
    """A mutation that replaces the design spec's stages."""

    def mutate(data: dict[str, Any]) -> None:
        data["stages"] = list(stages)

    return mutate


# --- a valid spec ----------------------------------------------------------------------------------------


def test_design_spec_loads_into_typed_values() -> None:
    """The spec in DESIGN.md is valid and every value arrives with its declared type."""
    spec = parse_spec(_design())
    assert isinstance(spec, JobSpec)
    assert spec.name == "rt-sentiment"
    assert spec.kind == "inference"
    assert spec.input.uri == "data/rt/test.parquet"
    assert spec.input.resolved_format() == "parquet"
    assert spec.input.id_column == "id"
    assert spec.input.keep_columns == ("id", "text")
    assert spec.input.kept() == ("id", "text")
    assert len(spec.stages) == 1 and spec.stage is spec.stages[0]
    stage = spec.stage
    assert (stage.name, stage.task, stage.model) == ("sentiment", "text-classification", "/path/to/model")
    assert stage.inputs == {"text": "text"}
    assert stage.params == {"top_k": 1}
    assert stage.batch_size == 64
    assert stage.replicas == 2 and stage.replica_range() == (2, 2)
    assert stage.num_gpus == 0.0 and isinstance(stage.num_gpus, float)
    assert spec.output.uri == "out/rt-sentiment"
    assert spec.output.mode == "resume"
    assert spec.max_error_rate == 0.01
    assert spec.train is None


def test_defaults_of_a_minimal_spec() -> None:
    """Keys left out take the documented defaults (resume, inference, shard sizes, no kept columns)."""
    spec = parse_spec(_minimal())
    assert spec.kind == "inference"
    assert spec.output.mode == "resume"
    assert spec.output.compression == "zstd"
    assert spec.max_error_rate == 0.01
    assert spec.input.format is None and spec.input.resolved_format() == "parquet"
    assert spec.input.shard_rows == DEFAULT_SHARD_ROWS
    assert spec.input.shard_bytes == DEFAULT_SHARD_BYTES
    assert spec.input.kept() == ()
    assert spec.stage.replica_range() == (1, 1)
    assert spec.stage.params == {} and spec.stage.dtype == "auto" and spec.stage.device == "auto"


def test_kept_columns_default_to_the_id_column() -> None:
    data = _minimal()
    data["input"]["id_column"] = "doc_id"
    assert parse_spec(data).input.kept() == ("doc_id",)


def test_spec_is_frozen() -> None:
    """Specs are values: shipped to workers and hashed, never mutated."""
    spec = parse_spec(_minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("replicas", "expected"), [(1, (1, 1)), (3, (3, 3)), ([1, 4], (1, 4)), ([2, 2], (2, 2))]
)
def test_replicas_int_or_min_max(replicas: Any, expected: tuple[int, int]) -> None:
    data = _minimal()
    data["stages"][0]["replicas"] = replicas
    assert parse_spec(data).stage.replica_range() == expected


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (1, 1.0), (0.5, 0.5)])
def test_num_gpus_accepts_ints_and_fractions(value: float, expected: float) -> None:
    data = _minimal()
    data["stages"][0]["num_gpus"] = value
    assert parse_spec(data).stage.num_gpus == expected


def test_float_in_exponent_notation_is_a_number() -> None:
    """`lr: 5e-5` is a number to a user (and YAML 1.2) although PyYAML reads it as a string."""
    data = _minimal()
    data["kind"] = "finetune"
    data["train"] = yaml.safe_load("lr: 5e-5\nweight_decay: 1E-2\nepochs: 2")
    spec = parse_spec(data)
    assert spec.train is not None
    assert spec.train.lr == 5e-5 and spec.train.weight_decay == 0.01 and spec.train.epochs == 2
    data["train"] = {"lr": "fast"}
    err = _error(data)
    assert err.key == "train.lr" and "expected a number" in str(err)


def test_finetune_spec_with_eval_input() -> None:
    data = _minimal()
    data["kind"] = "finetune"
    data["train"] = {"label_names": ["neg", "pos"], "eval_input": {"uri": "data/eval.jsonl"}, "use_gpu": True}
    train = parse_spec(data).train
    assert train is not None
    assert train.label_names == ("neg", "pos")
    assert train.eval_input is not None and train.eval_input.resolved_format() == "jsonl"
    assert train.use_gpu is True


def test_spec_to_dict_is_json_and_round_trips() -> None:
    """The manifest stores spec_to_dict(spec); loading it back gives the same spec."""
    spec = parse_spec(_design())
    plain = spec_to_dict(spec)
    assert json.loads(json.dumps(plain)) == plain
    assert parse_spec(plain) == spec


# --- mistakes name the dotted key ------------------------------------------------------------------------


def _set(path: str, value: Any):
    """A mutation of the design spec: set `a.b[0].c` to value (a missing leaf is created)."""

    def mutate(data: dict[str, Any]) -> None:
        parts = re.findall(r"[^.\[\]]+", path)
        node: Any = data
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str):
    def mutate(data: dict[str, Any]) -> None:
        parts = re.findall(r"[^.\[\]]+", path)
        node: Any = data
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[parts[-1]]

    return mutate


MISTAKES = [
    # (id, mutation, key the error names, fragments the message must contain)
    (
        "unknown top-level key",
        _set("nmae", "x"),
        "nmae",
        ["unknown key", "allowed keys: input, kind, max_error_rate, name, output, stages, train"],
    ),
    (
        "unknown stage key",
        _set("stages[0].batchsize", 8),
        "stages[0].batchsize",
        ["unknown key in stages[0]", "batch_size", "replicas", "num_gpus"],
    ),
    ("unknown input key", _set("input.url", "x"), "input.url", ["unknown key in input", "uri"]),
    (
        "unknown output key",
        _set("output.modes", "resume"),
        "output.modes",
        ["allowed keys: compression, mode"],
    ),
    (
        "wrong type",
        _set("stages[0].batch_size", "big"),
        "stages[0].batch_size",
        ["'big'", "expected an integer"],
    ),
    (
        "bool is not an int",
        _set("stages[0].batch_size", value=True),
        "stages[0].batch_size",
        ["expected an integer"],
    ),
    ("string for a list", _set("input.keep_columns", "text"), "input.keep_columns", ["a list of str"]),
    ("list item type", _set("input.keep_columns", ["id", 3]), "input.keep_columns[1]", ["got 3", "a string"]),
    (
        "mapping value type",
        _set("stages[0].inputs", {"text": 5}),
        "stages[0].inputs.text",
        ["expected a string"],
    ),
    ("stages not a list", _set("stages", {"name": "s"}), "stages", ["expected a list"]),
    ("section not a mapping", _set("output", "out/x"), "output", ["expected a mapping"]),
    (
        "bad literal",
        _set("output.mode", "append"),
        "output.mode",
        ["'append'", "allowed: 'resume', 'overwrite', 'error-if-exists'"],
    ),
    ("bad format", _set("input.format", "xml"), "input.format", ["'parquet'", "'hf'", "'jsonl'", "'csv'"]),
    ("bad kind", _set("kind", "train"), "kind", ["'inference'", "'finetune'"]),
    ("bad dtype", _set("stages[0].dtype", "fp16"), "stages[0].dtype", ["'bfloat16'", "'float16'"]),
    ("missing required top-level", _delete("output"), "output", ["required key is missing"]),
    ("missing required nested", _delete("stages[0].model"), "stages[0].model", ["required key is missing"]),
    ("empty name", _set("name", "  "), "name", ["must not be empty"]),
    ("no stages", _set("stages", []), "stages", ["at least one stage"]),
    ("replicas zero", _set("stages[0].replicas", 0), "stages[0].replicas", ["[min, max]", "got 0"]),
    ("replicas min > max", _set("stages[0].replicas", [3, 1]), "stages[0].replicas", ["got (3, 1)"]),
    ("replicas min zero", _set("stages[0].replicas", [0, 2]), "stages[0].replicas", ["1 <= min <= max"]),
    ("replicas three items", _set("stages[0].replicas", [1, 2, 3]), "stages[0].replicas", ["[1, 2, 3]"]),
    ("replicas not a number", _set("stages[0].replicas", "two"), "stages[0].replicas", ["'two'"]),
    ("negative gpus", _set("stages[0].num_gpus", -1), "stages[0].num_gpus", [">= 0"]),
    ("cuda without gpus", _set("stages[0].device", "cuda"), "stages[0].num_gpus", ["set num_gpus"]),
    ("zero batch size", _set("stages[0].batch_size", 0), "stages[0].batch_size", ["greater than 0"]),
    ("zero shard rows", _set("input.shard_rows", 0), "input.shard_rows", ["greater than 0"]),
    ("error rate above 1", _set("max_error_rate", 1.5), "max_error_rate", ["between 0 and 1"]),
    (
        "unknown task",
        _set("stages[0].task", "text-clasification"),
        "stages[0].task",
        ["unknown task 'text-clasification'", "available:", "text-classification"],
    ),
    (
        "missing required input",
        _set("stages[0].inputs", {}),
        "stages[0].inputs.text",
        ["needs input 'text'", "inputs: {text: <column>}"],
    ),
    (
        "unknown task input",
        _set("stages[0].inputs.question", "q"),
        "stages[0].inputs.question",
        ["has no input 'question'", "text_pair"],
    ),
    (
        "unknown params key",
        _set("stages[0].params", {"topk": 3}),
        "stages[0].params.topk",
        ["unknown key in stages[0].params", "top_k", "function_to_apply"],
    ),
    (
        "bad params value",
        _set("stages[0].params.function_to_apply", "relu"),
        "stages[0].params.function_to_apply",
        ["'softmax'"],
    ),
    ("params rule", _set("stages[0].params.top_k", 0), "stages[0].params.top_k", [">= 1 or null"]),
    (
        "format not inferable",
        _set("input", {"uri": "data/rt.txt"}),
        "input.format",
        ["'data/rt.txt'", "set input.format", "parquet", "jsonl"],
    ),
    (
        "duplicate stage name",
        lambda d: d["stages"].append(copy.deepcopy(d["stages"][0])),
        "stages[1].name",
        ["two stages are named 'sentiment'", "unique"],
    ),
    (
        "stage name not an identifier",
        _set("stages[0].name", "my stage"),
        "stages[0].name",
        ["'my stage' is not a stage name", "letters, digits"],
    ),
    (
        "forward reference",
        _dag(
            _stage("cls", "text-classification", {"text": "gen.generated_text"}),
            _stage("gen", "text-generation", {"text": "text"}),
        ),
        "stages[0].inputs.text",
        ["'gen.generated_text' refers to stage 'gen', which comes later", "list order is run order"],
    ),
    (
        "unknown field of an earlier stage",
        _dag(
            _stage("gen", "text-generation", {"text": "text"}),
            _stage("cls", "text-classification", {"text": "gen.summary_text"}),
        ),
        "stages[1].inputs.text",
        ["stage 'gen' (text-generation) has no field 'summary_text'", "generated_text", "finish_reason"],
    ),
    (
        "a type the task cannot take",
        _dag(
            _stage("cls", "text-classification", {"text": "text"}),
            _stage("sum", "summarization", {"text": "cls.score"}),
        ),
        "stages[1].inputs.text",
        ["'cls.score' holds double values", "input 'text' of task 'summarization' takes text"],
    ),
    (
        "text into an image input",
        _dag(
            _stage("gen", "text-generation", {"text": "text"}),
            _stage("det", "object-detection", {"image": "gen.num_generated_tokens"}),
        ),
        "stages[1].inputs.image",
        ["'gen.num_generated_tokens' holds int32 values", "takes image"],
    ),
    (
        "every stage without output",
        _set("stages[0].output", False),  # noqa: FBT003
        "stages[0].output",
        ["would write nothing"],
    ),
    (
        "stage name taken by a kept column",
        _dag(
            _stage("text", "text-classification", {"text": "text"}),
            _stage("ner", "token-classification", {"text": "text"}),
        ),
        "stages[0].name",
        ["kept input column", "rename the stage"],
    ),
    (
        "two stages in a fine-tune",
        lambda d: d.update(
            kind="finetune",
            train={"epochs": 1},
            stages=[
                _stage("a", "text-classification", {"text": "text"}),
                _stage("b", "text-classification", {"text": "text"}),
            ],
        ),
        "stages",
        ["a fine-tune trains one model, got 2 stages"],
    ),
    ("finetune needs train", _set("kind", "finetune"), "train", ["'train' section is missing"]),
    ("train only with finetune", _set("train", {"epochs": 1}), "train", ["only allowed with kind: finetune"]),
]


@pytest.mark.parametrize(
    ("mutate", "key", "fragments"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_mistakes_name_the_key(mutate, key: str, fragments: list[str]) -> None:
    """Each mistake raises SpecError whose key and message point at the offending key and what is allowed."""
    data = _design()
    mutate(data)
    err = _error(data)
    assert isinstance(err, ShardwiseError)
    assert err.key == key
    message = str(err)
    assert message.startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment in message


FINETUNE_MISTAKES = [
    ("unknown train key", {"lrr": 1e-4}, "train.lrr", ["unknown key in train", "lr", "epochs"]),
    (
        "unknown eval_input key",
        {"eval_input": {"uri": "e.parquet", "urii": 1}},
        "train.eval_input.urii",
        ["unknown key in train.eval_input"],
    ),
    (
        "eval_input format not inferable",
        {"eval_input": {"uri": "data/eval.txt"}},
        "train.eval_input.format",
        ["'data/eval.txt'", "set train.eval_input.format to one of"],
    ),
    ("eval_input missing uri", {"eval_input": {}}, "train.eval_input.uri", ["required key is missing"]),
    ("train wrong type", {"epochs": "many"}, "train.epochs", ["expected an integer"]),
    ("label_names not a list", {"label_names": "neg,pos"}, "train.label_names", ["list of str"]),
    ("train not a mapping", "yes", "train", ["expected a mapping or null"]),
    ("zero epochs", {"epochs": 0}, "train.epochs", ["greater than 0"]),
    ("eval_fraction 1", {"eval_fraction": 1.0}, "train.eval_fraction", ["[0, 1)"]),
]


@pytest.mark.parametrize(
    ("train", "key", "fragments"), [m[1:] for m in FINETUNE_MISTAKES], ids=[m[0] for m in FINETUNE_MISTAKES]
)
def test_finetune_mistakes_name_the_nested_key(train: Any, key: str, fragments: list[str]) -> None:
    """Optional sections (train, train.eval_input) report the key inside them, not just `train`."""
    data = _minimal()
    data["kind"] = "finetune"
    data["train"] = train
    err = _error(data)
    assert err.key == key
    for fragment in fragments:
        assert fragment in str(err)


def test_optional_value_of_wrong_type_says_null_is_allowed() -> None:
    data = _minimal()
    data["stages"][0]["max_batch_tokens"] = "lots"
    err = _error(data)
    assert err.key == "stages[0].max_batch_tokens"
    assert "expected int or null" in str(err)


def test_unknown_keys_of_mixed_types_are_reported() -> None:
    """A YAML mapping may have non-string keys (`1: x`); the error still names one of them."""
    data = _minimal()
    data[1] = "x"
    data["zzz"] = "y"
    err = _error(data)
    assert err.key == "1"  # sorted as text
    assert "unknown key" in str(err)


# --- format from the URI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "fmt"),
    [
        ("data/x.parquet", "parquet"),
        ("data/x.PQ", "parquet"),
        ("s3://bucket/dir/*.parquet", "parquet"),
        ("s3://bucket/x.parquet?versionId=3", "parquet"),
        ("data/x.jsonl", "jsonl"),
        ("data/x.ndjson", "jsonl"),
        ("data/x.json", "jsonl"),
        ("data/x.jsonl.gz", "jsonl"),
        ("data/x.csv", "csv"),
        ("data/x.csv.bz2", "csv"),
        ("data/x.tsv", "csv"),
        ("data/part-?.parquet", "parquet"),
        ("data/train/data-00000-of-00001.arrow", "hf"),
    ],
)
def test_format_from_uri(uri: str, fmt: str) -> None:
    assert format_from_uri(uri) == fmt


@pytest.mark.parametrize("uri", ["data/rt", "data/rt/", "s3://bucket/prefix/", "data/x.txt"])
def test_format_not_inferable_names_input_format(uri: str) -> None:
    with pytest.raises(SpecError) as info:
        format_from_uri(uri)
    assert info.value.key == "input.format"
    assert repr(uri) in str(info.value)
    assert str(list(FORMATS)) in str(info.value)


def test_explicit_format_wins_over_the_uri() -> None:
    data = _minimal()
    data["input"] = {"uri": "data/rt_hf", "format": "hf"}
    assert parse_spec(data).input.resolved_format() == "hf"
    data["input"] = {"uri": "data/rows.txt", "format": "jsonl"}
    assert parse_spec(data).input.resolved_format() == "jsonl"


# --- --set overrides -------------------------------------------------------------------------------------


def test_overrides_nested_keys_and_list_index() -> None:
    """`stages.0.batch_size=8` addresses the first stage; values are YAML scalars."""
    data = apply_overrides(
        _design(),
        [
            "stages.0.batch_size=8",
            "stages.0.num_gpus=0.5",
            "stages.0.replicas=[1, 3]",
            "stages.0.params.top_k=null",
            "input.keep_columns=[id]",
            "input.id_column=null",
            "output.mode=overwrite",
            "max_error_rate=0.5",
            "name=other-job",
        ],
    )
    spec = parse_spec(data)
    assert spec.stage.batch_size == 8
    assert spec.stage.num_gpus == 0.5
    assert spec.stage.replica_range() == (1, 3)
    assert spec.stage.params == {"top_k": None}
    assert spec.input.keep_columns == ("id",) and spec.input.id_column is None
    assert spec.output.mode == "overwrite"
    assert spec.max_error_rate == 0.5
    assert spec.name == "other-job"


def test_override_with_bracket_index_like_the_error_messages() -> None:
    """Errors name `stages[0].batch_size`; the same spelling works in --set."""
    spec = parse_spec(apply_overrides(_design(), ["stages[0].batch_size=8"]))
    assert spec.stage.batch_size == 8


def test_override_value_keeps_everything_after_the_first_equals() -> None:
    data = apply_overrides(_design(), ["input.uri=s3://bucket/x.parquet?versionId=a=b"])
    assert data["input"]["uri"] == "s3://bucket/x.parquet?versionId=a=b"


def test_override_creates_a_missing_section() -> None:
    data = apply_overrides(_design(), ["kind=finetune", "train.epochs=3", "train.lr=1e-4"])
    spec = parse_spec(data)
    assert spec.kind == "finetune"
    assert spec.train is not None and spec.train.epochs == 3 and spec.train.lr == 1e-4


def test_override_with_a_wrong_type_is_caught_by_validation() -> None:
    err = _error(apply_overrides(_design(), ["stages.0.batch_size=big"]))
    assert err.key == "stages[0].batch_size"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("stages.3.batch_size=8", "stages.3", "out of range (the list has 1 items)"),
        ("stages.x.batch_size=8", "stages.x", "'x'"),
        ("stages.1=8", "stages.1", "out of range"),
        ("name.first=x", "name.first", "cannot set a key inside a str"),
        ("stages.0.batch_size", "--set", "expected KEY.PATH=VALUE"),
        ("stages..batch_size=1", "--set", "empty key"),
    ],
)
def test_bad_overrides_name_the_key(override: str, key: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        apply_overrides(_design(), [override])
    assert info.value.key == key
    assert fragment in str(info.value)


# --- load_spec -------------------------------------------------------------------------------------------


def test_load_spec_reads_yaml_and_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(DESIGN_SPEC)
    assert load_spec(path) == parse_spec(_design())
    spec = load_spec(str(path), ["stages.0.batch_size=8", "output.mode=error-if-exists"])
    assert spec.stage.batch_size == 8 and spec.output.mode == "error-if-exists"
    # Relative local paths stay as written (resolved against the working directory at run time).
    assert spec.input.uri == "data/rt/test.parquet"


def test_load_spec_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="cannot read job spec") as info:
        load_spec(missing)
    assert str(missing) in str(info.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(bad)

    listed = tmp_path / "list.yaml"
    listed.write_text("- name: x\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_spec(listed)


def test_load_spec_validation_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(DESIGN_SPEC.replace("batch_size: 64", "batchsize: 64"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.key == "stages[0].batchsize"
