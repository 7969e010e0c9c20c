"""Text classification, four ways, on the same model and the same texts, in one process and one run:

    shardwise    run_inference(parse_spec({...})): Parquet in → sharded Ray Data job → Parquet out
    pipeline     transformers.pipeline("text-classification", batch_size=B, truncation=True) over a list
    naive_ray    ray.data.read_parquet → map_batches(class that tokenizes + forwards, batch_size=B,
                 padding="longest", no sorting, one actor) → write_parquet, on the same embedded Ray
    model_only   pre-tokenized, length-sorted, pre-padded batches straight into the model (an upper bound)

    python -m bench.text_classification [--rows 4000] [--batch-size 32] [--repeats 1]
                                        [--model-size minilm|base] [--device cpu|cuda]

Texts are real Rotten Tomatoes reviews concatenated to a word count drawn uniformly from [5, 200] (seeded).
The model is MiniLM-L6 (`infra.assets.fetch_minilm`) with a seeded random 2-label head, saved once so every
system loads the very same weights; `--model-size base` is a random BERT-base (768 hidden, 12 layers) with
MiniLM's tokenizer. Every system runs with the same torch threads and dtype.

Steady-state rates and `startup_s` are defined in bench.harness, which runs the systems.

Prints a table (medians over repeats; ratios against `pipeline`) and writes
bench/results/text_classification-<timestamp>.json. Exits non-zero when shardwise's labels agree with the
pipeline's on fewer than 99% of rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench import harness
from bench.common import build_texts, rt_review_pool, text_stats

__all__ = ["SYSTEMS", "BenchConfig", "main", "prepare_model", "run_benchmark"]

SYSTEMS = ("model_only", "pipeline", "shardwise", "naive_ray")
REFERENCE = "pipeline"
NAME = "text_classification"


@dataclass(frozen=True)
class BenchConfig(harness.HarnessConfig):
    rows: int = 4000
    batch_size: int = 32
    model_size: Literal["minilm", "base"] = "minilm"
    min_words: int = 5
    max_words: int = 200
    # shardwise: rows per shard (input.shard_rows). The replica length-sorts within a shard, so padding
    # waste shrinks as shards grow: on these texts (5–200 words, batch 32) a 250-row shard pads to 1.13× the
    # real tokens, 1,000 rows to 1.035×, 4,000 to 1.01×, unsorted batches (pipeline, naive_ray) to 1.93×.
    # 1,000 keeps that near the floor and still gives the default 4,000 rows four shards, so a steady state
    # (commits after the first) can be measured; shardwise's own default (4,096) would make one shard.
    shard_rows: int = 1000
    warmup_rows: int = 64
    systems: tuple[str, ...] = SYSTEMS


# -------------------------------------------------------------------------------------------------------
# The model and the inputs


def prepare_model(size: Literal["minilm", "base"], dest: Path, *, seed: int = 0) -> Path:
    """Save MiniLM-L6 with a seeded random 2-label head (or a random BERT-base with MiniLM's tokenizer) to
    `dest`, so every system loads identical weights from disk (a fresh `from_pretrained(num_labels=2)` per
    system would draw a different head each time)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    from infra.assets import fetch_minilm

    minilm = fetch_minilm()
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is expected here
    try:
        if size == "minilm":
            model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
        elif size == "base":
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=512,
                num_labels=2,
            )
            model = BertForSequenceClassification(config)
        else:
            raise ValueError(f"unknown model size {size!r}; choose minilm or base")
    finally:
        hf_logging.set_verbosity(verbosity)
    dest.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def _read_labels(uri: Path, n: int) -> tuple[list[str], list[float]]:
    """label/score per input row id from a Parquet output directory (ids 0..n-1)."""
    labels, scores = harness.read_by_id(uri, n, {"label": "", "score": float("nan")})
    return labels, scores


@dataclass(frozen=True)
class _Inputs(harness.BenchInputs):
    input_ids: list[list[int]]  # pre-tokenized (truncated to max_length), for model_only
    max_length: int


# -------------------------------------------------------------------------------------------------------
# The four systems


def _pipeline(cfg: BenchConfig, inp: _Inputs) -> Any:
    from transformers import pipeline

    return pipeline(
        "text-classification",
        model=str(inp.model_dir),
        tokenizer=str(inp.model_dir),
        batch_size=cfg.batch_size,
        truncation=True,
        max_length=inp.max_length,
        device=cfg.device,
        dtype=cfg.torch_dtype(),
    )


class _NaiveClassifier:
    """What a Ray Data user writes first: tokenizer + model in __init__, tokenize + forward per batch."""

    def __init__(self, model_dir: str, *, device: str, dtype: str, threads: int, max_length: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
        )
        self.id2label = self.model.config.id2label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        enc = self.tokenizer(
            list(batch["text"]),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            probs = self.model(**enc).logits.float().softmax(-1).cpu().numpy()  # (B, num_labels)
        best = probs.argmax(-1)
        n = len(best)
        return {
            "id": batch["id"],
            "label": np.array([self.id2label[int(i)] for i in best]),
            "score": probs[np.arange(n), best].astype(np.float64),
            # For the benchmark's steady-state window only (not something a user would add).
            "batch_done_at": np.full(n, time.time()),
        }


class _ModelOnly:
    """Pre-tokenized, length-sorted, pre-padded batches on the device before the clock: only forward is
    timed."""

    def __init__(self, cfg: BenchConfig, inp: _Inputs) -> None:
        self.cfg, self.inp = cfg, inp

    def load(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            self.inp.model_dir, dtype=self.cfg.torch_dtype()
        )
        return model.to(self.cfg.device).eval()

    def prepare(self, model: Any) -> list[Any]:
        import torch
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(self.inp.model_dir).pad_token_id or 0
        input_ids, device = self.inp.input_ids, self.cfg.device
        order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
        batches = []
        for k in range(0, len(order), self.cfg.batch_size):
            idx = order[k : k + self.cfg.batch_size]
            longest = len(input_ids[idx[0]])
            ids = np.full((len(idx), longest), pad_id, dtype=np.int64)  # (B, T)
            mask = np.zeros((len(idx), longest), dtype=np.int64)
            for r, i in enumerate(idx):
                ids[r, : len(input_ids[i])] = input_ids[i]
                mask[r, : len(input_ids[i])] = 1
            batches.append((idx, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)))
        return batches

    def forward(self, model: Any, batch: Any) -> Any:
        _, ids, mask = batch
        return model(input_ids=ids, attention_mask=mask).logits

    def collect(self, model: Any, batches: list[Any], outputs: list[Any]) -> tuple[list[str], list[float]]:
        id2label = model.config.id2label
        n = len(self.inp.input_ids)
        labels: list[str] = [""] * n
        scores: list[float] = [float("nan")] * n
        for (idx, _, _), lg in zip(batches, outputs, strict=True):
            probs = lg.float().softmax(-1).cpu().numpy()
            for r, i in enumerate(idx):
                labels[i] = id2label[int(probs[r].argmax())]
                scores[i] = float(probs[r].max())
        return labels, scores


def _systems(cfg: BenchConfig, inp: _Inputs) -> harness.Systems:
    return harness.Systems(
        inputs=inp,
        job="bench-text-classification",
        stage={
            "name": "classify",
            "task": "text-classification",
            "model": str(inp.model_dir),
            "inputs": {"text": "text"},
            "params": {"truncation": True, "max_length": inp.max_length},
        },
        read=_read_labels,
        shardwise_extra={
            "replica_threads": cfg.threads if cfg.device == "cpu" else None,
            "max_batch_tokens": cfg.max_batch_tokens,
        },
        udf=_NaiveClassifier,
        udf_kwargs={"max_length": inp.max_length},
        in_process={
            "pipeline": harness.InProcess(
                construct=lambda: _pipeline(cfg, inp),
                parse=lambda out: ([o["label"] for o in out], [float(o["score"]) for o in out]),
            )
        },
        model_only=_ModelOnly(cfg, inp),
    )


# -------------------------------------------------------------------------------------------------------
# The run


def run_benchmark(
    cfg: BenchConfig,
    *,
    model_dir: Path,
    texts: Sequence[str],
    work_dir: Path,
    results_dir: Path | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], Path]:
    """Run every system in `cfg.systems` `cfg.repeats` times over `texts`; write the JSON; return
    (payload, path). Uses the embedded Ray cluster already initialized, else starts one and stops it."""
    from transformers import AutoConfig, AutoTokenizer

    from models.text import effective_max_length

    texts = list(texts)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    max_length = effective_max_length(tokenizer, config, None)
    t0 = time.perf_counter()
    input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    tokenize_s = time.perf_counter() - t0
    base = harness.bench_inputs(
        model_dir, texts, column="text", work_dir=work_dir, warmup_rows=cfg.warmup_rows
    )
    inp = _Inputs(**vars(base), input_ids=input_ids, max_length=max_length)
    shape = ("model_type", "hidden_size", "num_hidden_layers", "num_labels")
    return harness.run_benchmark(
        cfg,
        name=NAME,
        systems=SYSTEMS,
        run=_systems(cfg, inp),
        describe={
            "model": {
                "size": cfg.model_size,
                "dir": str(model_dir),
                "max_length": max_length,
                **{k: getattr(config, k, None) for k in shape},
            },
            "data": {**text_stats(texts, [len(x) for x in input_ids]), "tokenize_s": round(tokenize_s, 3)},
        },
        results_dir=results_dir,
        log=log,
        reference=REFERENCE,
    )


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.text_classification", description=__doc__.split("\n\n")[0]
    )
    harness.add_common_args(p, d, SYSTEMS)
    p.add_argument("--model-size", choices=["minilm", "base"], default=d.model_size)
    return harness.config_from_args(p, p.parse_args(argv), d, SYSTEMS)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg = _parse_args(argv)
    hf_logging.disable_progress_bar()  # "Loading weights" bars from every system would bury the log
    texts = build_texts(
        rt_review_pool(), cfg.rows, seed=cfg.seed, min_words=cfg.min_words, max_words=cfg.max_words
    )
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        print(f"preparing model ({cfg.model_size}) and {len(texts)} texts in {work}", file=sys.stderr)
        model_dir = prepare_model(cfg.model_size, work / "model", seed=cfg.seed)
        payload, _ = run_benchmark(
            cfg, model_dir=model_dir, texts=texts, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    return report(payload, cfg)


def report(payload: dict[str, Any], cfg: BenchConfig) -> int:
    """Print the table; 1 when shardwise's labels agree with the pipeline's on too few rows."""
    mo, d = payload["model"], payload["data"]
    harness.print_report(
        payload,
        header=f"text-classification · {mo['size']} ({mo['num_hidden_layers']} layers, hidden {mo['hidden_size']}) "
        f"· {d['rows']} texts, {d['words']['min']}–{d['words']['max']} words (mean {d['words']['mean']}), "
        f"mean {d['tokens']['mean']} tokens",
    )
    return harness.check_agreement(payload, against=REFERENCE, minimum=cfg.min_agreement, items="rows")


if __name__ == "__main__":
    sys.exit(main())
