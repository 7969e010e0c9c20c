"""The fine-tuning loop: what every Ray Train worker runs (`train_loop`), and its per-epoch metrics.

Each worker builds the task's `Trainable` (models.registry), wraps the model for DDP (`prepare_model`: gloo
on CPU, NCCL on GPU), and per epoch: takes its `get_dataset_shard("train")` in micro-batches → `encode` →
forward (bf16 autocast on CUDA) → backward, an AdamW step every `grad_accum_steps` micro-batches with a
linear warmup and decay; a mid-epoch checkpoint every `train.checkpoint_every_steps` steps (with the data
position); then the eval rows with `row % world_size == rank` → loss and accuracy sums, all-reduced, and the
task's (prediction, reference) pairs → gathered on rank 0 → task metrics; rank 0 checkpoints (HF folder +
optimizer state) and every rank calls `ray.train.report`.

Batches. `train.batch_size` is the global batch (all workers, one optimizer step): each worker takes
`batch_size // num_workers` rows, so changing `num_workers` scales the job without changing the
optimization. Ray Data's `streaming_split(equal=True)` gives every worker the same number of rows, hence
the same number of DDP steps (a worker with one step more would wait forever in all-reduce); it may drop
up to `num_workers - 1` rows per epoch.

Task metrics. After each epoch every worker runs `eval_predictions(output, batch, *, model)` on its eval
batches (`batch` holds the model inputs and the `_` extras; `model` is the bare module, for `generate`): one
(prediction, reference) pair per eval row, in the shapes `models.metrics` consumes. The pairs are gathered
on rank 0, which calls `eval_metrics(pairs)` (a `models.metrics` function through `epoch_metrics`) and
broadcasts the result, so every rank's epoch record is the same (early stopping stops them together). The
record keys, `eval_<metric>`:
    text/image/audio classification  eval_macro_f1 (scikit-learn)
    token classification             eval_entity_precision / _recall / _f1 (seqeval, words' first sub-token)
    question answering               eval_exact_match, eval_f1 (SQuAD v1.1; the inference span search)
    speech recognition (CTC)         eval_wer, eval_cer (jiwer; greedy CTC decoding)
    object detection                 eval_map, eval_map_50 (pycocotools; the processor's post-process)
    image segmentation               eval_mean_iou, eval_pixel_accuracy (torchmetrics; ignore_index unscored)
    depth estimation                 eval_delta1, eval_abs_rel, eval_rmse (at the label's size)
    summarization                    eval_rouge1 / 2 / L (rouge-score; greedy generation, see below)
    translation                      eval_bleu (sacrebleu, 0-100), eval_chrf
    text generation                  eval_perplexity (exp of the mean token NLL; nothing is generated)
`eval_score` names the one that picks the published epoch ("min": lower is better, WER and perplexity;
`epoch_score` negates it). Eval cost: only seq2seq generates, greedily and at most `max_target_length` new tokens
per row; the other tasks reuse the eval forward's outputs.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyarrow as pa

from models.loading import resolve_model
from models.lora import apply_lora, read_adapter, save_lora
from models.metrics import MetricsError
from models.registry import FineTunable, get_task, model_inputs
from pipeline.spec import FinetuneSpec
from pipeline.train.data import LABEL, ROW

__all__ = [
    "METRICS_FILE",
    "NO_SCORE",
    "TRAIN_STATE",
    "LoopConfig",
    "epoch_score",
    "eval_score_of",
    "gathered_metrics",
    "shown_eval",
    "split_extras",
    "train_loop",
]

# The per-epoch records, in every checkpoint and in the published model folder.
METRICS_FILE = "train_metrics.json"
# In a checkpoint next to the HF files; never copied to the published model.
TRAIN_STATE = "train_state.pt"
# Same default as the HF Trainer (`max_grad_norm`): keeps the first steps on a fresh head from blowing up.
_MAX_GRAD_NORM = 1.0
# The score of a mid-epoch checkpoint: below any epoch's, so the best-epoch retention never keeps it
# (the latest checkpoint is always kept for a resume).
NO_SCORE = -1e30


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs; small (the rows travel as Ray datasets, not in here)."""

    task: str
    base_model: str
    input_names: tuple[str, ...]
    label_names: tuple[str, ...]
    has_labels: bool
    train: FinetuneSpec
    train_rows: int
    has_eval: bool
    threads: int
    # Training rows per class in id order (class / class_sequence labels), from the streaming pass.
    label_counts: tuple[int, ...] = ()
    # train.class_weights: balanced → one weight per class (n_rows / (n_classes × rows of the class)).
    class_weights: tuple[float, ...] | None = None


def _to_device(value: Any, device: Any) -> Any:
    """Tensors anywhere in `encode`'s output (dicts, lists: DETR's per-image targets) → `device`."""
    if hasattr(value, "to") and callable(value.to):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _accuracy_counts(output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
    """Default eval metric: argmax(logits) == labels where labels != -100; (B,) or (B, T) labels."""
    labels = batch["labels"]
    keep = labels != -100
    correct = (output.logits.argmax(-1) == labels) & keep
    return float(correct.sum().item()), float(keep.sum().item())


def split_extras(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`encode`'s output → (model inputs, extras); see `model_inputs`."""
    return model_inputs(batch), {k: v for k, v in batch.items() if k.startswith("_")}


def epoch_score(record: Mapping[str, Any], best: tuple[str, str] | None) -> float:
    """What picks the published epoch, higher is better: the task's eval metric (`Trainable.eval_score`,
    negated when lower is better: WER, perplexity) when there is one, else the task's eval accuracy, else
    the negated eval loss, else the epoch number (no eval set: the last epoch)."""
    if best is not None and record.get(best[0]) is not None:
        value = float(record[best[0]])
        return value if best[1] == "max" else -value
    if record.get("eval_accuracy") is not None:
        return float(record["eval_accuracy"])
    if record.get("eval_loss") is not None:
        return -float(record["eval_loss"])
    return float(record["epoch"])


def eval_score_of(trainable: Any) -> tuple[str, str] | None:
    """The task's `eval_score` (record key, "max" | "min"), checked; None for a task without task metrics."""
    best = getattr(trainable, "eval_score", None)
    if best is None:
        return None
    if not (isinstance(best, tuple) and len(best) == 2 and best[1] in ("max", "min")):
        raise TypeError(
            f"{type(trainable).__name__}.eval_score must be (record key, 'max' | 'min'), got {best!r}"
        )
    return best


def gathered_metrics(
    trainable: Any, pairs: list[tuple[Any, Any]], *, rank: int, world: int
) -> dict[str, float]:
    """Every worker's (prediction, reference) pairs → rank 0, which computes the task metrics
    (`eval_metrics`) once; the result is broadcast so that every rank holds the same record (early stopping
    must stop every rank at the same epoch). A set with nothing to score gives no task metrics (logged)."""
    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(pairs, parts if rank == 0 else None, dst=0)
        pairs = [pair for part in parts for pair in part] if rank == 0 else []
    result: dict[str, float] = {}
    if rank == 0 and pairs:
        try:
            result = trainable.eval_metrics(pairs)
        except MetricsError as e:
            logging.getLogger(__name__).warning("no task metrics for this epoch: %s", e)
    if world > 1:
        import torch.distributed as dist

        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def shown_eval(record: Mapping[str, Any], best: tuple[str, str] | None) -> dict[str, float]:
    """An epoch's eval figures for the progress line: accuracy and the task's metric (`eval_` dropped)."""
    shown = {}
    for key in ("eval_accuracy", best[0] if best else None):
        if key is not None and record.get(key) is not None:
            shown[key.removeprefix("eval_").replace("accuracy", "acc")] = round(float(record[key]), 4)
    return shown


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_linear_schedule_with_warmup

    loop: LoopConfig = config["loop"]
    board = config["board"]
    t = loop.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop.threads)  # the node's cores split between its workers
    torch.manual_seed(t.seed)  # the fresh head starts the same everywhere (DDP also broadcasts rank 0's)

    base_dir = resolve_model(loop.base_model)
    task = cast(FineTunable, get_task(loop.task))
    trainable = task.training(
        base_dir, label_names=loop.label_names, max_length=t.max_length, options=dict(t.options)
    )
    eval_counts = getattr(trainable, "eval_counts", None) or _accuracy_counts
    # Task metrics: (prediction, reference) per eval row, on every worker; metrics on rank 0 (see Trainable).
    predict = getattr(trainable, "eval_predictions", None)
    score_by = eval_score_of(trainable)

    def encode(batch: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model inputs on the worker's device, and the task's extras (see `split_extras`)."""
        columns = {name: batch.column(name).to_pylist() for name in loop.input_names}
        labels = batch.column(LABEL).to_pylist() if loop.has_labels else None
        inputs, extras = split_extras(trainable.encode(columns, labels))
        return _to_device(inputs, device), extras

    per_worker = max(1, t.batch_size // world)
    accum = t.grad_accum_steps
    # Micro-batches per epoch (the same on every rank: an equal split), and optimizer steps.
    micro_per_epoch = math.ceil((loop.train_rows // world) / per_worker)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = steps_per_epoch * t.epochs

    history, state, position, adapter = [], None, None, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            # LoRA checkpoints hold the adapter only: the base is rebuilt and the adapter loaded onto it.
            model = trainable.build_model(d if t.lora is None else base_dir)
            adapter = read_adapter(d) if t.lora is not None else None
            history = json.loads(Path(d, METRICS_FILE).read_text())["epochs"]
            if Path(d, TRAIN_STATE).exists():
                state = torch.load(Path(d, TRAIN_STATE), map_location="cpu", weights_only=True)
                position = state.get("position")
    else:
        model = trainable.build_model(base_dir)
    if t.lora is not None:
        model = apply_lora(model, t.lora, task_name=loop.task, state=adapter)
    model = ray.train.torch.prepare_model(model)  # to the worker's device; DDP when world > 1
    core: torch.nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
    device = ray.train.torch.get_device()

    # No weight decay on biases and norm weights (1-d), as in the HF Trainer and nanoGPT.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=t.lr,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop.has_eval else None
    weights = (
        torch.tensor(loop.class_weights, dtype=torch.float32, device=device) if loop.class_weights else None
    )

    def loss_of(out: Any, inputs: Mapping[str, Any]) -> Any:
        if weights is None:
            return out.loss
        # Class-weighted cross-entropy over the logits (sequence or token classification; -100 is ignored).
        logits = out.logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            inputs["labels"].reshape(-1),
            weight=weights,
            ignore_index=-100,
        )

    def save(tmp: str, *, position: dict[str, Any] | None, keep_optimizer: bool) -> None:
        if t.lora is not None:  # the adapter; `merge: true` merges it at publish time
            save_lora(core, tmp, trainable=trainable, base=loop.base_model)
        else:
            trainable.save(core, tmp)
        Path(tmp, METRICS_FILE).write_text(json.dumps({"epochs": history}, indent=1))
        if keep_optimizer:  # a run that continues needs the optimizer, the schedule and where it was
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **({"position": position} if position is not None else {}),
                },
                Path(tmp, TRAIN_STATE),
            )

    def report(metrics: dict[str, Any], *, position: dict[str, Any] | None, keep_optimizer: bool) -> None:
        """Every rank reports (a collective); rank 0 with the checkpoint."""
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="shardwise-ckpt-") as tmp:
                save(tmp, position=position, keep_optimizer=keep_optimizer)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    def optimizer_step(step: int) -> int:
        torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step + 1

    nodes = 1
    if world > 1:
        import torch.distributed as dist

        every_node: list[Any] = [None] * world
        dist.all_gather_object(every_node, ray.get_runtime_context().get_node_id())
        nodes = len(set(every_node))

    start_epoch = position["epoch"] if position is not None else len(history)
    step = position["step"] if position is not None else (history[-1].get("steps", 0) if history else 0)
    resumed_step = step
    # Steps trained before a failure and lost with it: the furthest step posted, less the checkpoint's.
    redone = max(0, ray.get(board.furthest_step.remote()) - step) if resumed is not None else 0
    for epoch in range(start_epoch, t.epochs):
        epoch_start = time.time()
        model.train()
        # train loss·rows, train rows, eval loss·rows, eval rows, eval hits, eval total
        sums = torch.zeros(6, dtype=torch.float64)
        # A mid-epoch checkpoint: skip the micro-batches its steps consumed (the epoch's order is seeded).
        skip = 0
        if position is not None and position["epoch"] == epoch:
            skip = position["micro"]
            sums[:2] = torch.tensor(position["sums"], dtype=torch.float64)
        micro, pending = 0, False
        for batch in train_shard.iter_batches(
            batch_size=per_worker,
            batch_format="pyarrow",
            local_shuffle_buffer_size=per_worker * 8,
            local_shuffle_seed=t.seed * 1_000_003 + epoch * 1_009 + rank,
        ):
            micro += 1
            if micro <= skip:
                continue
            inputs, _ = encode(batch)
            with autocast:
                out = model(**inputs)
                loss = loss_of(out, inputs)
            (loss / accum).backward()  # gradients of `accum` micro-batches add up to one step's
            sums[0] += loss.item() * batch.num_rows
            sums[1] += batch.num_rows
            pending = micro % accum != 0
            if pending:
                continue
            step = optimizer_step(step)
            if rank == 0:
                shown = {"step": step, "epoch": f"{epoch + 1}/{t.epochs}", "loss": round(loss.item(), 4)}
                if history:  # the previous epoch's eval figures
                    shown.update(shown_eval(history[-1], score_by))
                board.post.remote(shown)
            every = t.checkpoint_every_steps
            if every and step % every == 0 and micro < micro_per_epoch:
                here = {"epoch": epoch, "micro": micro, "step": step, "sums": sums[:2].tolist()}
                report(
                    {"epoch": epoch, "step": step, "score": NO_SCORE, "keep": NO_SCORE},
                    position=here,
                    keep_optimizer=True,
                )
        if pending:  # the epoch's last, partial group
            step = optimizer_step(step)

        pairs: list[tuple[Any, Any]] = []
        if eval_shard is not None:
            core.eval()  # the bare module: DDP's forward would sync buffers, and ranks run unequal batches here
            with torch.inference_mode():
                for batch in eval_shard.iter_batches(batch_size=per_worker * world, batch_format="pyarrow"):
                    mine = [i for i, r in enumerate(batch.column(ROW).to_pylist()) if r % world == rank]
                    if not mine:
                        continue
                    batch = batch.take(mine)
                    inputs, extras = encode(batch)
                    with autocast:
                        out = core(**inputs)
                        if predict is not None:  # seq2seq generates here: bounded, see Seq2SeqTrainable
                            pairs.extend(predict(out, {**inputs, **extras}, model=core))
                    hits, total = eval_counts(out, inputs)
                    sums[2] += out.loss.item() * batch.num_rows
                    sums[3] += batch.num_rows
                    sums[4] += hits
                    sums[5] += total
        if world > 1:
            import torch.distributed as dist

            # gloo reduces CPU tensors; NCCL needs them on the GPU.
            reduced = sums.to(device)
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        rows = max(sums[1].item(), 1)
        eval_rows, eval_total = int(sums[3].item()), sums[5].item()
        record = {
            "epoch": epoch + 1,
            "steps": step,  # optimizer steps so far
            "nodes": nodes,  # distinct nodes the workers ran on
            "train_loss": sums[0].item() / rows,
            "eval_loss": sums[2].item() / eval_rows if eval_shard is not None and eval_rows else None,
            "eval_accuracy": sums[4].item() / eval_total if eval_shard is not None and eval_total else None,
            "epoch_s": time.time() - epoch_start,
        }
        if epoch == start_epoch and resumed is not None:
            record["resumed_at_step"] = resumed_step  # this epoch continued from a checkpoint at that step
            record["steps_redone"] = (
                redone  # steps a failure cost (0 after a driver restart: its board is new)
            )
        if predict is not None and eval_shard is not None:
            record.update(gathered_metrics(trainable, pairs, rank=rank, world=world))
        history.append(record)
        score = epoch_score(record, score_by)
        record["score"] = score
        best = max(range(len(history)), key=lambda i: (history[i]["score"], -i))
        stop_early = (
            t.early_stopping_patience is not None
            and epoch + 1 - history[best]["epoch"] >= t.early_stopping_patience
        )
        record["stopped_early"] = stop_early and epoch + 1 < t.epochs
        # What Ray Train keeps checkpoints by: the score, ties going to the earlier epoch (the one published).
        metrics = {k: v for k, v in record.items() if v is not None} | {"keep": score - 1e-9 * epoch}
        if rank == 0 and record["eval_loss"] is not None:
            board.post.remote(
                {"step": step, "epoch": f"{epoch + 1}/{t.epochs}", **shown_eval(record, score_by)}
            )
        last = epoch + 1 == t.epochs or stop_early
        report(metrics, position=None, keep_optimizer=not last)
        if stop_early:
            break
