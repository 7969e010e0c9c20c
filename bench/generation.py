"""Generation and summarization, three ways, on the same model and the same mixed-length texts, in one run:

    shardwise    run_inference(parse_spec({...})): Parquet in → sharded Ray Data job (length-sorted,
                 left-padded micro-batches, KV cache) → Parquet out
    pipeline     text-generation: transformers.pipeline("text-generation", batch_size=B) over the list;
                 summarization (no pipeline in transformers 5): the loop a user writes instead — batches
                 of B in input order, tokenizer(padding=True) → generate → batch_decode
    naive_ray    ray.data.read_parquet → map_batches(class that tokenizes + generates + decodes,
                 batch_size=B, one actor) → write_parquet, on the same embedded Ray

    python -m bench.generation [--task text-generation|summarization] [--rows 48] [--batch-size 8]
                               [--max-new-tokens 16] [--repeats 1]

Models. text-generation: the real SmolLM2-135M-Instruct (`infra.assets.fetch_smollm2`; Llama, 30 layers,
hidden 576), greedy. summarization: a seeded random BART (d_model 256, 3+3 layers, `--num-beams`, default
2) with a byte-level BPE tokenizer trained on the review pool; random weights never emit EOS, so every
summary is max_new_tokens long (a fixed amount of decoding per row). Every system runs greedy/beam search
with the same params, threads and dtype.

Texts: real Rotten Tomatoes reviews concatenated to a word count drawn uniformly from [min_words,
max_words] (seeded). Prompt lengths vary ~10×, which is where length-sorted batching saves prefill work
over batches in input order.

Steady-state rate (startup excluded): shardwise rows after the first committed shard / (last commit −
first commit); pipeline rows / time of the call after a warm-up call; naive_ray rows after the first batch /
(last batch − first batch). Prints a table (medians over repeats; ratios against `pipeline`, and the share
of rows whose text equals the pipeline's) and writes bench/results/<task>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.common import (
    CpuMeter,
    SystemRun,
    agreement,
    build_texts,
    committed_shards,
    format_table,
    machine_info,
    rt_review_pool,
    steady_rate,
    summarize,
    text_stats,
    write_results,
)

__all__ = ["SYSTEMS", "GenBenchConfig", "main", "prepare_model", "run_benchmark"]

SYSTEMS = ("pipeline", "shardwise", "naive_ray")
REFERENCE = "pipeline"
Task = Literal["text-generation", "summarization"]


@dataclass(frozen=True)
class GenBenchConfig:
    task: Task = "text-generation"
    rows: int = 48
    batch_size: int = 8
    max_new_tokens: int = 16
    num_beams: int = 2  # summarization only
    repeats: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    min_words: int = 5
    max_words: int = 200
    # Rows per shard: the replica sorts by length within a shard, so a shard holds several micro-batches;
    # two or more shards give a steady-state window.
    shard_rows: int = 24
    warmup_rows: int = 4
    systems: tuple[str, ...] = SYSTEMS
    ray_worker_niceness: int | None = 0  # as bench.text_classification: Ray's default 15 skews a shared box

    @property
    def name(self) -> str:
        return self.task.replace("-", "_")

    def params(self) -> dict[str, Any]:
        if self.task == "text-generation":
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "return_full_text": False}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}

    def output_field(self) -> str:
        return "generated_text" if self.task == "text-generation" else "summary_text"


# -------------------------------------------------------------------------------------------------------
# Model and inputs


def prepare_model(task: Task, dest: Path, *, texts: Sequence[str], seed: int = 0) -> Path:
    """text-generation: the SmolLM2 folder from the asset cache. summarization: a seeded random BART and a
    byte-level BPE tokenizer trained on `texts`, saved to `dest`."""
    if task == "text-generation":
        from infra.assets import fetch_smollm2

        return fetch_smollm2()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )
    config = BartConfig(
        vocab_size=len(fast),
        d_model=256,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        decoder_start_token_id=fast.eos_token_id,
        forced_eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    BartForConditionalGeneration(config).eval().save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


def _write_inputs(path: Path, texts: Sequence[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())}), path
    )
    return path


def _read_texts(uri: Path, n: int, column: str) -> list[str]:
    import pyarrow.dataset as pads

    table = pads.dataset(
        str(uri), format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."]
    ).to_table(columns=["id", column])
    out = [""] * n
    for i, text in zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True):
        out[int(i)] = text
    return out


@dataclass(frozen=True)
class _Inputs:
    model_dir: Path
    texts: list[str]
    input_path: Path
    warmup_path: Path
    work_dir: Path


# -------------------------------------------------------------------------------------------------------
# Systems


def run_shardwise(
    cfg: GenBenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None
) -> SystemRun:
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    out_uri = inp.work_dir / f"out-shardwise-{tag}"
    stage: dict[str, Any] = {
        "name": "gen",
        "task": cfg.task,
        "model": str(inp.model_dir),
        "inputs": {"text": "text"},
        "params": cfg.params(),
        "batch_size": cfg.batch_size,
        "replicas": 1,
        "dtype": "float32",
        "device": "cpu",
    }
    if cfg.threads != (os.cpu_count() or 1):
        stage["num_cpus"] = float(cfg.threads)
    spec = parse_spec(
        {
            "name": f"bench-{cfg.name}",
            "input": {
                "uri": str(input_path or inp.input_path),
                "id_column": "id",
                "shard_rows": cfg.shard_rows,
            },
            "stages": [stage],
            "output": {"uri": str(out_uri), "mode": "overwrite"},
        }
    )
    started = time.time()
    result = run_inference(spec, overwrite=True, progress=False)
    wall = time.time() - started
    shards = committed_shards(result.output_uri, result.run_id)
    events = sorted((s["committed_at"], s["rows_in"]) for s in shards)
    rows = sum(s["rows_in"] for s in shards)
    steady = steady_rate(events)
    return SystemRun(
        "shardwise",
        rows,
        wall,
        steady if steady is not None else rows / wall,
        _read_texts(out_uri, rows, cfg.output_field()),
        extra={"shards": len(shards), "shard_rows": cfg.shard_rows, "rows_error": result.rows_error},
    )


def run_pipeline(cfg: GenBenchConfig, inp: _Inputs) -> SystemRun:
    texts = inp.texts
    t0 = time.perf_counter()
    generate = _pipeline_callable(cfg, inp.model_dir)
    t1 = time.perf_counter()
    generate(texts[: cfg.warmup_rows])
    t2 = time.perf_counter()
    out = generate(texts)
    t3 = time.perf_counter()
    del generate
    gc.collect()
    return SystemRun(
        "pipeline",
        len(texts),
        t3 - t0,
        len(texts) / (t3 - t2),
        out,
        extra={"construct_s": round(t1 - t0, 3), "warmup_s": round(t2 - t1, 3)},
    )


def _pipeline_callable(cfg: GenBenchConfig, model_dir: Path) -> Any:
    import torch

    torch.set_num_threads(cfg.threads)
    if cfg.task == "text-generation":
        from transformers import pipeline

        pipe = pipeline("text-generation", model=str(model_dir), device="cpu", batch_size=cfg.batch_size)
        params = cfg.params()
        return lambda texts: [o[0]["generated_text"] for o in pipe(list(texts), **params)]

    # summarization: what a user writes without the 4.x pipeline.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    params = cfg.params()

    def run(texts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(texts), cfg.batch_size):
            enc = tok(list(texts[i : i + cfg.batch_size]), padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                ids = model.generate(**enc, **params)
            out.extend(tok.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        return out

    return run


class _NaiveGenerator:
    """What a Ray Data user writes first: tokenizer + model in __init__; tokenize, generate, decode per batch."""

    def __init__(self, model_dir: str, *, task: str, params: dict[str, Any], threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.task = task
        self.params = dict(params)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if task == "text-generation":
            self.tokenizer.padding_side = "left"
            self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            self.params.pop("return_full_text", None)
        else:
            self.model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(list(batch["text"]), padding=True, truncation=True, return_tensors="pt")
        with self.torch.inference_mode():
            ids = self.model.generate(**enc, **self.params)
        if self.task == "text-generation":
            ids = ids[:, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        n = len(texts)
        return {
            "id": batch["id"],
            "text_out": np.array(texts, dtype=object),
            "batch_done_at": np.full(n, time.time()),
        }


def run_naive_ray(
    cfg: GenBenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None
) -> SystemRun:
    import pyarrow.dataset as pads
    import ray

    out_dir = inp.work_dir / f"out-naive-{tag}"
    started = time.time()
    ds = ray.data.read_parquet(str(input_path or inp.input_path))
    ds = ds.map_batches(
        _NaiveGenerator,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_args=(str(inp.model_dir),),
        fn_constructor_kwargs={"task": cfg.task, "params": cfg.params(), "threads": cfg.threads},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    ds.write_parquet(str(out_dir))
    wall = time.time() - started
    table = pads.dataset(str(out_dir), format="parquet").to_table(columns=["id", "batch_done_at"])
    done, counts = np.unique(table.column("batch_done_at").to_numpy(), return_counts=True)
    rows = table.num_rows
    steady = steady_rate(list(zip(done.tolist(), counts.tolist(), strict=True)))
    return SystemRun(
        "naive_ray",
        rows,
        wall,
        steady if steady is not None else rows / wall,
        _read_texts(out_dir, rows, "text_out"),
    )


def _run_system(system: str, cfg: GenBenchConfig, inp: _Inputs, *, tag: str) -> SystemRun:
    if system == "shardwise":
        return run_shardwise(cfg, inp, tag=tag)
    if system == "naive_ray":
        return run_naive_ray(cfg, inp, tag=tag)
    return run_pipeline(cfg, inp)


def run_benchmark(
    cfg: GenBenchConfig,
    *,
    model_dir: Path,
    texts: Sequence[str],
    work_dir: Path,
    results_dir: Path | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], Path]:
    """Run every system in `cfg.systems` `cfg.repeats` times over `texts`; write the JSON; return
    (payload, path). Uses the embedded Ray cluster already initialized, else starts one and stops it."""
    import ray
    import torch
    from transformers import AutoTokenizer

    from pipeline.execute import init_ray

    torch.set_num_threads(cfg.threads)
    texts = list(texts)
    lengths = [len(x) for x in AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]]
    inp = _Inputs(
        model_dir=Path(model_dir),
        texts=texts,
        input_path=_write_inputs(work_dir / "input" / "texts.parquet", texts),
        warmup_path=_write_inputs(work_dir / "warmup" / "texts.parquet", texts[: max(1, cfg.warmup_rows)]),
        work_dir=work_dir,
    )
    uses_ray = any(s in cfg.systems for s in ("shardwise", "naive_ray"))
    own_ray = uses_ray and not ray.is_initialized()
    if own_ray:
        saved = os.environ.get("RAY_worker_niceness")
        if cfg.ray_worker_niceness is not None:
            os.environ["RAY_worker_niceness"] = str(cfg.ray_worker_niceness)
        try:
            init_ray(address=None, num_cpus=max(4, os.cpu_count() or 1))
        finally:
            if saved is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = saved
    machine = machine_info(device="cpu", torch_threads=cfg.threads)
    runs: list[SystemRun] = []
    try:
        if cfg.warmup_rows:
            if "shardwise" in cfg.systems:
                log("warm-up: shardwise")
                run_shardwise(cfg, inp, tag="warmup", input_path=inp.warmup_path)
            if "naive_ray" in cfg.systems:
                log("warm-up: naive_ray")
                run_naive_ray(cfg, inp, tag="warmup", input_path=inp.warmup_path)
        for rep in range(cfg.repeats):
            for system in SYSTEMS:
                if system not in cfg.systems:
                    continue
                load = os.getloadavg()[0]
                with CpuMeter() as meter:
                    run = _run_system(system, cfg, inp, tag=str(rep))
                run.cpu_s = meter.cpu_s
                run.load_1m = load
                log(
                    f"repeat {rep + 1}/{cfg.repeats} {system:<11} {run.rows_per_s:8.2f} rows/s  steady "
                    f"{run.steady_rows_per_s:8.2f} rows/s  startup {run.startup_s:6.2f} s  "
                    f"cpu {run.cpu_s or 0:6.1f} s  load {load:.1f}"
                )
                runs.append(run)
    finally:
        if own_ray:
            ray.shutdown()

    last = {r.name: r for r in runs}
    reference = REFERENCE if REFERENCE in last else next(iter(last))
    agree = {name: round(agreement(r.labels, last[reference].labels), 5) for name, r in last.items()}
    payload: dict[str, Any] = {
        "benchmark": cfg.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(cfg),
        "params": cfg.params(),
        "machine": machine,
        "model": {"dir": str(model_dir), **_model_shape(model_dir)},
        "data": text_stats(texts, lengths),
        "reference": reference,
        "systems": summarize(runs, reference=reference),
        "text_agreement_vs_reference": agree,
    }
    path = write_results(payload, name=cfg.name, out_dir=results_dir)
    payload["results_path"] = str(path)
    return payload, path


def _model_shape(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "d_model", "encoder_layers", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> GenBenchConfig:
    d = GenBenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["text-generation", "summarization"], default=d.task)
    for name in (
        "rows",
        "batch_size",
        "max_new_tokens",
        "num_beams",
        "repeats",
        "threads",
        "seed",
        "min_words",
        "max_words",
        "shard_rows",
        "warmup_rows",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of %(default)s")
    a = p.parse_args(argv)
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    bad = sorted(set(systems) - set(SYSTEMS))
    if bad:
        p.error(f"unknown systems {bad}; available: {', '.join(SYSTEMS)}")
    for name in ("rows", "batch_size", "max_new_tokens", "num_beams", "repeats", "threads", "shard_rows"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return replace(
        d,
        task=a.task,
        rows=a.rows,
        batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        num_beams=a.num_beams,
        repeats=a.repeats,
        threads=a.threads,
        seed=a.seed,
        min_words=a.min_words,
        max_words=a.max_words,
        shard_rows=a.shard_rows,
        warmup_rows=a.warmup_rows,
        systems=systems,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg = _parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    pool = rt_review_pool()
    texts = build_texts(pool, cfg.rows, seed=cfg.seed, min_words=cfg.min_words, max_words=cfg.max_words)
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        model_dir = prepare_model(cfg.task, work / "model", texts=pool[:4000], seed=cfg.seed)
        print(f"{cfg.task}: model {model_dir}, {len(texts)} texts, work dir {work}", file=sys.stderr)
        payload, path = run_benchmark(
            cfg, model_dir=model_dir, texts=texts, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    m, d = payload["machine"], payload["data"]
    print(
        f"\n{cfg.task} · {payload['model']['model_type']} · {d['rows']} texts, {d['words']['min']}–"
        f"{d['words']['max']} words (mean {d['words']['mean']}), tokens {d['tokens']['min']}–{d['tokens']['max']} "
        f"(mean {d['tokens']['mean']}) · {payload['params']} · batch {cfg.batch_size} · {m['cpu_count']} cores, "
        f"torch threads {m['torch_threads']} · medians of {cfg.repeats} repeat(s)\n"
    )
    print(
        format_table(
            payload["systems"],
            reference=payload["reference"],
            agreement_vs_reference=payload["text_agreement_vs_reference"],
        )
    )
    print("(agree: share of rows whose text equals the pipeline's)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
