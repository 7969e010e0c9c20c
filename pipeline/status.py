"""What state an output is in, from what is on storage: the manifest, the lease, commit records and parts.

    state        exit  meaning
    succeeded    0     every planned shard is committed and matches its part; `_SUCCESS` is there
    failed       1     the last run failed (reason given: error rate, a worker error, ...)
    incomplete   3     the output says it finished, but parts are missing or do not match their records
    interrupted  4     a run started and nobody holds the output now (a killed driver): rerun to resume
    partial      4     a run stopped on purpose before the end (`max_shards`): rerun to resume
    running      5     a run holds the output's lease and its heartbeat is fresh

Exit 2 (from the CLI) means the folder is not a shardwise output or a file in it cannot be read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pipeline.commit import READ_STAGE, SUCCESS, OutputDir
from pipeline.errors import OutputError
from pipeline.lease import read_lease

__all__ = ["EXIT_CODES", "output_status", "stage_counts"]

EXIT_CODES = {"succeeded": 0, "failed": 1, "incomplete": 3, "interrupted": 4, "partial": 4, "running": 5}


def output_status(
    uri: str, *, storage_options: dict[str, Any] | None = None, verify: bool = False
) -> dict[str, Any]:
    """The state of the output at `uri` (see the module docstring), with counts and the problems found."""
    out = OutputDir(uri, storage_options=storage_options)
    manifest = out.read_manifest()
    if manifest is None:
        raise OutputError(
            f"{uri!r} has no _manifest.json: it is not a shardwise output (or the job never started)"
        )
    lease = read_lease(out)
    live = lease is not None and lease.live()
    recorded = manifest.get("state")
    info: dict[str, Any] = {
        "name": manifest.get("name"),
        "kind": manifest.get("kind"),
        "recorded_state": recorded,
        "reason": manifest.get("reason"),
        "runs": len(manifest.get("runs") or []),
        "holder": lease.describe() if live and lease is not None else None,
        "problems": [],
    }
    if manifest.get("kind") == "finetune":
        _finetune(out, manifest, info)
    else:
        _inference(out, manifest, info, verify=verify)
    if live:
        state = "running"
    elif recorded in ("running", "publishing", "interrupted"):
        state = "interrupted"
    elif recorded == "failed":
        state = "failed"
    elif recorded == "partial":
        state = "partial"
    elif info["problems"] or not out.exists(SUCCESS):
        state = "incomplete"
        if not out.exists(SUCCESS):
            info["problems"].append("_SUCCESS is missing")
    else:
        state = "succeeded"
    info["state"] = state
    info["exit_code"] = EXIT_CODES[state]
    info["run_log"] = _run_log(out)
    return info


def _run_log(out: OutputDir, *, last: int = 20) -> list[dict[str, Any]]:
    """The last runs' records from `_runs/` (oldest first)."""
    names = sorted(n for n in out.sizes("_runs") if n.endswith(".json"))[-last:]
    records = []
    for name in names:
        try:
            records.append(json.loads(out.read_bytes(f"_runs/{name}")))
        except (FileNotFoundError, ValueError):
            continue
    return records


def _inference(out: OutputDir, manifest: dict[str, Any], info: dict[str, Any], *, verify: bool) -> None:
    records = out.read_records()
    good, bad = out.verified(records, fingerprint=manifest.get("fingerprint"), verify=verify)
    total = int(manifest.get("shards_total") or 0)
    rows_in = sum(r.rows_in for r in good.values())
    rows_error = sum(r.rows_error for r in good.values())
    by_stage: Counter[str] = Counter()
    for r in good.values():
        by_stage.update(r.stage_errors())
    names = [
        str(s.get("name")) for s in (manifest.get("spec") or {}).get("stages") or [] if isinstance(s, dict)
    ]
    info.update(
        shards_done=len(good),
        shards_total=total,
        rows_total=manifest.get("rows_total"),
        rows_ok=rows_in - rows_error,
        rows_error=rows_error,
        rows_error_read=by_stage.get(READ_STAGE, 0),
        stages=stage_counts(names, rows_in, by_stage),
    )
    for shard, why in sorted(bad.items()):
        info["problems"].append(f"shard {shard}: {why}")
    missing = total - len(good) - len(bad)
    if missing > 0 and manifest.get("state") == "succeeded":
        info["problems"].append(f"{missing} shard(s) have no commit record")


def stage_counts(
    names: list[str], rows_in: int, errors_by_stage: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Per stage, in run order: rows that reached it, passed it and failed in it (a row that failed in an
    earlier stage, or could not be read, never reaches it)."""
    reached = rows_in - errors_by_stage.get(READ_STAGE, 0)
    out = {}
    for name in names:
        failed = errors_by_stage.get(name, 0)
        out[name] = {"rows_in": reached, "rows_ok": reached - failed, "rows_error": failed}
        reached -= failed
    return out


def _finetune(out: OutputDir, manifest: dict[str, Any], info: dict[str, Any]) -> None:
    present = out.sizes("")
    files = list(manifest.get("files") or [])
    top = {f.split("/", 1)[0] for f in files}
    info["files"] = len(files)
    for name in sorted(top - set(present)):
        info["problems"].append(f"{name} is missing")
    try:
        metrics = json.loads(out.read_bytes("train_metrics.json"))
        epochs = metrics.get("epochs") or []
        info["epochs"] = len(epochs)
        info["last_epoch"] = epochs[-1] if epochs else None
    except (FileNotFoundError, ValueError):
        pass
