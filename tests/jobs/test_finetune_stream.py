"""Fine-tuning data is streamed: rows reach the Train workers through Ray Data reads of planned shards, the
label names and the data checks come from a streaming pass over every row, and the driver holds neither.

The memory test trains on an input several times larger than a driver memory budget it sets and measures
the driver's peak resident memory (VmHWM, reset just before the job) against it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SourceError, SpecError
from pipeline.spec import JobSpec, parse_spec
from tests.helpers import WORDS, make_text_classifier

POSITIVE = {"great", "good", "fun", "best", "loved", "brilliant", "charming", "beautiful", "funny"}
MiB = 1024 * 1024


def _spec(tmp: Path, *, base: Path, uri: str, input_extra: dict | None = None, **train: Any) -> JobSpec:
    return parse_spec(
        {
            "name": "stream-finetune",
            "kind": "finetune",
            "input": {"uri": uri, "id_column": "id", **(input_extra or {})},
            "stages": [
                {"name": "clf", "task": "text-classification", "model": str(base), "inputs": {"text": "text"}}
            ],
            "output": {"uri": str(tmp / "model")},
            "train": {"batch_size": 32, "max_length": 16, "num_workers": 1, "seed": 0, **train},
        }
    )


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_classifier(tmp_path_factory.mktemp("base"), num_labels=3)


def _rows(n: int, *, start: int = 0) -> dict[str, list[Any]]:
    """Unique texts (so a row can be recognised after the split), labelled by a word rule."""
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} row{i}" for i in range(start, start + n)]
    labels = ["pos" if POSITIVE & set(t.split()) else "neg" for t in texts]
    return {"id": [f"r{i}" for i in range(start, start + n)], "text": texts, "label": labels}


def _prepare(spec: JobSpec) -> Any:
    """The driver's part (plan + streaming pass), with the folder's format resolved as run_finetune does."""
    from pipeline.sources import resolve_format
    from pipeline.train.data import prepare_data

    return prepare_data(dataclasses.replace(spec, input=resolve_format(spec.input)))


def _read_back(data: Any, side: str) -> pa.Table:
    """What the workers would get: the lazy dataset of `side`, executed (rows come to the test, on purpose)."""
    import ray

    from pipeline.train.data import dataset

    return pa.concat_tables(ray.get(dataset(ray, data, side).to_arrow_refs()))


def _folder(tmp: Path, parts: list[dict[str, list[Any]]]) -> Path:
    root = tmp / "train"
    root.mkdir()
    for i, part in enumerate(parts):
        pq.write_table(pa.table(part), root / f"part-{i}.parquet", row_group_size=50)
    return root


@pytest.mark.timeout(240)
def test_split_is_disjoint_stable_and_labels_come_from_every_file(
    ray_session, tmp_path: Path, base_model: Path
) -> None:
    last = _rows(100, start=900)
    last["label"][-1] = "mixed"  # a class that only the last row of the last file has
    root = _folder(tmp_path, [_rows(300), _rows(300, start=300), _rows(300, start=600), last])
    spec = _spec(tmp_path, base=base_model, uri=str(root), eval_fraction=0.2)

    data = _prepare(spec)
    assert data.label_names == ("mixed", "neg", "pos")  # sorted distinct labels of all 1000 rows
    train, evaluation = _read_back(data, "train"), _read_back(data, "eval")
    train_texts, eval_texts = train.column("text").to_pylist(), evaluation.column("text").to_pylist()
    assert (len(train_texts), len(eval_texts)) == (data.train_rows, data.eval_rows)
    assert not set(train_texts) & set(eval_texts)
    assert len(set(train_texts) | set(eval_texts)) == len(train_texts) + len(eval_texts) == 1000
    assert 150 <= len(eval_texts) <= 250  # about eval_fraction of the rows
    # Labels became ids of those names, on the workers; the per-class counts are the train rows' classes.
    truth = dict(zip(_rows(900)["text"], _rows(900)["label"], strict=True))
    truth.update(zip(last["text"], last["label"], strict=True))
    for table in (train, evaluation):
        got = dict(zip(table.column("text").to_pylist(), table.column("__label").to_pylist(), strict=True))
        assert all(data.label_names[i] == truth[t] for t, i in got.items())
    by_class = [sum(1 for t in train_texts if truth[t] == name) for name in data.label_names]
    assert list(data.label_counts) == by_class
    # Eval rows carry a row number unique over the eval set (the loop keeps `row % world == rank`).
    rows = evaluation.column("__row").to_pylist()
    assert len(set(rows)) == len(rows)
    # The train rows are not in file order (shards in a seeded order, each shuffled in its read task).
    assert train_texts != sorted(train_texts, key=lambda t: int(t.rsplit("row", 1)[1]))

    again = _prepare(spec)  # a rerun (a resume) splits the same way
    assert set(_read_back(again, "eval").column("text").to_pylist()) == set(eval_texts)
    assert (again.train_rows, again.eval_rows) == (data.train_rows, data.eval_rows)

    capped = _prepare(_spec(tmp_path, base=base_model, uri=str(root), eval_fraction=0.2, max_train_rows=123))
    assert capped.train_rows == _read_back(capped, "train").num_rows == 123


@pytest.mark.timeout(240)
def test_checks_see_every_row_of_every_format(ray_session, tmp_path: Path, base_model: Path) -> None:
    """JSONL, CSV and HF folders go through the same shard reads; a bad row in the last file is found."""
    import datasets
    import pyarrow.csv as pacsv

    first, second = _rows(60), _rows(60, start=60)
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for i, part in enumerate((first, second)):
        lines = [
            json.dumps(dict(zip(part, values, strict=True))) for values in zip(*part.values(), strict=True)
        ]
        (jsonl / f"part-{i}.jsonl").write_text("\n".join(lines) + "\n")
    csv = tmp_path / "csv"
    csv.mkdir()
    for i, part in enumerate((first, second)):
        pacsv.write_csv(pa.table(part), csv / f"part-{i}.csv")
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({k: first[k] + second[k] for k in first}).save_to_disk(str(hf))
    for uri in (jsonl, csv, hf):
        data = _prepare(_spec(tmp_path, base=base_model, uri=str(uri), eval_fraction=0.25))
        assert data.label_names == ("neg", "pos"), uri
        assert data.train_rows + data.eval_rows == 120
        assert _read_back(data, "train").num_rows == data.train_rows

    # A null label in the last row of the last file, and a broken line there: found before training.
    lines = (jsonl / "part-1.jsonl").read_text().splitlines()
    lines[-1] = (
        lines[-1].replace('"label": "neg"', '"label": null').replace('"label": "pos"', '"label": null')
    )
    (jsonl / "part-1.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError, match=r"1 null label\(s\) \(row ids \['r119'\]\)") as info:
        _prepare(_spec(tmp_path, base=base_model, uri=str(jsonl)))
    assert info.value.key == "train.label_column"
    (jsonl / "part-1.jsonl").write_text("\n".join(lines[:-1]) + "\n{broken\n")
    with pytest.raises(SourceError, match=r"1 row\(s\) of .* could not be parsed"):
        _prepare(_spec(tmp_path, base=base_model, uri=str(jsonl)))
    # A later file without the label column: the read task's SourceError reaches the driver as itself.
    odd = tmp_path / "odd"
    odd.mkdir()
    pq.write_table(pa.table(first), odd / "part-0.parquet")
    pq.write_table(pa.table({k: v for k, v in second.items() if k != "label"}), odd / "part-1.parquet")
    with pytest.raises(SourceError, match=r"column\(s\) \['label'\] not found in 'part-1.parquet'"):
        _prepare(_spec(tmp_path, base=base_model, uri=str(odd)))


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_driver_memory_stays_under_budget_on_a_larger_input(
    ray_session, tmp_path: Path, base_model: Path
) -> None:
    # What the driver may grow by while it plans, checks and trains. The input is several times larger.
    budget = 150 * MiB
    # Rows of ~240 KiB, all of it in the id column: a job reads the id column (row ids, the eval split) and
    # an in-driver read held it like any other, but the tokenizer never sees it (on these machines it
    # manages ~1.6 MB/s of long text, which would make the test minutes long). Parquet compresses the
    # padding to almost nothing on disk; in memory every id is its full size.
    pad = "-" + "z" * (240 * 1024)
    root = tmp_path / "big"
    root.mkdir()
    rows, files = 500, 4
    for f in range(files):
        part = _rows(rows, start=f * rows)
        part["id"] = [i + pad for i in part["id"]]
        pq.write_table(pa.table(part), root / f"part-{f}.parquet", row_group_size=100)
    total = sum(
        pq.ParquetFile(p).metadata.row_group(i).total_byte_size
        for p in root.iterdir()
        for i in range(pq.ParquetFile(p).metadata.num_row_groups)
    )
    assert total > 3 * budget, total / MiB

    # Everything the job imports on the driver, imported first: library code is not data.
    import ray.data  # noqa: F401
    import ray.train.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig  # noqa: F401

    from jobs.finetune import run_finetune

    spec = _spec(tmp_path, base=base_model, uri=str(root), eval_fraction=0.05, epochs=1, batch_size=64)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    baseline = _status_kib("VmRSS") * 1024
    result = run_finetune(spec, progress=False)
    peak = _status_kib("VmHWM") * 1024
    growth = peak - baseline
    print(
        f"\ninput {total / MiB:.0f} MiB uncompressed ({rows * files} rows); driver RSS {baseline / MiB:.0f} MiB "
        f"before, peak {peak / MiB:.0f} MiB, growth {growth / MiB:.0f} MiB (budget {budget / MiB:.0f} MiB); "
        f"train {result.train_rows} rows, eval {result.eval_rows}, {result.wall_s:.0f} s"
    )
    assert result.train_rows + result.eval_rows == rows * files
    assert result.metrics[0]["train_loss"] > 0 and result.metrics[0]["eval_loss"] is not None
    assert growth < budget, f"driver grew {growth / MiB:.0f} MiB for a {total / MiB:.0f} MiB input"
