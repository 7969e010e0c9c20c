"""Read a job's output back the way a user does (public readers only), keyed by the input's row id.

Error records name their row by an id column: today a string column `id`; with the wave-2 contract it has
the input id column's name and type. `error_ids` reads whichever exists and returns the ids as ints (every
engine test uses an integer `id` input column), so the tests hold under both.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from pipeline.commit import read_errors, read_output


def error_ids(errors: pa.Table, *, id_column: str = "id") -> list[int]:
    name = id_column if id_column in errors.column_names else "id"
    return [int(v) for v in errors.column(name).to_pylist()]


def errors_by_id(uri: str, *, id_column: str = "id", **kw: Any) -> dict[int, dict[str, Any]]:
    """{row id: error record}; asserts no row has two records."""
    errors = read_errors(uri, **kw)
    ids = error_ids(errors, id_column=id_column)
    assert len(ids) == len(set(ids)), f"rows with more than one error record: {_dupes(ids)}"
    return dict(zip(ids, errors.to_pylist(), strict=True))


def predictions_by_id(uri: str, *, id_column: str = "id", **kw: Any) -> dict[int, dict[str, Any]]:
    """{row id: prediction row}; asserts no row is predicted twice."""
    rows = read_output(uri, **kw).to_pylist()
    ids = [int(r[id_column]) for r in rows]
    assert len(ids) == len(set(ids)), f"rows predicted more than once: {_dupes(ids)}"
    return dict(zip(ids, rows, strict=True))


def assert_each_id_once(uri: str, expected_ids: Any, *, id_column: str = "id", **kw: Any) -> None:
    """Every input id is in the output exactly once: in the predictions or in the error records."""
    preds = predictions_by_id(uri, id_column=id_column, **kw)
    errors = errors_by_id(uri, id_column=id_column, **kw)
    both = set(preds) & set(errors)
    assert not both, f"rows both predicted and in error: {sorted(both)[:10]}"
    expected = set(expected_ids)
    got = set(preds) | set(errors)
    assert got == expected, f"missing {sorted(expected - got)[:10]}, unexpected {sorted(got - expected)[:10]}"


def _dupes(ids: list[int]) -> list[int]:
    return sorted(i for i, c in Counter(ids).items() if c > 1)[:10]
