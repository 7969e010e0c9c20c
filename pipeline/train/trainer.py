"""Ray Train for a fine-tune: the TorchTrainer (`fit`), where its checkpoints live, and its errors.

Data passing. Rows reach the workers as Ray datasets (`datasets={"train", "eval"}` +
`get_dataset_shard`), not in `train_loop_config`: the config is pickled into every worker, the object
store shares one copy per node; `streaming_split(equal=True)` gives equal step counts for DDP
(pipeline.train.loop); the same code works across nodes; and the datasets are lazy reads, so the driver
never holds the rows (pipeline.train.data). Only "train" is split; each worker iterates all of "eval" and
keeps the rows with `row % world_size == rank`, so eval counts are exact (an equal split could drop rows).

Checkpoints go to `train.checkpoint_uri`, else `<output.uri>/_checkpoints`, under a run name that carries
the run's fingerprint: a rerun with the same `RunConfig(name, storage_path)` restores the last checkpoint
(that is how a fine-tune resumes after a killed driver), while a changed job starts from scratch. A worker
lost mid-run restarts every worker from the latest checkpoint, `train.max_failures` times
(`FailureConfig`). The best epoch's checkpoint is kept for publishing (pipeline.train.publish).

Ray Train version: ray 2.60 runs Train V2 unless `RAY_TRAIN_V2_ENABLED=0` (`ray/train/__init__.py`). This
package is written and tested against V2: the controller actor reserves no CPU, a rerun with the same
`RunConfig(name, storage_path)` restores the checkpoint manager (the resume above), and worker
failures arrive as `WorkerGroupError.worker_failures`. The APIs used (`TorchTrainer`, `ScalingConfig`,
`RunConfig`, `DataConfig`, `report`, `get_context`, `get_dataset_shard`, `get_checkpoint`) exist in V1 too,
which is untested here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from pipeline.errors import JobFailed, ShardwiseError
from pipeline.redact import scrub, secret_values
from pipeline.spec import FinetuneSpec, JobSpec, spec_to_dict
from pipeline.train.data import TrainingData, dataset
from pipeline.train.labels import class_weights
from pipeline.train.loop import METRICS_FILE, NO_SCORE, LoopConfig, train_loop
from pipeline.train.progress import Board, watch

__all__ = ["CHECKPOINTS", "Fitted", "checkpoint_uri", "clear_checkpoints", "fit", "storage"]

# The checkpoint folder inside the output when train.checkpoint_uri is not set (removed once published).
CHECKPOINTS = "_checkpoints"


@dataclass(frozen=True)
class Fitted:
    """A finished run: every epoch's record and the checkpoint to publish."""

    history: list[dict[str, Any]]
    # The published epoch: the best by `score` (pipeline.train.loop.epoch_score); 0 with no epoch record.
    best_epoch: int
    checkpoint: Any  # ray.train.Checkpoint of best_epoch


def checkpoint_uri(spec: JobSpec) -> str:
    assert spec.train is not None
    return spec.train.checkpoint_uri or posixpath.join(spec.output.uri.rstrip("/"), CHECKPOINTS)


def storage(uri: str, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: any fsspec URI, through pyarrow's fsspec bridge."""
    if "://" not in uri or uri.startswith("file://"):
        # Absolute: Ray Train workers run in their own working directory.
        return str(Path(uri.removeprefix("file://")).expanduser().resolve()), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    return root, PyFileSystem(FSSpecHandler(fs))


# What Ray Train (V2) writes in a run's folder: `checkpoint_<time>` folders, its checkpoint manager's
# snapshot, and a marker from its storage check.
_RAY_TRAIN_NAMES = (".validate_storage_marker", "checkpoint_manager_snapshot.json", "checkpoint_*")


def clear_checkpoints(run_dir: str, storage_options: dict[str, Any]) -> None:
    """`overwrite`: remove this run's old checkpoints (which Ray Train would resume). Only Ray Train's own
    names are deleted; the folder itself goes only when nothing else is left in it (a file someone put
    there stays, with its folder)."""
    fs, path = fsspec.core.url_to_fs(run_dir, **storage_options)
    if not fs.isdir(path):
        return
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in _RAY_TRAIN_NAMES):
            fs.rm(entry, recursive=True)
    if not fs.ls(path, detail=False):
        fs.rm(path, recursive=True)


def fit(
    spec: JobSpec,
    data: TrainingData,
    *,
    base: str,
    run_name: str,
    progress: bool,
    failed: Callable[[str], None],
) -> Fitted:
    """Train `base` on `data` with Ray Train (running already) and return the best epoch's checkpoint.
    `failed(reason)` is called before a failure is raised (the job's manifest records it); the reason and
    the raised message carry no secret of the spec."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    t = spec.train
    assert t is not None
    stage = spec.stage
    ckpt_uri = checkpoint_uri(spec)
    storage_path, storage_fs = storage(ckpt_uri, spec.output.storage_options)
    loop = LoopConfig(
        task=stage.task,
        base_model=base,
        input_names=tuple(stage.inputs),
        label_names=data.label_names,
        has_labels=data.train_source is not None and data.train_source.mode != "none",
        train=t,
        train_rows=data.train_rows,
        has_eval=data.eval is not None,
        threads=max(1, (os.cpu_count() or 1) // t.num_workers),
        label_counts=data.label_counts,
        class_weights=class_weights(spec, data),
    )
    # Lazy reads: Ray Train's ingest executes "train" (streaming_split), each worker "eval".
    datasets = {"train": dataset(ray, data, "train")}
    if data.eval is not None:
        datasets["eval"] = dataset(ray, data, "eval")
    # Always made (a no-CPU actor): it also counts the steps a worker failure makes the run redo.
    board = ray.remote(num_cpus=0)(Board).remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop, "board": board},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, placement_strategy=t.placement.upper()
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # The best epoch's checkpoint (by `score`, see epoch_score) is published; Ray Train also keeps
            # the latest one, which is all a resume needs. Mid-epoch checkpoints score below any epoch.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="keep", checkpoint_score_order="max"
            ),
            # A killed or preempted worker: restart the workers from the latest checkpoint, this many times.
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        # Only "train" is split; every worker sees all of "eval" and keeps its stride (exact counts).
        dataset_config=data_config(ray, t),
    )
    stop = threading.Event()
    watcher = watch(board, stop, loop) if progress else None
    try:
        result = trainer.fit()
    except ShardwiseError as e:
        failed(str(e))
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report the cause in one paragraph
        cause = worker_cause(e)
        if isinstance(cause, ShardwiseError):
            failed(str(cause))
            raise cause from e
        message = scrub(str(cause), secret_values(spec_to_dict(spec))).rstrip(".")
        failed(f"{type(cause).__name__}: {message}")
        raise JobFailed(
            f"fine-tuning failed: {type(cause).__name__}: {message}. Fix the cause and rerun the same job: it "
            f"resumes from the last checkpoint, if any (checkpoints: {ckpt_uri!r})"
        ) from e
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    if result.checkpoint is None:
        failed("Ray Train reported no checkpoint")
        raise JobFailed(f"fine-tuning reported no checkpoint (see the Ray Train logs under {ckpt_uri!r})")
    with result.checkpoint.as_directory() as ckpt_dir:  # the latest: it holds every epoch's record
        history = json.loads(Path(ckpt_dir, METRICS_FILE).read_text())["epochs"]
    best_epoch = (
        max(history, key=lambda r: (r.get("score", r["epoch"]), -r["epoch"]))["epoch"] if history else 0
    )
    return Fitted(history=history, best_epoch=best_epoch, checkpoint=best_checkpoint(result, best_epoch))


def data_config(ray: Any, t: FinetuneSpec) -> Any:
    """Only "train" is split; every worker sees all of "eval" and keeps its stride (exact counts). With
    mid-epoch checkpoints the train rows arrive in plan order (the shards' order is seeded), so a restored
    epoch that skips the batches it already trained on skips the same rows (exactly with one worker; with
    several, the split across workers may deal them out differently)."""
    if not t.checkpoint_every_steps:
        return ray.train.DataConfig(datasets_to_split=["train"])
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def best_checkpoint(result: Any, epoch: int) -> Any:
    """The checkpoint reported at the end of `epoch` (Ray Train kept it for its score), else the latest."""
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("epoch") == epoch and metrics.get("score", NO_SCORE) > NO_SCORE:
            return checkpoint
    return result.checkpoint


def worker_cause(exc: BaseException) -> BaseException:
    """The first worker's own exception inside Ray Train's wrappers (WorkerGroupError, RayTaskError)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    for _ in range(5):  # RayTaskError(cause) → the user exception, a few levels at most
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc
