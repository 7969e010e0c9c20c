"""`kind: finetune` on Ray Train: a tiny BERT learns a word rule with 2 DDP workers, the published folder
loads with `from_pretrained`, an inference job runs on it, and bad labels fail before training starts (the
data checks are a Ray Data pass; see also test_finetune_stream.py)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from jobs.finetune import FinetuneResult, run_finetune
from pipeline.errors import ModelError, OutputError, SpecError
from pipeline.spec import JobSpec, parse_spec
from pipeline.train.labels import resolve_labels
from tests.helpers import WORDS, job_dict, make_text_classifier, write_texts_parquet

# The label is a function of the words: "pos" when a review has any of these, else "neg". With 2-6 words
# drawn from WORDS this gives about half of each.
POSITIVE = {"great", "good", "fun", "best", "loved", "brilliant", "charming", "beautiful", "funny"}
LABELS = ("neg", "pos")


def reviews(n: int, *, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    return texts, ["pos" if POSITIVE & set(t.split()) else "neg" for t in texts]


def finetune_spec(tmp: Path, *, base: Path, train_uri: Path, **train: Any) -> JobSpec:
    return parse_spec(
        {
            "name": "tiny-finetune",
            "kind": "finetune",
            "input": {"uri": str(train_uri), "id_column": "id"},
            "stages": [
                {"name": "clf", "task": "text-classification", "model": str(base), "inputs": {"text": "text"}}
            ],
            "output": {"uri": str(tmp / "model")},
            # A 2-layer, 32-wide BERT from scratch needs a much larger lr than a pretrained one.
            "train": {
                "epochs": 3,
                "lr": 2e-3,
                "batch_size": 16,
                "max_length": 32,
                "num_workers": 2,
                "eval_fraction": 0.2,
                "seed": 0,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def ray_cluster():
    """Reuse a Ray that another test module started; else start an embedded one (3 logical CPUs: two Train
    workers and one spare for Ray Data / an inference replica) and stop it afterwards."""
    import ray

    from pipeline.execute import init_ray

    started = not ray.is_initialized()
    init_ray(address=None, num_cpus=3)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_classifier(tmp_path_factory.mktemp("base"), num_labels=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    texts, labels = reviews(400, seed=0)
    test_texts, test_labels = reviews(100, seed=1)
    return {
        "train": write_texts_parquet(root / "train.parquet", texts, extra={"label": labels}),
        "test": write_texts_parquet(root / "test.parquet", test_texts, extra={"label": test_labels}),
    }


@pytest.fixture(scope="module")
def finetuned(
    ray_cluster, tmp_path_factory: pytest.TempPathFactory, base_model: Path, data: dict[str, Path]
) -> FinetuneResult:
    tmp = tmp_path_factory.mktemp("finetune")
    return run_finetune(finetune_spec(tmp, base=base_model, train_uri=data["train"]), progress=False)


@pytest.mark.timeout(300)
def test_two_workers_learn_the_rule(finetuned: FinetuneResult) -> None:
    assert finetuned.label_names == LABELS  # sorted distinct labels of the data
    # The eval split is by a hash of the row id: about eval_fraction (0.2) of the 400 rows, none lost.
    assert finetuned.train_rows + finetuned.eval_rows == 400
    assert 60 <= finetuned.eval_rows <= 100, finetuned
    assert [m["epoch"] for m in finetuned.metrics] == [1, 2, 3]
    first, last = finetuned.metrics[0], finetuned.metrics[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["eval_loss"] < first["eval_loss"]
    # Chance is about 0.5 (the majority class is 52% of the eval rows); the rule is easy to learn.
    assert last["eval_accuracy"] >= 0.8, finetuned.metrics
    # macro-F1 of the 2 workers' eval rows gathered on rank 0: it picks the published epoch
    assert all(
        0.0 <= r["eval_macro_f1"] <= 1.0 and r["score"] == r["eval_macro_f1"] for r in finetuned.metrics
    )
    assert last["eval_macro_f1"] >= 0.75, finetuned.metrics


@pytest.mark.timeout(60)
def test_output_is_a_standard_hf_folder(finetuned: FinetuneResult) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(finetuned.output_uri)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_metrics.json", "_SUCCESS"} <= names
    assert not names & {"train_state.pt", "_checkpoints"}  # resume state stays out of the published model
    # `shardwise status` reads fine-tune outputs: the manifest lists the published files, all present.
    from pipeline.status import output_status

    info = output_status(str(out))
    assert (info["kind"], info["state"], info["epochs"], info["problems"]) == ("finetune", "succeeded", 3, [])
    assert "model.safetensors" in json.loads((out / "_manifest.json").read_text())["files"]
    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.label2id == {"neg": 0, "pos": 1}
    with torch.inference_mode():
        logits = model(
            **tokenizer(["a great film", "the plot was slow"], return_tensors="pt", padding=True)
        ).logits
    assert logits.argmax(-1).tolist() == [1, 0]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["label_names"] == ["neg", "pos"]
    assert metrics["epochs"] == finetuned.metrics


@pytest.mark.timeout(120)
def test_inference_job_runs_on_the_finetuned_model(
    finetuned: FinetuneResult, data: dict[str, Path], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from pipeline.commit import read_output
    from pipeline.execute import run_inference

    spec = parse_spec(
        job_dict(input_uri=str(data["test"]), output_uri=str(tmp_path / "preds"), model=finetuned.output_uri)
    )
    result = run_inference(spec, progress=False)
    assert result.state == "succeeded" and result.rows_ok == 100
    preds = read_output(str(tmp_path / "preds")).to_pandas().set_index("id")
    truth = pq.read_table(data["test"]).to_pandas().set_index("id")["label"]
    assert set(preds["label"]) <= set(LABELS)
    accuracy = (preds["label"] == truth.loc[preds.index]).mean()
    assert accuracy >= 0.8


@pytest.mark.timeout(60)
def test_a_finished_model_is_not_overwritten_by_resume(
    finetuned: FinetuneResult, base_model: Path, data: dict[str, Path], monkeypatch
) -> None:
    monkeypatch.setattr("jobs.finetune.init_ray", _no_ray)
    spec = finetune_spec(Path(finetuned.output_uri).parent, base=base_model, train_uri=data["train"])
    with pytest.raises(OutputError, match="already holds a finished fine-tuned model.*overwrite"):
        run_finetune(spec, progress=False)


# --- mistakes are caught before Ray starts (output, base model) or before training starts (data) ---------


def _no_ray(**_: Any) -> None:
    raise AssertionError("Ray was started although the job is invalid")


def _no_training(*_: Any, **__: Any) -> None:
    raise AssertionError("training started although the job is invalid")


BAD_LABELS = [
    # (id, labels, train overrides, error key, message fragments)
    (
        "null label",
        ["pos", None, "neg", None],
        {},
        "train.label_column",
        ["column 'label' has 2 null label(s)", "row ids ['1', '3']", "Drop or fill"],
    ),
    (
        "label not in names",
        ["pos", "neg", "posit", "posit"],
        {"label_names": ["neg", "pos"]},
        "train.label_names",
        ["not in train.label_names ['neg', 'pos']", "'posit' (2 rows)", "add those names"],
    ),
    (
        "int id out of range",
        [0, 1, 2, 1],
        {"label_names": ["neg", "pos"]},
        "train.label_names",
        ["ids into train.label_names", "(0..1 for ['neg', 'pos'])", "2 (1 row)"],
    ),
    ("one class", ["pos", "pos", "pos", "pos"], {}, "train.label_column", ["1 distinct label(s) ['pos']"]),
    (
        "float labels",
        [0.5, 1.0, 0.0, 1.0],
        {},
        "train.label_column",
        ["type double", "strings (class names) or integers"],
    ),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("labels", "train", "key", "fragments"), [b[1:] for b in BAD_LABELS], ids=[b[0] for b in BAD_LABELS]
)
def test_bad_labels_fail_before_training(
    ray_cluster,
    tmp_path: Path,
    base_model: Path,
    monkeypatch,
    labels: list[Any],
    train: dict[str, Any],
    key: str,
    fragments: list[str],
) -> None:
    monkeypatch.setattr("jobs.finetune._finetune_locked", _no_training)
    texts = ["a great film", "bad", "good fun", "dull"]
    uri = write_texts_parquet(tmp_path / "train.parquet", texts, extra={"label": labels})
    spec = finetune_spec(tmp_path, base=base_model, train_uri=uri, **train)
    with pytest.raises(SpecError) as info:
        run_finetune(spec, progress=False)
    assert info.value.key == key
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not (tmp_path / "model").exists()


@pytest.mark.timeout(180)
def test_missing_label_column_and_null_text_name_their_keys(
    ray_cluster, tmp_path: Path, base_model: Path, monkeypatch
) -> None:
    monkeypatch.setattr("jobs.finetune._finetune_locked", _no_training)
    uri = write_texts_parquet(
        tmp_path / "train.parquet", ["good", None, "bad"], extra={"label": ["pos", "neg", "neg"]}
    )
    with pytest.raises(
        SpecError, match=r"column 'text' of .* has 1 null value\(s\) \(row ids \['1'\]\)"
    ) as info:
        run_finetune(finetune_spec(tmp_path, base=base_model, train_uri=uri), progress=False)
    assert info.value.key == "stages[0].inputs.text"
    with pytest.raises(SpecError, match="column 'sentiment' is not in") as info:
        run_finetune(
            finetune_spec(tmp_path, base=base_model, train_uri=uri, label_column="sentiment"), progress=False
        )
    assert info.value.key == "train.label_column"


@pytest.mark.timeout(60)
def test_a_folder_with_foreign_files_is_refused_in_every_mode(
    tmp_path: Path, base_model: Path, data: dict[str, Path], monkeypatch
) -> None:
    monkeypatch.setattr("jobs.finetune.init_ray", _no_ray)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    spec = finetune_spec(tmp_path, base=base_model, train_uri=data["train"])
    for mode in ("error-if-exists", "overwrite", "resume"):
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, mode=mode))
        with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
            run_finetune(spec, progress=False)
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"  # never deleted, even by overwrite


def test_label_names_from_the_data() -> None:
    ids = ["0", "1", "2", "3"]
    assert resolve_labels(
        pa.array(["pos", "neg", "pos", "mixed"]), label_names=None, column="y", row_ids=ids
    ) == (("mixed", "neg", "pos"), [2, 1, 2, 0])
    # Integers without names are named by their value; with names they are ids (datasets.ClassLabel).
    assert resolve_labels(pa.array([3, 1, 3, 1]), label_names=None, column="y", row_ids=ids) == (
        ("1", "3"),
        [1, 0, 1, 0],
    )
    assert resolve_labels(pa.array([1, 0, 1, 1]), label_names=("neg", "pos"), column="y", row_ids=ids) == (
        ("neg", "pos"),
        [1, 0, 1, 1],
    )
    dictionary = pa.array(["b", "a", "b", "a"]).dictionary_encode()
    assert resolve_labels(dictionary, label_names=("b", "a"), column="y", row_ids=ids) == (
        ("b", "a"),
        [0, 1, 0, 1],
    )


@pytest.mark.timeout(60)
def test_a_base_model_without_config_fails_before_ray(
    tmp_path: Path, data: dict[str, Path], monkeypatch
) -> None:
    monkeypatch.setattr("jobs.finetune.init_ray", _no_ray)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot be loaded as a base model.*config.json"):
        run_finetune(
            finetune_spec(tmp_path, base=tmp_path / "empty", train_uri=data["train"]), progress=False
        )


# --- label modes: what the driver hands to a task's `encode` --------------------------------------------


class _FakeTask:
    """Stands in for a registered task so the driver's data preparation can be checked without Ray."""

    name = "text-classification"
    inputs = {"text": True, "text_pair": False}

    def __init__(self, mode: str, text_inputs: tuple[str, ...] | None = None) -> None:
        self.training_labels = mode
        if text_inputs is not None:
            self.training_text_inputs = text_inputs


@dataclasses.dataclass
class _Prepared:
    label_names: tuple[str, ...]
    train: pa.Table  # the rows the train dataset's read tasks give the workers


def _prepare(tmp_path: Path, base: Path, monkeypatch, task: _FakeTask, columns: dict[str, list[Any]]):
    """The driver's pass (the fake task stands in on the driver; read tasks get the label mode from it
    through the plan) and then the train dataset, read back."""
    import pyarrow.parquet as pq
    import ray

    from pipeline.train.data import dataset, prepare_data

    monkeypatch.undo()  # the spec is validated against the real registry
    pq.write_table(pa.table(columns), tmp_path / "train.parquet")
    spec = finetune_spec(tmp_path, base=base, train_uri=tmp_path / "train.parquet", eval_fraction=0.0)
    monkeypatch.setattr("pipeline.train.data.get_task", lambda name: task)
    data = prepare_data(spec)
    train = pa.concat_tables(ray.get(dataset(ray, data, "train").to_arrow_refs()))
    return _Prepared(data.label_names, train)


@pytest.mark.timeout(180)
def test_class_sequence_labels_become_id_lists(
    ray_cluster, tmp_path: Path, base_model: Path, monkeypatch
) -> None:
    tags = [["O", "B-PER"], ["O"], ["B-PER", "I-PER", "O"], []]
    data = _prepare(
        tmp_path,
        base_model,
        monkeypatch,
        _FakeTask("class_sequence"),
        {"id": ["a", "b", "c", "d"], "text": ["x y", "z", "u v w", ""], "label": tags},
    )
    assert data.label_names == ("B-PER", "I-PER", "O")
    by_text = dict(
        zip(data.train.column("text").to_pylist(), data.train.column("__label").to_pylist(), strict=True)
    )
    assert by_text == {"x y": [2, 0], "z": [2], "u v w": [0, 1, 2], "": []}


@pytest.mark.timeout(180)
def test_class_sequence_rejects_null_tags_and_non_lists(
    ray_cluster, tmp_path: Path, base_model: Path, monkeypatch
) -> None:
    with pytest.raises(SpecError, match=r"null label\(s\) \(row ids \['b'\]\)") as info:
        _prepare(
            tmp_path,
            base_model,
            monkeypatch,
            _FakeTask("class_sequence"),
            {"id": ["a", "b"], "text": ["x", "y z"], "label": [["O"], ["O", None]]},
        )
    assert info.value.key == "train.label_column"
    with pytest.raises(SpecError, match="needs a list of labels per row") as info:
        _prepare(
            tmp_path,
            base_model,
            monkeypatch,
            _FakeTask("class_sequence"),
            {"id": ["a"], "text": ["x"], "label": ["O"]},
        )


@pytest.mark.timeout(180)
def test_raw_and_none_label_modes(ray_cluster, tmp_path: Path, base_model: Path, monkeypatch) -> None:
    answers = [{"text": "x", "answer_start": 0}, {"text": "z", "answer_start": 2}]
    data = _prepare(
        tmp_path,
        base_model,
        monkeypatch,
        _FakeTask("raw"),
        {"id": ["a", "b"], "text": ["x y", "y z"], "label": answers},
    )
    got = dict(
        zip(data.train.column("text").to_pylist(), data.train.column("__label").to_pylist(), strict=True)
    )
    assert got == {"x y": answers[0], "y z": answers[1]} and data.label_names == ()
    with pytest.raises(SpecError, match=r"1 null value\(s\) \(row ids \['b'\]\)"):
        _prepare(
            tmp_path,
            base_model,
            monkeypatch,
            _FakeTask("raw"),
            {"id": ["a", "b"], "text": ["x", "y"], "label": ["t", None]},
        )
    # "none": no label column is read at all; a non-text input passes when the task says so.
    data = _prepare(
        tmp_path,
        base_model,
        monkeypatch,
        _FakeTask("none", text_inputs=()),
        {"id": ["a", "b"], "text": [b"\x00\x01", b"\x02"]},
    )
    assert data.train.column_names == ["text"] and data.train.num_rows == 2
    assert sorted(data.train.column("text").to_pylist()) == [b"\x00\x01", b"\x02"]


def test_training_options_are_checked_by_the_task(tmp_path: Path, base_model: Path) -> None:
    """Checked when the spec is bound (the CLI, run_finetune), before anything reads the data."""
    from pipeline.bind import bind

    spec = finetune_spec(
        tmp_path, base=base_model, train_uri=tmp_path / "x.parquet", options={"packing": True}
    )
    with pytest.raises(SpecError, match="takes no training options") as info:
        bind(spec)
    assert info.value.key == "train.options.packing"


@pytest.mark.timeout(60)
def test_class_weights_are_refused_for_a_task_without_named_classes(
    tmp_path: Path, base_model: Path, data: dict[str, Path], monkeypatch
) -> None:
    """text-generation has no label classes: class_weights is a SpecError naming the key, before Ray."""
    monkeypatch.setattr("jobs.finetune.init_ray", _no_ray)
    spec = finetune_spec(tmp_path, base=base_model, train_uri=data["train"], class_weights="balanced")
    stage = dataclasses.replace(spec.stages[0], task="text-generation")
    with pytest.raises(SpecError) as info:
        run_finetune(dataclasses.replace(spec, stages=(stage,)), progress=False)
    assert info.value.key == "train.class_weights"
    assert not (tmp_path / "model").exists()
