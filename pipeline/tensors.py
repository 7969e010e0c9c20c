"""Arrow encoding of per-row numpy tensors passed between stages (features, raw model outputs).

A column of tensors is `struct<data: large_binary, shape: list<int32>, dtype: string>`: bytes in the
tensor's own dtype (uint8 images stay uint8, int32 token ids stay int32), so the object store moves compact
buffers and decoding is a zero-copy `np.frombuffer`. Null marks a row that has no tensor (an error row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["TENSOR_TYPE", "decode_tensors", "encode_tensors"]

TENSOR_TYPE = pa.struct(
    [("data", pa.large_binary()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string())]
)


def encode_tensors(rows: Sequence[Mapping[str, Any] | None], *, prefix: str) -> dict[str, pa.Array]:
    """Per-row dicts of arrays → one tensor column per key, named `prefix + key`."""
    keys: list[str] = []
    for row in rows:
        if row is not None:
            keys.extend(k for k in row if k not in keys)
    columns: dict[str, pa.Array] = {}
    for key in keys:
        data: list[Any] = []
        shape: list[Any] = []
        dtype: list[Any] = []
        for row in rows:
            if row is None or key not in row or row[key] is None:
                data.append(None)
                shape.append(None)
                dtype.append(None)
                continue
            arr = np.ascontiguousarray(row[key])
            data.append(arr.tobytes())
            shape.append(list(arr.shape))
            dtype.append(arr.dtype.str)
        mask = pa.array([d is None for d in data])
        columns[prefix + key] = pa.StructArray.from_arrays(
            [
                pa.array(data, pa.large_binary()),
                pa.array(shape, pa.list_(pa.int32())),
                pa.array(dtype, pa.string()),
            ],
            fields=list(TENSOR_TYPE),
            mask=mask,
        )
    return columns


def decode_tensors(table: pa.Table, *, prefix: str) -> list[dict[str, np.ndarray] | None]:
    """Inverse of `encode_tensors` for the columns named `prefix*`; rows with no tensors give None."""
    names = [n for n in table.column_names if n.startswith(prefix)]
    rows: list[dict[str, np.ndarray] | None] = [None] * table.num_rows
    for name in names:
        key = name[len(prefix) :]
        col = table.column(name).combine_chunks()
        datas = col.field("data").to_pylist()
        shapes = col.field("shape").to_pylist()
        dtypes = col.field("dtype").to_pylist()
        valid = col.is_valid().to_pylist()
        for i in range(table.num_rows):
            if not valid[i] or datas[i] is None:
                continue
            arr = np.frombuffer(datas[i], dtype=np.dtype(dtypes[i])).reshape(shapes[i])
            row = rows[i]
            if row is None:
                row = rows[i] = {}
            row[key] = arr
    return rows
