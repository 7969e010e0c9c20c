"""`kind: finetune`: fine-tune a task's model on Ray Train and write a folder that `kind: inference` loads.

This module is the job: its checks, the lease, the manifest and the output modes. The work is done in
pipeline.train (named on the right):

    driver   check the output location and the base model                    ← before Ray starts
             plan shards of `input` (+ `train.eval_input`) as inference does (file metadata)
          → streaming pass, a Ray Data job: each task reads a shard (`read_shard`)   train.data, train.labels
            and returns a summary; the driver merges them: parse errors, null/non-text inputs, label
            names and per-class counts (every data error is here, before anything is written and before
            training starts)
          → train / eval: lazy `from_items(shards) → map_batches(read, labels → ids)`;  train.data
            eval rows are those whose id hashes (seeded) into `eval_fraction`, unless `train.eval_input`
          → TorchTrainer(ScalingConfig(num_workers, use_gpu)), each worker:          train.trainer
               builds the task's `Trainable`, `prepare_model` (DDP: gloo on CPU,     train.loop
               NCCL on GPU); per epoch: its `get_dataset_shard("train")` → encode → AdamW step, linear
               warmup + decay, mid-epoch checkpoints; eval rows with `row % world_size == rank` → loss /
               accuracy sums, all-reduced; the task's (prediction, reference) pairs → gathered on rank 0
               → task metrics; rank 0: checkpoint (HF folder + optimizer state) → `ray.train.report`
          → driver: the best epoch's checkpoint → output folder (staged, then moved     train.publish
            in), train_metrics.json, `_SUCCESS`

Output modes (`output.mode`). The output is a model folder, not shards, so:
- `resume` (default): refuse if a finished model is there (its manifest says so); otherwise continue an interrupted
  run of the same job from its last epoch checkpoint (Ray Train restores it when the run name and storage
  match; the run name carries a fingerprint of data, model and training settings, so a changed job starts
  from scratch instead of resuming someone else's state).
- `overwrite`: delete the files an earlier fine-tune published at `output.uri` (the ones its manifest lists,
  and this run's checkpoints) and train from scratch; the deleting happens after the data checks pass, so a
  typo does not cost the previous model. Nothing shardwise did not write is deleted: a folder holding other
  files, or an inference output, is refused (pipeline.commit ownership, pipeline.locations).
- `error-if-exists`: refuse if `output.uri` has any content.
Checkpoints go to `train.checkpoint_uri`, else `<output.uri>/_checkpoints` (removed once the model is
published; an explicit `checkpoint_uri` is left alone).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.loading import model_identity, resolve_model
from models.lora import is_adapter_folder
from models.registry import available_tasks, get_task, label_mode
from pipeline import __version__
from pipeline.bind import bind
from pipeline.commit import OutputDir
from pipeline.errors import ModelError, OutputError, SpecError
from pipeline.execute import init_ray, new_run_id
from pipeline.lease import Lease
from pipeline.locations import check_output_location
from pipeline.redact import fingerprint_view, redact
from pipeline.sources import resolve_format
from pipeline.spec import FinetuneSpec, JobSpec, spec_to_dict
from pipeline.train.data import TrainingData, prepare_data
from pipeline.train.loop import METRICS_FILE
from pipeline.train.publish import merge_lora_into, publish_model
from pipeline.train.trainer import CHECKPOINTS, checkpoint_uri, clear_checkpoints, fit

__all__ = ["CHECKPOINTS", "METRICS_FILE", "FinetuneResult", "check_locations", "run_finetune"]


@dataclass(frozen=True)
class FinetuneResult:
    output_uri: str
    epochs: int
    train_rows: int
    eval_rows: int
    label_names: tuple[str, ...]
    # One entry per epoch: {epoch, train_loss, eval_loss, eval_accuracy, the task's eval_<metric>s
    # (pipeline.train.loop), epoch_s, score}; eval_* are None (task metrics absent) when there is no eval set.
    metrics: list[dict[str, Any]] = field(repr=False)
    wall_s: float


def check_locations(spec: JobSpec) -> None:
    """The output and checkpoint folders must be safe places to write (and, on overwrite, delete) in."""
    assert spec.train is not None
    protected = [("input.uri", spec.input.uri), ("stages[0].model", spec.stage.model)]
    if spec.train.eval_input is not None:
        protected.append(("train.eval_input.uri", spec.train.eval_input.uri))
    check_output_location(spec.output.uri, key="output.uri", protected=protected)
    if spec.train.checkpoint_uri is not None:
        check_output_location(spec.train.checkpoint_uri, key="train.checkpoint_uri", protected=protected)


def _check_output(spec: JobSpec, out: OutputDir, *, delete: bool) -> dict[str, Any] | None:
    """Refuse what output.mode forbids; returns the manifest of an earlier run. `delete=False` only checks:
    `overwrite` clears the output only once the data and labels have passed their checks, so a job with a
    typo does not destroy the previous model."""
    manifest = out.claim(kind="finetune", mode=spec.output.mode, delete=delete)
    if spec.output.mode != "overwrite" and manifest is not None and manifest.get("state") == "succeeded":
        raise OutputError(
            f"output.uri {spec.output.uri!r} already holds a finished fine-tuned model ({manifest.get('name')!r}); "
            "use it as an inference `model`, or set output.mode to 'overwrite' (or pass --overwrite) to "
            "train again, or write to another output.uri"
        )
    return manifest


def _finetune_manifest(
    spec: JobSpec, *, state: str, fingerprint: str, run_id: str, files: list[str], reason: str | None = None
) -> dict[str, Any]:
    """The fine-tune output's manifest: marks the folder as shardwise's (and lists the model files it wrote,
    the only ones an overwrite may delete), and gives `shardwise status` its state."""
    return {
        "format": 2,
        "shardwise": __version__,
        "kind": "finetune",
        "name": spec.name,
        "state": state,
        "reason": reason,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "spec": redact(spec_to_dict(spec)),
        "files": sorted(files),
        "updated_at": time.time(),
    }


def _check_base_model(base: str, uri: str) -> None:
    """A folder without a loadable config fails here, with the fix, not in every worker after Ray started."""
    from transformers import AutoConfig

    if is_adapter_folder(base):
        raise ModelError(
            f"stages[0].model {uri!r} is a LoRA adapter folder (adapter_config.json), which cannot be trained "
            "further as a base model; fine-tune its base model instead, or a merged model (train.lora.merge: "
            "true writes one)"
        )

    try:
        AutoConfig.from_pretrained(base)
    except Exception as e:  # noqa: BLE001 - HF raises OSError/ValueError/KeyError for the same mistake
        raise ModelError(
            f"stages[0].model {uri!r} cannot be loaded as a base model ({type(e).__name__}: {e}); point it at a "
            "folder with config.json, *.safetensors and tokenizer files (e.g. python -m infra.assets fetch "
            "prints the MiniLM folder)"
        ) from e


def _fingerprint(spec: JobSpec, data: TrainingData, model_id: Any) -> str:
    """Identifies a training run for resume: data, base model, task, labels and the settings that change the
    result. Scaling (num_workers, use_gpu) and where checkpoints go are left out: a run may resume on another
    cluster shape."""
    assert spec.train is not None
    train = {
        k: v
        for k, v in fingerprint_view(spec_to_dict(spec.train)).items()
        if k not in ("num_workers", "use_gpu", "checkpoint_uri")
    }
    parts = {
        "task": spec.stage.task,
        "inputs": spec.stage.inputs,
        "model": model_id,
        # Non-secret storage options as a digest: a rotated key resumes the same run, no secret is hashed.
        "input": fingerprint_view(spec_to_dict(spec.input)),
        "data": data.listing,
        "labels": data.label_names,
        "train": train,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _run_name(spec: JobSpec, fp: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in spec.name)[:40]
    return f"{slug}-{fp[:12]}"


def _embedded_cpus(num_workers: int) -> int:
    """Logical CPUs for the embedded cluster.

    Each Train worker reserves 1 CPU and Ray Train waits, without end, until all of them fit; the V2
    controller and Ray Data's split coordinator reserve none (seen with ray 2.60: 2 workers train on exactly
    2 logical CPUs; 1 CPU for 2 workers never starts, which `_check_cluster` turns into an error). The
    datasets' read tasks need the spare CPU: they would otherwise wait forever behind the workers. Logical CPUs may exceed the cores;
    torch threads are set per worker.
    """
    return max(os.cpu_count() or 1, num_workers + 1)


def _check_cluster(t: FinetuneSpec) -> None:
    """Fail now, not hang in placement, when the cluster cannot hold the workers (e.g. a reused small one)."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": t.num_workers, **({"GPU": t.num_workers} if t.use_gpu else {})}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        what = ", ".join(f"{need_} {k} (the cluster has {int(got)})" for k, (need_, got) in short.items())
        raise SpecError(
            "train.num_workers",
            f"{t.num_workers} worker(s) need {what}; Ray Train would wait forever for them. Lower "
            "train.num_workers"
            + (", set train.use_gpu: false" if "GPU" in short else "")
            + " or run on a larger cluster (--address)",
        )


def run_finetune(
    spec: JobSpec, *, address: str | None = None, overwrite: bool = False, progress: bool = True
) -> FinetuneResult:
    """Fine-tune `spec.stage.model` on `spec.input` and publish the model at `spec.output.uri`.

    `address` joins a running Ray cluster (else an embedded one starts); `overwrite` is the CLI's
    `--overwrite` (same as output.mode: overwrite). Raises ShardwiseError subclasses on failure.
    """
    started = time.time()
    t = spec.train
    if spec.kind != "finetune" or t is None:
        raise SpecError(
            "kind", f"run_finetune runs kind: finetune jobs with a 'train' section; got kind {spec.kind!r}"
        )
    bind(spec)  # the task, its params and training options
    if overwrite:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, mode="overwrite"))
    # A folder input's format comes from its files.
    spec = dataclasses.replace(
        spec,
        input=resolve_format(spec.input),
        train=dataclasses.replace(
            t, eval_input=resolve_format(t.eval_input) if t.eval_input is not None else None
        ),
    )
    t = spec.train
    assert t is not None
    stage = spec.stage
    task = get_task(stage.task)
    if t.class_weights is not None and label_mode(task) not in ("class", "class_sequence"):
        raise SpecError(
            "train.class_weights",
            f"task {stage.task!r} does not train a classifier over named classes; remove class_weights",
        )
    if not callable(getattr(task, "training", None)):
        can = sorted(
            name for name, tk in available_tasks().items() if callable(getattr(tk, "training", None))
        )
        raise SpecError(
            "stages[0].task", f"task {stage.task!r} cannot be fine-tuned yet; tasks that can: {can}"
        )

    check_locations(spec)
    out = OutputDir(spec.output.uri, storage_options=spec.output.storage_options)
    # Read-only checks first: nothing (not even a lease file) is written before the job is known to be good.
    _check_output(spec, out, delete=False)
    # A local base model becomes an absolute path (workers run in their own directories); a remote one is
    # fetched by each worker into its node's cache.
    remote_model = "://" in stage.model and not stage.model.startswith("file://")
    base = stage.model if remote_model else resolve_model(stage.model, revision=stage.revision)
    if not remote_model:
        _check_base_model(base, stage.model)
    # The data checks are a Ray Data pass over the input (the driver never holds the rows): Ray starts
    # here, after the checks that need no data and before anything is written.
    init_ray(address=address, num_cpus=None if address else _embedded_cpus(t.num_workers))
    if address is None:
        _check_cluster(t)
    data = prepare_data(spec)
    fp = _fingerprint(spec, data, model_identity(stage.model, revision=stage.revision))
    run_id = new_run_id()
    with Lease(out, run_id, what=f"fine-tune {spec.name!r}"):
        _check_output(spec, out, delete=False)  # again, now that no other run can change it
        return _finetune_locked(
            spec,
            out,
            data,
            base=base,
            fp=fp,
            run_id=run_id,
            started=started,
            progress=progress,
        )


def _finetune_locked(
    spec: JobSpec,
    out: OutputDir,
    data: TrainingData,
    *,
    base: str,
    fp: str,
    run_id: str,
    started: float,
    progress: bool,
) -> FinetuneResult:
    t = spec.train
    assert t is not None
    stage = spec.stage
    run_name = _run_name(spec, fp)
    if spec.output.mode == "overwrite":
        _check_output(spec, out, delete=True)
        clear_checkpoints(posixpath.join(checkpoint_uri(spec), run_name), spec.output.storage_options)

    def write_manifest(state: str, files: Sequence[str] = (), reason: str | None = None) -> None:
        out.write_manifest(
            _finetune_manifest(
                spec, state=state, fingerprint=fp, run_id=run_id, files=list(files), reason=reason
            )
        )

    write_manifest("running")
    fitted = fit(
        spec,
        data,
        base=base,
        run_name=run_name,
        progress=progress,
        failed=lambda reason: write_manifest("failed", reason=reason),
    )
    history = fitted.history
    wall = time.time() - started
    metrics = {
        "task": stage.task,
        "base_model": stage.model,
        "label_names": list(data.label_names),
        "train_rows": data.train_rows,
        "eval_rows": data.eval_rows,
        "num_workers": t.num_workers,
        "use_gpu": t.use_gpu,
        # Without storage options: they may hold credentials.
        "train": {
            **spec_to_dict(t),
            "eval_input": t.eval_input and {"uri": t.eval_input.uri, "format": t.eval_input.format},
        },
        "fingerprint": fp,
        "epochs": history,
        # The published weights are this epoch's (the best eval score; the last epoch without an eval set).
        "best_epoch": fitted.best_epoch,
        "stopped_early": bool(history and history[-1].get("stopped_early")),
        "wall_s": wall,
    }
    metrics = redact(metrics)  # train.options may hold storage options or tokens
    merge = None
    if t.lora is not None and t.lora.merge:
        merge = functools.partial(
            merge_lora_into, task=stage.task, base=base, label_names=data.label_names, train=t
        )
    published = publish_model(
        fitted.checkpoint,
        out,
        metrics=metrics,
        listed=lambda files: write_manifest("publishing", files),
        prepare=merge,
    )
    write_manifest("succeeded", published)
    out.write_success()
    if t.checkpoint_uri is None and out.exists(CHECKPOINTS):
        out.fs.rm(out.path(CHECKPOINTS), recursive=True)  # the published folder holds the final weights
    return FinetuneResult(
        output_uri=spec.output.uri,
        epochs=len(history),
        train_rows=metrics["train_rows"],
        eval_rows=metrics["eval_rows"],
        label_names=data.label_names,
        metrics=history,
        wall_s=wall,
    )
