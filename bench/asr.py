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
import io
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench import harness
from bench.common import SystemRun

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
    "nano": (32, 32, 1, 2, 64, True),  # for smoke tests
}
_CHARS = list("abcdefghijklmnopqrstuvwxyz'")


@dataclass(frozen=True)
class BenchConfig(harness.HarnessConfig):
    rows: int = 96
    batch_size: int = 8
    model: Literal["mini", "small", "base", "nano"] = "mini"
    min_s: float = 1.0
    max_s: float = 20.0
    # 24 clips (~4.4 min of audio) per shard: four shards for the default 96, so a steady state shows, and
    # enough clips per shard for the duration sort to leave little padding.
    shard_rows: int = 24
    # shardwise `params.batching`: exact (masked padding where the model takes masks) | pad.
    batching: Literal["exact", "pad"] = "exact"
    warmup_rows: int = 8
    # pipeline_bs1 is off by default (it is the slowest: a run takes ~1.6× longer with it); add it with
    # --systems to check that batch 1 is not the better pipeline setting on a machine.
    systems: tuple[str, ...] = ("model_only", "pipeline", "shardwise", "naive_ray")


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


def build_clips(
    n: int, *, seed: int = 0, min_s: float = 1.0, max_s: float = 20.0, speech: np.ndarray | None = None
) -> list[bytes]:
    """`n` FLAC clips cut from `speech` (float32 samples at 16 kHz; default: `librivox_speech()`), durations
    uniform in [min_s, max_s] (see the module docstring)."""
    import soundfile as sf

    if speech is None:
        speech = librivox_speech()
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


def librivox_speech() -> np.ndarray:
    """The LibriVox utterances of `infra.assets.fetch_librivox` joined end to end (float32, 16 kHz)."""
    import soundfile as sf

    from infra.assets import fetch_librivox

    return np.concatenate([sf.read(path, dtype="float32")[0] for path, _ in fetch_librivox()])


def _decode(data: bytes) -> np.ndarray:
    import soundfile as sf

    samples, _ = sf.read(io.BytesIO(data), dtype="float32")
    return samples


def _read_texts(uri: Path, n: int) -> tuple[list[str], list[float]]:
    (texts,) = harness.read_by_id(uri, n, {"text": ""})
    return texts, []


# -------------------------------------------------------------------------------------------------------
# The systems


def _pipeline(cfg: BenchConfig, inp: harness.BenchInputs, *, batch_size: int) -> Any:
    from transformers import pipeline

    pipe = pipeline(
        TASK, model=str(inp.model_dir), batch_size=batch_size, device=cfg.device, dtype=cfg.torch_dtype()
    )

    def decoded(clips: Sequence[bytes]) -> Iterator[np.ndarray]:
        return (_decode(b) for b in clips)

    return lambda clips: [o["text"] for o in pipe(decoded(clips))]


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


class _ModelOnly:
    """Decoded + extracted before the clock, sorted by duration, padded with masks: forward + argmax timed;
    each clip's ids trimmed to its own frames and decoded after the clock."""

    def __init__(self, cfg: BenchConfig, inp: harness.BenchInputs) -> None:
        self.cfg, self.inp = cfg, inp

    def load(self) -> Any:
        from transformers import AutoModelForCTC

        model = AutoModelForCTC.from_pretrained(self.inp.model_dir, dtype=self.cfg.torch_dtype())
        return model.to(self.cfg.device).eval()

    def prepare(self, model: Any) -> list[Any]:
        import torch
        from transformers import AutoFeatureExtractor

        fe = AutoFeatureExtractor.from_pretrained(self.inp.model_dir)
        features = [fe(_decode(b), sampling_rate=RATE)["input_values"][0] for b in self.inp.items]
        order = sorted(range(len(features)), key=lambda i: -len(features[i]))
        batches = []
        for k in range(0, len(order), self.cfg.batch_size):
            idx = order[k : k + self.cfg.batch_size]
            lengths = torch.tensor([len(features[i]) for i in idx])
            x = torch.zeros(len(idx), int(lengths.max()))  # (B, T)
            mask = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : lengths[r]] = torch.from_numpy(features[i])
                mask[r, : lengths[r]] = 1
            batches.append(
                (idx, lengths, x.to(self.cfg.device, self.cfg.torch_dtype()), mask.to(self.cfg.device))
            )
        return batches

    def forward(self, model: Any, batch: Any) -> Any:
        _, _, x, mask = batch
        return model(input_values=x, attention_mask=mask).logits.argmax(-1)

    def collect(self, model: Any, batches: list[Any], outputs: list[Any]) -> tuple[list[str], list[float]]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.inp.model_dir)
        texts = [""] * len(self.inp.items)
        for (idx, lengths, _, _), batch_ids in zip(batches, outputs, strict=True):
            frames = model._get_feat_extract_output_lengths(lengths).tolist()
            for r, i in enumerate(idx):
                texts[i] = tokenizer.decode(batch_ids[r, : frames[r]].cpu().numpy())
        return texts, []


def _systems(cfg: BenchConfig, inp: harness.BenchInputs) -> harness.Systems:
    def pipeline(batch_size: int) -> harness.InProcess:
        return harness.InProcess(
            construct=lambda: _pipeline(cfg, inp, batch_size=batch_size),
            parse=lambda out: (list(out), []),
            extra={"batch_size": batch_size},
        )

    return harness.Systems(
        inputs=inp,
        job="bench-asr",
        stage={
            "name": "asr",
            "task": TASK,
            "model": str(inp.model_dir),
            "inputs": {"audio": "audio"},
            "params": {"batching": cfg.batching},
        },
        read=_read_texts,
        udf=_NaiveTranscriber,
        in_process={"pipeline": pipeline(cfg.batch_size), "pipeline_bs1": pipeline(1)},
        model_only=_ModelOnly(cfg, inp),
    )


# -------------------------------------------------------------------------------------------------------
# The run


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
    from transformers import AutoModelForCTC

    clips = list(clips)
    durations = [len(_decode(b)) / RATE for b in clips]
    mean_s = float(np.mean(durations))
    inp = harness.bench_inputs(
        model_dir, clips, column="audio", work_dir=work_dir, warmup_rows=cfg.warmup_rows, binary=True
    )

    def audio_rates(run: SystemRun) -> str:
        run.extra["audio_s_per_s"] = round(run.rows_per_s * mean_s, 2)
        run.extra["steady_audio_s_per_s"] = round(run.steady_rows_per_s * mean_s, 2)
        return f" ({run.steady_rows_per_s * mean_s:7.1f} audio-s/s)"

    conv, hidden, layers, heads, ffn, layer_norm = MODELS[cfg.model]
    params = sum(p.numel() for p in AutoModelForCTC.from_pretrained(model_dir).parameters())
    return harness.run_benchmark(
        cfg,
        name=NAME,
        systems=SYSTEMS,
        run=_systems(cfg, inp),
        describe={
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
        },
        results_dir=results_dir,
        log=log,
        reference=REFERENCE,
        unit="clips",
        per_run=audio_rates,
    )


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.asr", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, d, SYSTEMS)
    p.add_argument("--model", choices=list(MODELS), default=d.model)
    p.add_argument("--min-s", type=float, default=d.min_s)
    p.add_argument("--max-s", type=float, default=d.max_s)
    p.add_argument("--batching", choices=["exact", "pad"], default=d.batching)
    return harness.config_from_args(p, p.parse_args(argv), d, SYSTEMS)


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
        payload, _ = run_benchmark(
            cfg, model_dir=model_dir, clips=clips, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    return report(payload, cfg)


def report(payload: dict[str, Any], cfg: BenchConfig) -> int:
    """Print the table; 1 when shardwise's texts agree with pipeline_bs1's (else model_only's) on too few
    clips."""
    d, mo = payload["data"], payload["model"]
    harness.print_report(
        payload,
        header=f"automatic-speech-recognition · {mo['name']} Wav2Vec2 CTC (conv 7×{mo['conv_channels']}, hidden "
        f"{mo['hidden']}, {mo['layers']} layers, {mo['feat_extract_norm']} norm, {mo['parameters_m']} M params) "
        f"· {d['clips']} FLAC clips, {d['duration_s'][0]}–{d['duration_s'][2]} s (mean {d['duration_s'][1]} s, "
        f"{d['audio_s']} s in all)",
    )
    for name, fig in payload["systems"].items():
        audio = [r["extra"].get("steady_audio_s_per_s") for r in fig["repeats"]]
        print(f"  {name:<12} steady audio-s/s (per repeat): {audio}")
    print(f"texts, pairwise agreement: {payload['agreement_pairwise']}")
    exact = "pipeline_bs1" if "pipeline_bs1" in cfg.systems else "model_only"
    return harness.check_agreement(payload, against=exact, minimum=cfg.min_agreement, items="clips")


if __name__ == "__main__":
    sys.exit(main())
