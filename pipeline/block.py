"""The columns a shard's block carries between stages (all engine names start with "__").

    __shard       shard id (every row of a block belongs to one shard; blocks may hold several)
    __id          row id as a string (the id column's value, or "<file>:<row>")
    __row         row index within its file (restores order)
    __file        the file the row came from, relative to the input root (error records name it)
    __err_step    null, or the step where the row failed: read | preprocess | forward | postprocess
    __err_stage   the name of the stage the row failed in (null for a read error)
    __err_type    exception/reason name
    __err_msg     what went wrong, for the error record
    __f.<name>    a feature tensor (pipeline.tensors), produced by preprocess, consumed by the replica
    __o.<name>    a raw output tensor, produced by the replica, consumed by postprocess
    __p.<stage>.<field>  a stage's output field (its postprocess wrote it; later stages read it, commit writes it)
plus the input columns a task's postprocess needs and the columns the output keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

__all__ = [
    "ERROR_COLUMNS",
    "ERR_MSG",
    "ERR_STAGE",
    "ERR_STEP",
    "ERR_TYPE",
    "FEATURE",
    "FILE",
    "ID",
    "OUTPUT",
    "PREDICTION",
    "READ_ERROR",
    "ROW",
    "SHARD",
    "ok_rows",
    "prediction_column",
    "set_errors",
]

SHARD = "__shard"
ID = "__id"
ROW = "__row"
FILE = "__file"
READ_ERROR = "__read_error"
ERR_STAGE = "__err_stage"
ERR_STEP = "__err_step"
ERR_TYPE = "__err_type"
ERR_MSG = "__err_msg"
FEATURE = "__f."
OUTPUT = "__o."
PREDICTION = "__p."
ERROR_COLUMNS = (ERR_STAGE, ERR_STEP, ERR_TYPE, ERR_MSG)


def prediction_column(stage: str, field: str) -> str:
    """The block column of one field of a stage's output."""
    return f"{PREDICTION}{stage}.{field}"


def set_errors(
    table: pa.Table, stage: str | None, step: str, errors: Sequence[tuple[str, str] | None]
) -> pa.Table:
    """Record new row errors in `step` of `stage` (rows already in error keep their first error)."""
    steps = table.column(ERR_STEP).to_pylist()
    if all(e is None for e in errors):
        return table
    stages = table.column(ERR_STAGE).to_pylist()
    types = table.column(ERR_TYPE).to_pylist()
    msgs = table.column(ERR_MSG).to_pylist()
    for i, err in enumerate(errors):
        if err is not None and steps[i] is None:
            stages[i], steps[i], types[i], msgs[i] = stage, step, err[0], err[1]
    for name, values in ((ERR_STAGE, stages), (ERR_STEP, steps), (ERR_TYPE, types), (ERR_MSG, msgs)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def ok_rows(table: pa.Table) -> list[int]:
    """Rows not in error."""
    return [i for i, s in enumerate(table.column(ERR_STEP).to_pylist()) if s is None]
