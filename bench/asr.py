"""Speech recognition from FLAC bytes, five ways, on the same Wav2Vec2 CTC model and the same clips, in one run:

    shardwise     run_inference(parse_spec({...})): Parquet of FLAC bytes → sharded Ray Data job → Parquet
                  (decode + feature extractor in CPU tasks; the replica length-sorts, pads with attention
                  masks, forwards; decoding in CPU tasks)
    pipeline      transformers.pipeline("automatic-speech-recognition", batch_size=B) over the clips, each
                  decoded by soundfile inside the timed call (a generator: the pipeline's bytes path needs
                  ffmpeg, which this machine does not have)
    pipeline_bs1  the same with batch_size=1 (no padding at all: the other natural setting on a CPU)
    naive_ray     ray.data.read_parquet → map_batches(class that decodes + runs the feature extractor with
                  padding + forwards + batch_decodes, batch_size=B, one actor) → write_parquet
    model_only    the extractor's features prepared beforehand, length-sorted, padded, straight into the model

    python -m bench.asr [--rows 96] [--batch-size 8] [--repeats 1] [--model mini|small|base]
                        [--device cpu|cuda] [--batching exact|pad] [--systems ...,pipeline_bs1]

Clips: real speech, the 5 LibriVox utterances of `pocketsphinx-testdata` (`infra.assets.fetch_librivox`,
24.7 s in all) joined end to end and cut at seeded random offsets into clips of 1–20 s (uniform), FLAC
16-bit 16 kHz. Models (random init, saved once, so every system loads the same weights; 32-character CTC
vocabulary; the wide random head of the tests, so transcripts are long gibberish that differs per clip):
    mini   conv 7 × 128 channels (wav2vec2 kernels/strides: 320 samples per frame), hidden 128, 4 layers,
           4 heads, FFN 512, "lv60" flavour (layer norm, attention masks)      — 1.2 M parameters, default
    small  conv 7 × 256, hidden 256, 4 layers, 4 heads, FFN 1024, lv60 flavour   — 4.8 M
    base   wav2vec2-base: conv 7 × 512, hidden 768, 12 layers, 12 heads, FFN 3072, group norm (trained
           without masks: run shardwise with --batching pad on a GPU)          — 94 M
Where shardwise gains on a CPU: mixed durations. Batches of random clips pad every clip to the longest of
its batch (the pipeline and naive Ray Data do that); shardwise sorts each shard's clips by duration first.

Texts: the batched pipeline (and naive_ray) decode the padding frames of shorter clips too, which with
random weights adds characters at their ends (with a trained model those frames are blanks); shardwise
trims each clip to its own frames, as the unbatched pipeline does. So shardwise agrees exactly with
pipeline_bs1 and model_only, and the table's `agree` column (vs `pipeline`) counts equal texts only.

Steady-state rates and `startup_s` are defined as in bench.text_classification (bench.common); audio
seconds per second are the rows/s times the mean clip duration. Prints the table (ratios against
`pipeline`) and writes bench/results/asr-<time>.json. Exits non-zero when shardwise's texts agree with
pipeline_bs1's (or, without it, model_only's) on fewer than 99% of clips.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.common import (
    CpuMeter,
    SystemRun,
    agreement,
    committed_shards,
    format_table,
    machine_info,
    steady_rate,
    summarize,
    write_results,
)

__all__ = ["MODELS", "SYSTEMS", "BenchConfig", "build_clips", "main", "prepare_model", "run_benchmark"]

SYSTEMS = ("model_only", "pipeline", "pipeline_bs1", "shardwise", "naive_ray")
REFERENCE = "pipeline"
NAME = "asr"
TASK = "automatic-speech-recognition"
RATE = 16_000
# name → (conv channels, hidden, layers, heads, FFN, layer-norm flavour)
MODELS = {
    "mini": (128, 128, 4, 4, 512, True),
    "small": (256, 256, 4, 4, 1024, True),
    "base": (512, 768, 12, 12, 3072, False),
}
_CHARS = list("abcdefghijklmnopqrstuvwxyz'")


@dataclass(frozen=True)
class BenchConfig:
    rows: int = 96
    batch_size: int = 8
    repeats: int = 1
    model: Literal["mini", "small", "base"] = "mini"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: fp32 on CPU, bf16 on CUDA
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    min_s: float = 1.0
    max_s: float = 20.0
    # 24 clips (~4.4 min of audio) per shard: four shards for the default 96, so a steady state shows, and
    # enough clips per shard for the duration sort to leave little padding.
    shard_rows: int = 24
    # shardwise stage max_batch_tokens (samples per micro-batch); None: batch_size only.
    max_batch_tokens: int | None = None
    # shardwise `params.batching`: exact (masked padding where the model takes masks) | pad.
    batching: Literal["exact", "pad"] = "exact"
    warmup_rows: int = 8
    # pipeline_bs1 is off by default (it is the slowest: a run takes ~1.6× longer with it); add it with
    # --systems to check that batch 1 is not the better pipeline setting on a machine.
    systems: tuple[str, ...] = ("model_only", "pipeline", "shardwise", "naive_ray")
    min_agreement: float = 0.99
    # As in bench.text_classification: Ray workers at the niceness of the in-process systems.
    ray_worker_niceness: int | None = 0

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if self.device == "cuda" else "float32"


# -------------------------------------------------------------------------------------------------------
# The model and the inputs


def prepare_model(name: str, dest: Path, *, seed: int = 0) -> Path:
    """A random Wav2Vec2ForCTC of `MODELS[name]` + feature extractor + character CTC tokenizer in `dest`."""
    import json

    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    conv, hidden, layers, heads, ffn, layer_norm = MODELS[name]
    dest.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|"] + _CHARS)}
    (dest / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(dest / "vocab.json"), word_delimiter_token="|")
    tokenizer.save_pretrained(dest)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=layer_norm,
    ).save_pretrained(dest)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        pad_token_id=0,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        conv_dim=(conv,) * 7,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
        conv_bias=layer_norm,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # a wide random head: long, clip-specific gibberish instead of all blanks
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def build_clips(n: int, *, seed: int = 0, min_s: float = 1.0, max_s: float = 20.0) -> list[bytes]:
    """`n` FLAC clips of real speech, durations uniform in [min_s, max_s] (see the module docstring)."""
    import soundfile as sf

    from infra.assets import fetch_librivox

    speech = np.concatenate([sf.read(path, dtype="float32")[0] for path, _ in fetch_librivox()])
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        length = int(rng.uniform(min_s, max_s) * RATE)
        start = int(rng.integers(0, len(speech)))
        samples = np.take(speech, np.arange(start, start + length), mode="wrap")  # wraps past the end
        buf = io.BytesIO()
        sf.write(buf, samples, RATE, format="FLAC", subtype="PCM_16")
        clips.append(buf.getvalue())
    return clips


def _decode(data: bytes) -> np.ndarray:
    import soundfile as sf

    samples, _ = sf.read(io.BytesIO(data), dtype="float32")
    return samples


@dataclass(frozen=True)
class _Inputs:
    model_dir: Path
    clips: list[bytes]
    durations: list[float]
    input_path: Path
    warmup_path: Path
    work_dir: Path


def _write_inputs(path: Path, clips: Sequence[bytes]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": pa.array(range(len(clips)), pa.int64()), "audio": pa.array(clips, pa.binary())}), path
    )
    return path


def _read_texts(uri: Path, n: int) -> list[str]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(uri), format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."])
    table = table.to_table(columns=["id", "text"])
    texts = [""] * n
    for i, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True):
        texts[int(i)] = text
    return texts


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------------
# The systems


def run_shardwise(cfg: BenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None) -> SystemRun:
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    out_uri = inp.work_dir / f"out-shardwise-{tag}"
    stage: dict[str, Any] = {
        "name": "asr",
        "task": TASK,
        "model": str(inp.model_dir),
        "inputs": {"audio": "audio"},
        "params": {"batching": cfg.batching},
        "batch_size": cfg.batch_size,
        "max_batch_tokens": cfg.max_batch_tokens,
        "replicas": 1,
        "dtype": cfg.resolved_dtype(),
        "device": cfg.device,
        "num_gpus": 1 if cfg.device == "cuda" else 0,
    }
    if cfg.device == "cpu" and cfg.threads != (os.cpu_count() or 1):
        stage["num_cpus"] = float(cfg.threads)
    spec = parse_spec(
        {
            "name": "bench-asr",
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
        _read_texts(out_uri, rows),
        extra={"shards": len(shards), "shard_rows": cfg.shard_rows, "rows_error": result.rows_error},
    )


def run_pipeline(cfg: BenchConfig, inp: _Inputs, *, batch_size: int, name: str) -> SystemRun:
    import torch
    from transformers import pipeline

    def decoded(clips: Sequence[bytes]) -> Iterator[np.ndarray]:
        return (_decode(b) for b in clips)

    t0 = time.perf_counter()
    pipe = pipeline(
        TASK,
        model=str(inp.model_dir),
        batch_size=batch_size,
        device=cfg.device,
        dtype=getattr(torch, cfg.resolved_dtype()),
    )
    t1 = time.perf_counter()
    if cfg.warmup_rows:
        list(pipe(decoded(inp.clips[: cfg.warmup_rows])))
    _sync(cfg.device)
    t2 = time.perf_counter()
    out = [o["text"] for o in pipe(decoded(inp.clips))]
    _sync(cfg.device)
    t3 = time.perf_counter()
    del pipe
    gc.collect()
    n = len(inp.clips)
    return SystemRun(
        name,
        n,
        t3 - t0,
        n / (t3 - t2),
        out,
        extra={"batch_size": batch_size, "construct_s": round(t1 - t0, 3), "warmup_s": round(t2 - t1, 3)},
    )


class _NaiveTranscriber:
    """What a Ray Data user writes first: processor + model in __init__; decode, extract with padding,
    forward, argmax and batch_decode per batch."""

    def __init__(self, model_dir: str, *, device: str, dtype: str, threads: int) -> None:
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch, self.device, self.dtype = torch, device, getattr(torch, dtype)
        self.fe = AutoFeatureExtractor.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCTC.from_pretrained(model_dir, dtype=self.dtype).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audio = [_decode(b) for b in batch["audio"]]
        inputs = self.fe(
            audio, sampling_rate=RATE, padding=True, return_attention_mask=True, return_tensors="pt"
        )
        with self.torch.inference_mode():
            logits = self.model(
                input_values=inputs["input_values"].to(self.device, self.dtype),
                attention_mask=inputs["attention_mask"].to(self.device),
            ).logits
        texts = self.tokenizer.batch_decode(logits.argmax(-1).cpu().numpy())
        n = len(texts)
        return {
            "id": batch["id"],
            "text": np.array(texts, dtype=object),
            "batch_done_at": np.full(n, time.time()),  # for the steady-state window only
        }


def run_naive_ray(cfg: BenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None) -> SystemRun:
    import pyarrow.dataset as pads
    import ray

    out_dir = inp.work_dir / f"out-naive-{tag}"
    started = time.time()
    ds = ray.data.read_parquet(str(input_path or inp.input_path))
    ds = ds.map_batches(
        _NaiveTranscriber,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_args=(str(inp.model_dir),),
        fn_constructor_kwargs={"device": cfg.device, "dtype": cfg.resolved_dtype(), "threads": cfg.threads},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=0 if cfg.device == "cuda" else 1,
        num_gpus=1 if cfg.device == "cuda" else 0,
    )
    ds.write_parquet(str(out_dir))
    wall = time.time() - started
    table = pads.dataset(str(out_dir), format="parquet").to_table(columns=["id", "batch_done_at"])
    done, counts = np.unique(table.column("batch_done_at").to_numpy(), return_counts=True)
    rows = table.num_rows
    steady = steady_rate(list(zip(done.tolist(), counts.tolist(), strict=True)))
    return SystemRun(
        "naive_ray", rows, wall, steady if steady is not None else rows / wall, _read_texts(out_dir, rows)
    )


def run_model_only(cfg: BenchConfig, inp: _Inputs) -> SystemRun:
    """Decoded + extracted before the clock, sorted by duration, padded with masks: forward + argmax timed;
    each clip's ids trimmed to its own frames and decoded after the clock."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

    dtype = getattr(torch, cfg.resolved_dtype())
    t0 = time.perf_counter()
    model = AutoModelForCTC.from_pretrained(inp.model_dir, dtype=dtype).to(cfg.device).eval()
    t1 = time.perf_counter()
    fe = AutoFeatureExtractor.from_pretrained(inp.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(inp.model_dir)
    features = [fe(_decode(b), sampling_rate=RATE)["input_values"][0] for b in inp.clips]
    order = sorted(range(len(features)), key=lambda i: -len(features[i]))
    batches = []
    for k in range(0, len(order), cfg.batch_size):
        idx = order[k : k + cfg.batch_size]
        lengths = torch.tensor([len(features[i]) for i in idx])
        x = torch.zeros(len(idx), int(lengths.max()))  # (B, T)
        mask = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : lengths[r]] = torch.from_numpy(features[i])
            mask[r, : lengths[r]] = 1
        batches.append((idx, lengths, x.to(cfg.device, dtype), mask.to(cfg.device)))
    with torch.inference_mode():
        t2 = time.perf_counter()
        model(input_values=batches[-1][2], attention_mask=batches[-1][3])  # warm-up: the shortest batch
        _sync(cfg.device)
        t3 = time.perf_counter()
        ids = [model(input_values=x, attention_mask=m).logits.argmax(-1) for _, _, x, m in batches]
        _sync(cfg.device)
        t4 = time.perf_counter()
    texts = [""] * len(order)
    for (idx, lengths, _, _), batch_ids in zip(batches, ids, strict=True):
        frames = model._get_feat_extract_output_lengths(lengths).tolist()
        for r, i in enumerate(idx):
            texts[i] = tokenizer.decode(batch_ids[r, : frames[r]].cpu().numpy())
    del model
    gc.collect()
    n = len(order)
    return SystemRun(
        "model_only",
        n,
        (t1 - t0) + (t4 - t2),
        n / (t4 - t3),
        texts,
        extra={"load_s": round(t1 - t0, 3), "preprocess_s (untimed)": round(t2 - t1, 3)},
    )


# -------------------------------------------------------------------------------------------------------
# The run


def _run_system(system: str, cfg: BenchConfig, inp: _Inputs, *, tag: str) -> SystemRun:
    if system == "shardwise":
        return run_shardwise(cfg, inp, tag=tag)
    if system == "naive_ray":
        return run_naive_ray(cfg, inp, tag=tag)
    if system == "pipeline":
        return run_pipeline(cfg, inp, batch_size=cfg.batch_size, name="pipeline")
    if system == "pipeline_bs1":
        return run_pipeline(cfg, inp, batch_size=1, name="pipeline_bs1")
    return run_model_only(cfg, inp)


def run_benchmark(
    cfg: BenchConfig,
    *,
    model_dir: Path,
    clips: Sequence[bytes],
    work_dir: Path,
    results_dir: Path | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], Path]:
    """Run every system in `cfg.systems` `cfg.repeats` times; write the JSON; return (payload, path)."""
    import ray
    import torch

    from pipeline.execute import init_ray

    unknown = sorted(set(cfg.systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}; available: {list(SYSTEMS)}")
    torch.set_num_threads(cfg.threads)
    clips = list(clips)
    durations = [len(_decode(b)) / RATE for b in clips]
    inp = _Inputs(
        model_dir=Path(model_dir),
        clips=clips,
        durations=durations,
        input_path=_write_inputs(work_dir / "input" / "clips.parquet", clips),
        warmup_path=_write_inputs(work_dir / "warmup" / "clips.parquet", clips[: max(1, cfg.warmup_rows)]),
        work_dir=work_dir,
    )
    uses_ray = any(s in cfg.systems for s in ("shardwise", "naive_ray"))
    own_ray = uses_ray and not ray.is_initialized()
    if own_ray:
        saved = os.environ.get("RAY_worker_niceness")
        if cfg.ray_worker_niceness is not None:
            os.environ["RAY_worker_niceness"] = str(cfg.ray_worker_niceness)
        try:
            # One replica + one read task + one commit task always fit (as pipeline.execute sizes it).
            init_ray(
                address=None,
                num_cpus=max(os.cpu_count() or 1, 3),
                num_gpus=1 if cfg.device == "cuda" else None,
            )
        finally:
            if saved is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = saved
    machine = machine_info(device=cfg.device, torch_threads=cfg.threads)
    mean_s = float(np.mean(durations))
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
                run.cpu_s, run.load_1m = meter.cpu_s, load
                run.extra["audio_s_per_s"] = round(run.rows_per_s * mean_s, 2)
                run.extra["steady_audio_s_per_s"] = round(run.steady_rows_per_s * mean_s, 2)
                log(
                    f"repeat {rep + 1}/{cfg.repeats} {system:<12} {run.rows_per_s:7.2f} clips/s  steady "
                    f"{run.steady_rows_per_s:7.2f} clips/s ({run.steady_rows_per_s * mean_s:7.1f} audio-s/s)  "
                    f"startup {run.startup_s:6.2f} s  cpu {run.cpu_s or 0:6.1f} s  load {load:.1f}"
                )
                runs.append(run)
    finally:
        if own_ray:
            ray.shutdown()

    last = {r.name: r for r in runs}
    reference = REFERENCE if REFERENCE in last else next(iter(last))
    agree = {name: round(agreement(r.labels, last[reference].labels), 5) for name, r in last.items()}
    pairwise = {
        f"{a}_vs_{b}": round(agreement(last[a].labels, last[b].labels), 5)
        for i, a in enumerate(last)
        for b in list(last)[i + 1 :]
    }
    conv, hidden, layers, heads, ffn, layer_norm = MODELS[cfg.model]
    from transformers import AutoModelForCTC

    params = sum(p.numel() for p in AutoModelForCTC.from_pretrained(model_dir).parameters())
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {**asdict(cfg), "dtype": cfg.resolved_dtype()},
        "machine": machine,
        "model": {
            "name": cfg.model,
            "conv_channels": conv,
            "hidden": hidden,
            "layers": layers,
            "heads": heads,
            "ffn": ffn,
            "feat_extract_norm": "layer" if layer_norm else "group",
            "parameters_m": round(params / 1e6, 2),
        },
        "data": {
            "clips": len(clips),
            "audio_s": round(sum(durations), 1),
            "duration_s": [round(min(durations), 2), round(mean_s, 2), round(max(durations), 2)],
            "flac_kb_mean": round(float(np.mean([len(b) for b in clips])) / 1024, 1),
        },
        "reference": reference,
        "systems": summarize(runs, reference=reference),
        "agreement_vs_reference": agree,
        "agreement_pairwise": pairwise,
    }
    path = write_results(payload, name=NAME, out_dir=results_dir)
    payload["results_path"] = str(path)
    return payload, path


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.asr", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=d.rows, help="clips (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--model", choices=list(MODELS), default=d.model)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--min-s", type=float, default=d.min_s)
    p.add_argument("--max-s", type=float, default=d.max_s)
    p.add_argument("--shard-rows", type=int, default=d.shard_rows)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="shardwise: samples per micro-batch")
    p.add_argument("--batching", choices=["exact", "pad"], default=d.batching)
    p.add_argument("--warmup-rows", type=int, default=d.warmup_rows)
    p.add_argument("--systems", default=",".join(d.systems), help=f"comma-separated subset of {SYSTEMS}")
    p.add_argument("--min-agreement", type=float, default=d.min_agreement)
    p.add_argument("--ray-worker-niceness", type=int, default=d.ray_worker_niceness)
    a = p.parse_args(argv)
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    bad = sorted(set(systems) - set(SYSTEMS))
    if bad:
        p.error(f"unknown systems {bad}; available: {', '.join(SYSTEMS)}")
    return replace(
        d,
        rows=a.rows,
        batch_size=a.batch_size,
        repeats=a.repeats,
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        threads=a.threads,
        seed=a.seed,
        min_s=a.min_s,
        max_s=a.max_s,
        shard_rows=a.shard_rows,
        max_batch_tokens=a.max_batch_tokens,
        batching=a.batching,
        warmup_rows=a.warmup_rows,
        systems=systems,
        min_agreement=a.min_agreement,
        ray_worker_niceness=a.ray_worker_niceness,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg = _parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-asr-") as tmp:
        work = Path(tmp)
        print(f"preparing {cfg.model} and {cfg.rows} FLAC clips in {work}", file=sys.stderr)
        model_dir = prepare_model(cfg.model, work / "model", seed=cfg.seed)
        clips = build_clips(cfg.rows, seed=cfg.seed, min_s=cfg.min_s, max_s=cfg.max_s)
        payload, path = run_benchmark(
            cfg, model_dir=model_dir, clips=clips, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    m, d, mo = payload["machine"], payload["data"], payload["model"]
    print(
        f"\nautomatic-speech-recognition · {mo['name']} Wav2Vec2 CTC (conv 7×{mo['conv_channels']}, hidden "
        f"{mo['hidden']}, {mo['layers']} layers, {mo['feat_extract_norm']} norm, {mo['parameters_m']} M params) · "
        f"{d['clips']} FLAC clips, {d['duration_s'][0]}–{d['duration_s'][2]} s (mean {d['duration_s'][1]} s, "
        f"{d['audio_s']} s in all) · batch {cfg.batch_size} · {m['device']}, {m['cpu_count']} cores, torch "
        f"threads {m['torch_threads']} · medians of {cfg.repeats} repeat(s)\n"
    )
    print(
        format_table(
            payload["systems"],
            reference=payload["reference"],
            agreement_vs_reference=payload["agreement_vs_reference"],
        )
    )
    for name, fig in payload["systems"].items():
        audio = [r["extra"].get("steady_audio_s_per_s") for r in fig["repeats"]]
        print(f"  {name:<12} steady audio-s/s (per repeat): {audio}")
    print(f"texts, pairwise agreement: {payload['agreement_pairwise']}")
    print(f"results: {path}")
    exact = "pipeline_bs1" if "pipeline_bs1" in cfg.systems else "model_only"
    key = f"{exact}_vs_shardwise" if f"{exact}_vs_shardwise" in payload["agreement_pairwise"] else None
    got = payload["agreement_pairwise"].get(key) if key else None
    if got is not None and got < cfg.min_agreement:
        print(f"FAILED: shardwise's texts agree with {exact}'s on {got:.2%} of clips", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
