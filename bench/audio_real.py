"""Real-ish proof for the audio tasks: speech synthesised with espeak-ng, fine-tuned with `kind: finetune`,
evaluated with `kind: inference` jobs on held-out clips; and the LibriVox recordings through an ASR job.

    python -m bench.audio_real [--work-dir DIR] [--clf-epochs 8] [--ctc-epochs 12] [--skip clf,ctc,librivox]
                               [--reuse]

1. Speech. `espeak-ng` (Debian, `infra.assets.fetch_espeak`) says the digits "zero" … "nine" in 10 voice
   variants (accents × the synthesiser's male/female variants), 4 speeds (120–210 words/min) and 2 pitches:
   22.05 kHz WAV, resampled to 16 kHz by the task (soxr). 8 voices are for training; 2 are held out.
2. Audio classification: one word per clip, 10 classes. Train on 80% of the seen voices' clips, report the
   accuracy on the other 20% (same voices, unseen clips) and on the 2 unseen voices.
3. Speech recognition (CTC): utterances of 1–3 digit words ("three one four"), the vocabulary built from the
   transcripts; word error rate (jiwer) and character error rate on held-out utterances of seen and unseen
   voices. `--ctc-base classifier` starts from the encoder of the digit classifier of step 2 (its folder
   is a fine-tuned model like any other: AutoModelForCTC takes its encoder and adds a fresh CTC head).
4. LibriVox: the 5 real recordings of `pocketsphinx-testdata` (3–7 s, 16 kHz WAV paths) plus the same
   clips re-encoded as 44.1 kHz stereo OGG bytes (resampling and downmix) through an ASR inference job on
   the fine-tuned CTC model: durations and throughput. The model knows 10 digit words, so its text for
   these recordings is meaningless; only the mechanics are shown.

Models start from random weights (no pretrained Wav2Vec2 exists offline): a small Wav2Vec2 (conv 7 × 64
channels, 320 samples per frame, hidden 128, 3 layers, 4 heads, FFN 256, layer norm with attention masks),
saved as a bare encoder + feature extractor; the fine-tunes add the classification or CTC head. Everything
runs on the local CPUs (1 Ray Train worker). Figures go to stdout and bench/results/audio_real-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_info, write_results

__all__ = ["DIGITS", "VOICES", "main", "synthesise"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voice + variant (gmw voices ship with the Debian package); the last two are held out.
VOICES = (
    "en-us+m3",
    "en-gb+f2",
    "en-gb-scotland+m1",
    "en-029+f4",
    "en-gb-x-rp+m7",
    "en-us+f1",
    "en-gb-x-gbclan+m2",
    "en-gb-x-gbcwmd+f3",
    "en-us+f3",
    "en-gb+m4",
)
HELD_OUT_VOICES = VOICES[-2:]
SPEEDS = (120, 150, 180, 210)
PITCHES = (35, 65)
RATE = 16_000


def synthesise(text: str, *, voice: str, speed: int, pitch: int, espeak: str) -> bytes:
    """WAV bytes (22.05 kHz, 16-bit) of `text` said by espeak-ng."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(
            [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", f.name, text],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return Path(f.name).read_bytes()


def _variants() -> list[tuple[str, int, int]]:
    return list(itertools.product(VOICES, SPEEDS, PITCHES))


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": pa.array(range(len(rows)), pa.int64()),
            "audio": pa.array([r["audio"] for r in rows], pa.binary()),
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "voice": pa.array([r["voice"] for r in rows], pa.string()),
        }
    )
    pq.write_table(table, path)
    return path


def build_datasets(work: Path, *, seed: int, ctc_utterances: int, log: Any) -> dict[str, Path]:
    """Parquet files (id, audio WAV bytes, text, voice) for both tasks; cached in `work`."""
    from infra.assets import fetch_espeak

    done = work / "_datasets.json"
    if done.exists():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    espeak = fetch_espeak()
    rng = random.Random(seed)
    started = time.time()
    # Classification: every digit in every variant.
    words = [
        {"audio": synthesise(d, voice=v, speed=s, pitch=p, espeak=espeak), "text": d, "voice": v}
        for d in DIGITS
        for v, s, p in _variants()
    ]
    seen = [r for r in words if r["voice"] not in HELD_OUT_VOICES]
    unseen = [r for r in words if r["voice"] in HELD_OUT_VOICES]
    rng.shuffle(seen)
    cut = int(0.8 * len(seen))
    # Recognition: random 1–3 digit utterances in random variants.
    variants = _variants()
    utterances = []
    for _ in range(ctc_utterances):
        text = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 3)))
        v, s, p = rng.choice(variants)
        utterances.append(
            {"audio": synthesise(text, voice=v, speed=s, pitch=p, espeak=espeak), "text": text, "voice": v}
        )
    u_seen = [r for r in utterances if r["voice"] not in HELD_OUT_VOICES]
    u_unseen = [r for r in utterances if r["voice"] in HELD_OUT_VOICES]
    u_cut = int(0.85 * len(u_seen))
    paths = {
        "clf_train": _write(work / "clf" / "train.parquet", seen[:cut]),
        "clf_test_seen": _write(work / "clf" / "test_seen.parquet", seen[cut:]),
        "clf_test_unseen": _write(work / "clf" / "test_unseen.parquet", unseen),
        "ctc_train": _write(work / "ctc" / "train.parquet", u_seen[:u_cut]),
        "ctc_test_seen": _write(work / "ctc" / "test_seen.parquet", u_seen[u_cut:]),
        "ctc_test_unseen": _write(work / "ctc" / "test_unseen.parquet", u_unseen),
    }
    log(f"synthesised {len(words)} words + {len(utterances)} utterances in {time.time() - started:.0f} s")
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def prepare_base(dest: Path, *, seed: int) -> Path:
    """A random small Wav2Vec2 encoder + feature extractor (see the module docstring)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        conv_dim=(64,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        num_conv_pos_embeddings=32,
        mask_time_prob=0.05,
        mask_time_length=4,
        hidden_dropout=0.05,
        attention_dropout=0.05,
        activation_dropout=0.05,
        feat_proj_dropout=0.05,
        final_dropout=0.05,
        layerdrop=0.0,
        classifier_proj_size=128,
    )
    torch.manual_seed(seed)
    Wav2Vec2Model(config).save_pretrained(dest, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(dest)
    return dest


def _finetune(
    *,
    task: str,
    base: Path,
    train: Path,
    out: Path,
    label_column: str,
    epochs: int,
    lr: float,
    batch: int,
    reuse: bool,
    log: Any,
) -> dict[str, Any]:
    """Run the `kind: finetune` job (or, with `reuse`, take the finished folder already in `out`); return
    its train_metrics.json (label names, rows, per-epoch losses and accuracy, wall time)."""
    from jobs.finetune import METRICS_FILE, run_finetune
    from pipeline.spec import parse_spec

    if reuse and (out / "_SUCCESS").exists():
        log(f"reusing the fine-tuned {task} model in {out}")
        return json.loads((out / METRICS_FILE).read_text())

    spec = parse_spec(
        {
            "name": f"espeak-{task}",
            "kind": "finetune",
            "input": {"uri": str(train), "id_column": "id"},
            "stages": [{"name": "m", "task": task, "model": str(base), "inputs": {"audio": "audio"}}],
            "output": {"uri": str(out), "mode": "overwrite"},
            "train": {
                "label_column": label_column,
                "epochs": epochs,
                "lr": lr,
                "warmup_ratio": 0.1,
                "weight_decay": 0.01,
                "batch_size": batch,
                "eval_fraction": 0.1,
                "seed": 0,
            },
        }
    )
    run_finetune(spec, progress=False)
    return json.loads((out / METRICS_FILE).read_text())


def _infer(*, task: str, model: Path, data: Path, out: Path, params: dict[str, Any] | None = None) -> Any:
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    spec = parse_spec(
        {
            "name": f"infer-{task}",
            "input": {"uri": str(data), "id_column": "id", "keep_columns": ["id", "voice"], "shard_rows": 64},
            "stages": [
                {
                    "name": "m",
                    "task": task,
                    "model": str(model),
                    "inputs": {"audio": "audio"},
                    "params": params or {},
                    "batch_size": 16,
                }
            ],
            "output": {"uri": str(out), "mode": "overwrite"},
        }
    )
    result = run_inference(spec, overwrite=True, progress=False)
    return result, {r["id"]: r for r in read_output(str(out)).to_pylist()}


def _truth(path: Path) -> dict[int, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "text"])
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def run_classification(
    paths: dict[str, Path], base: Path, work: Path, *, epochs: int, reuse: bool, log: Any
) -> dict[str, Any]:
    metrics = _finetune(
        task="audio-classification",
        base=base,
        train=paths["clf_train"],
        out=work / "clf-model",
        label_column="text",
        epochs=epochs,
        lr=2e-3,
        batch=32,
        reuse=reuse,
        log=log,
    )
    log(f"classification fine-tune: {metrics['wall_s']:.0f} s, last epoch {metrics['epochs'][-1]}")
    figures: dict[str, Any] = {
        "train_rows": metrics["train_rows"],
        "eval_rows": metrics["eval_rows"],
        "epochs": metrics["epochs"],
        "train_s": round(metrics["wall_s"], 1),
    }
    for split in ("seen", "unseen"):
        data = paths[f"clf_test_{split}"]
        job, preds = _infer(
            task="audio-classification", model=work / "clf-model", data=data, out=work / f"clf-{split}"
        )
        truth = _truth(data)
        accuracy = float(np.mean([preds[i]["label"] == t for i, t in truth.items()]))
        figures[f"accuracy_{split}_voices"] = round(accuracy, 4)
        figures[f"rows_{split}"] = len(truth)
        figures[f"inference_rows_per_s_{split}"] = round(job.rows_per_s, 2)
        log(f"classification accuracy, held-out clips of {split} voices: {accuracy:.1%} ({len(truth)} clips)")
    return figures


def run_recognition(
    paths: dict[str, Path], base: Path, work: Path, *, name: str, epochs: int, reuse: bool, log: Any
) -> dict[str, Any]:
    import jiwer

    metrics = _finetune(
        task="automatic-speech-recognition",
        base=base,
        train=paths["ctc_train"],
        out=work / name,
        label_column="text",
        epochs=epochs,
        lr=2e-3,
        batch=16,
        reuse=reuse,
        log=log,
    )
    log(f"CTC fine-tune: {metrics['wall_s']:.0f} s, last epoch {metrics['epochs'][-1]}")
    figures: dict[str, Any] = {
        "vocabulary": "".join(metrics["label_names"]),
        "train_rows": metrics["train_rows"],
        "eval_rows": metrics["eval_rows"],
        "epochs (eval_accuracy = 1 - CER)": metrics["epochs"],
        "train_s": round(metrics["wall_s"], 1),
    }
    for split in ("seen", "unseen"):
        data = paths[f"ctc_test_{split}"]
        job, preds = _infer(
            task="automatic-speech-recognition",
            model=work / name,
            data=data,
            out=work / f"{name}-{split}",
        )
        truth = _truth(data)
        refs = [truth[i] for i in sorted(truth)]
        hyps = [" ".join(preds[i]["text"].split()) for i in sorted(truth)]
        figures[f"wer_{split}_voices"] = round(float(jiwer.wer(refs, hyps)), 4)
        figures[f"cer_{split}_voices"] = round(float(jiwer.cer(refs, hyps)), 4)
        figures[f"rows_{split}"] = len(refs)
        figures[f"examples_{split}"] = [
            {"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:5]
        ]
        log(
            f"CTC on held-out utterances of {split} voices: WER {figures[f'wer_{split}_voices']:.1%}, "
            f"CER {figures[f'cer_{split}_voices']:.1%} ({len(refs)} utterances); e.g. {figures[f'examples_{split}'][:2]}"
        )
    return figures


def run_librivox(model: Path, work: Path, *, log: Any) -> dict[str, Any]:
    """The 5 LibriVox clips as paths (16 kHz) and as 44.1 kHz stereo OGG bytes, through one ASR job."""
    import io

    import jiwer
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    import soxr

    from infra.assets import fetch_librivox

    clips = fetch_librivox()
    rows_audio: list[dict[str, Any]] = []
    durations = []
    for path, _ in clips:
        samples, rate = sf.read(path, dtype="float32")
        durations.append(len(samples) / rate)
        rows_audio.append({"bytes": None, "path": str(path)})
    for path, _ in clips:
        samples, rate = sf.read(path, dtype="float32")
        up = soxr.resample(samples, rate, 44_100)
        buf = io.BytesIO()
        sf.write(buf, np.stack([up, 0.8 * up], axis=1), 44_100, format="OGG", subtype="VORBIS")
        rows_audio.append({"bytes": buf.getvalue(), "path": f"{Path(path).stem}-44k-stereo.ogg"})
    n = len(rows_audio)
    data = work / "librivox" / "clips.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": pa.array(range(n), pa.int64()),
                "audio": pa.array(rows_audio, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                "voice": pa.array(["librivox-wav-16k"] * 5 + ["librivox-ogg-44k-stereo"] * 5),
            }
        ),
        data,
    )
    # chunk_length_s 4 s: the 5–7 s clips go through the pipeline's chunking and merging too.
    job, preds = _infer(
        task="automatic-speech-recognition",
        model=model,
        data=data,
        out=work / "librivox-out",
        params={"chunk_length_s": 4.0, "stride_length_s": 1.0},
    )
    refs = [t for _, t in clips] * 2
    hyps = [" ".join(preds[i]["text"].split()) for i in range(n)]
    audio_s = 2 * sum(durations)
    figures = {
        "clips": n,
        "durations_s": [round(d, 2) for d in durations],
        "job_wall_s": round(job.wall_s, 2),
        "audio_s": round(audio_s, 2),
        "audio_s_per_s (whole job, startup included)": round(audio_s / job.wall_s, 2),
        "rows_ok": job.rows_ok,
        "rows_error": job.rows_error,
        "wav_vs_ogg_same_text": sum(hyps[i] == hyps[i + 5] for i in range(5)),
        "wer (meaningless: the model knows 10 digit words)": round(float(jiwer.wer(refs, hyps)), 3),
        "texts": hyps,
    }
    log(
        f"LibriVox: {n} clips ({audio_s:.1f} s of audio) in {job.wall_s:.1f} s, {job.rows_ok} ok / "
        f"{job.rows_error} errors; WAV vs 44.1 kHz OGG same text for {figures['wav_vs_ogg_same_text']}/5"
    )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    p = argparse.ArgumentParser(prog="python -m bench.audio_real", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work-dir", type=Path, default=None, help="kept between runs (synthesised clips are cached)"
    )
    p.add_argument("--clf-epochs", type=int, default=8)
    p.add_argument("--ctc-epochs", type=int, default=12)
    p.add_argument("--ctc-utterances", type=int, default=700)
    p.add_argument(
        "--ctc-base",
        choices=["random", "classifier"],
        default="random",
        help="start the CTC fine-tune from the random base or from the fine-tuned digit classifier's encoder",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated: clf, ctc, librivox")
    p.add_argument(
        "--reuse", action="store_true", help="evaluate the fine-tuned models already in --work-dir, if any"
    )
    a = p.parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    work = a.work_dir or Path(tempfile.mkdtemp(prefix="shardwise-audio-real-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    paths = build_datasets(work, seed=a.seed, ctc_utterances=a.ctc_utterances, log=log)
    base = work / "base" if a.reuse and (work / "base").exists() else prepare_base(work / "base", seed=a.seed)
    payload: dict[str, Any] = {
        "benchmark": "audio_real",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device="cpu", torch_threads=0),
        "config": vars(a) | {"work_dir": str(work)},
        "data": {
            "voices": list(VOICES),
            "held_out_voices": list(HELD_OUT_VOICES),
            "speeds": SPEEDS,
            "pitches": PITCHES,
        },
    }
    if "clf" not in skip:
        payload["audio_classification"] = run_classification(
            paths, base, work, epochs=a.clf_epochs, reuse=a.reuse, log=log
        )
    if "ctc" not in skip:
        ctc_base = work / "clf-model" if a.ctc_base == "classifier" else base
        if not (ctc_base / "config.json").exists():
            log(f"--ctc-base {a.ctc_base}: no model in {ctc_base}; run the classification step first")
            return 2
        ctc_name = "ctc-model" if a.ctc_base == "random" else "ctc-model-from-classifier"
        payload["speech_recognition"] = run_recognition(
            paths, ctc_base, work, name=ctc_name, epochs=a.ctc_epochs, reuse=a.reuse, log=log
        )
        payload["speech_recognition"]["base"] = a.ctc_base
    if "librivox" not in skip:
        done = [
            work / n for n in ("ctc-model-from-classifier", "ctc-model") if (work / n / "_SUCCESS").exists()
        ]
        model = done[0] if done else None
        if model is None:
            log("LibriVox: no fine-tuned CTC model in the work dir; run without --skip ctc first")
        else:
            payload["librivox"] = {"model": model.name, **run_librivox(model, work, log=log)}
    payload["wall_s"] = round(time.time() - started, 1)
    path = write_results(payload, name="audio_real")
    print(json.dumps({k: v for k, v in payload.items() if k not in ("machine",)}, indent=1, default=str))
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
