"""The four benchmarks at base size on one CUDA GPU, against the anchor figures of ../shared/GPU.md.

    python -m bench.gpu pack [--out .device] [--tiny] [--no-ray]   # here: what the GPU machine lacks
    python -m bench.gpu run [--assets .device/bench-assets] [--tiny] [--device cuda|cpu]

`make bench-gpu` packs, then runs where `nvidia-smi` sees a GPU and otherwise prints the device command
(`bash bench/gpu.sh` with `.device` carried: it unpacks Ray and runs `python -m bench.gpu run`).

The GPU machine has torch and transformers but no Ray, no registry and no model hub, so `pack` writes
    .device/site.tgz            Ray and the wheels shardwise needs there (../shared/device/pack-ray.sh)
    .device/bench-assets/       texts.parquet (Rotten Tomatoes reviews), photos/*.jpg (the sample photos),
                                speech.flac (the LibriVox utterances, 16 kHz)
and `run` builds every model from a config with random weights (bf16 on CUDA), tokenizers trained on the
packed texts:
    text_classification   BERT-base (12 × 768), WordPiece 30,522
    image_classification  ViT-B/16 224
    text_generation       GPT-2 small (12 × 768, vocabulary 50,257), greedy, 32-token prompts + 128 new
    asr                   Wav2Vec2-base CTC, 10 s clips, `batching: pad` (group norm: trained without masks)

Each system's steady rate is printed in the anchor's unit (sequences, images, new tokens or audio seconds
per second) next to the anchor it is compared with and the ratio: a system with its own anchor (the text
pipeline, naive Ray Data, the bare loop) against that one, every other against the benchmark's model-only
anchor. The anchors were measured on one H100 80GB; a ratio on another GPU is a ratio to that machine.

`--tiny` (CPU smoke test, `tests/bench/test_gpu_bench.py`): tiny models, 16 rows, synthetic assets from
`pack --tiny` — the same code path, figures meaningless.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import asr, generation, harness, image_classification, text_classification
from bench.common import write_results

__all__ = ["ANCHORS", "BENCHMARKS", "main", "pack", "run"]

# (benchmark, system) → (anchor figure, what it is); system "*": the benchmark's model-only anchor.
ANCHORS: dict[tuple[str, str], tuple[float, str]] = {
    ("text_classification", "model_only"): (17_400, "BERT-base seq 128 batch 512, model only"),
    ("text_classification", "pipeline"): (2_400, "transformers.pipeline, batch 256"),
    ("text_classification", "naive_ray"): (2_100, "naive Ray Data, 1 GPU actor"),
    ("text_classification", "shardwise"): (3_400, "bare loop, inline tokenization"),
    ("text_classification", "*"): (17_400, "BERT-base seq 128 batch 512, model only"),
    ("image_classification", "*"): (10_200, "ViT-B/16 224 batch 512, model only"),
    ("text_generation", "*"): (45_500, "GPT-2 small generate 256 × (32 + 128)"),
    ("asr", "*"): (9_900, "Wav2Vec2-base CTC 64 × 10 s, model only"),
}
UNITS = {
    "text_classification": "seq/s",
    "image_classification": "img/s",
    "text_generation": "new tok/s",
    "asr": "audio-s/s",
}
BENCHMARKS = tuple(UNITS)
ASSETS = Path(".device") / "bench-assets"
PACK_RAY = Path(__file__).resolve().parents[1].parent / "shared" / "device" / "pack-ray.sh"
# Wheels shardwise imports that the GPU machine lacks besides Ray (Python 3.12, x86-64).
DEVICE_WHEELS = ("soundfile", "cffi", "pycparser", "soxr", "croniter")


@dataclass(frozen=True)
class Sizes:
    rows: int
    batch_size: int
    shard_rows: int
    warmup_rows: int


# Base sizes: a few seconds of steady state per system on one H100, all four within a device call.
BASE = {
    "text_classification": Sizes(16_384, 256, 4_096, 512),
    "image_classification": Sizes(8_192, 256, 2_048, 512),
    "text_generation": Sizes(512, 256, 256, 256),
    "asr": Sizes(512, 64, 128, 64),
}
TINY = {name: Sizes(16, 8, 16, 0) for name in BENCHMARKS}  # one shard: the fewest Ray tasks


# -------------------------------------------------------------------------------------------------------
# Assets


def pack(out: Path, *, tiny: bool = False, ray: bool = True, log: Callable[[str], Any] = print) -> Path:
    """Write `out`/bench-assets (real, or synthetic with `tiny`) and, with `ray`, `out`/site.tgz."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    assets = out / "bench-assets"
    (assets / "photos").mkdir(parents=True, exist_ok=True)
    if tiny:
        texts, photos, speech = _synthetic_assets()
    else:
        from bench.common import rt_review_pool

        texts = rt_review_pool()
        photos = image_classification.sample_photos()
        speech = asr.librivox_speech()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), assets / "texts.parquet")
    for i, photo in enumerate(photos):
        photo.save(assets / "photos" / f"{i}.jpg", format="JPEG", quality=95)
    sf.write(assets / "speech.flac", speech, asr.RATE, format="FLAC", subtype="PCM_16")
    log(
        f"assets: {assets} ({sum(f.stat().st_size for f in assets.rglob('*') if f.is_file()) / 2**20:.1f} MiB)"
    )
    if ray:
        if not PACK_RAY.exists():
            raise FileNotFoundError(
                f"{PACK_RAY} is missing: it builds .device/site.tgz (see ../shared/GPU.md)"
            )
        # pack-ray.sh writes .device/site.tgz under its working directory and notes .device in
        # .git/info/exclude, which a git worktree does not have as a folder: run it in a scratch folder.
        with tempfile.TemporaryDirectory(prefix="shardwise-pack-") as tmp:
            (Path(tmp) / ".git" / "info").mkdir(parents=True)
            subprocess.run(["bash", str(PACK_RAY), _ray_version(), *DEVICE_WHEELS], check=True, cwd=tmp)
            os.replace(Path(tmp) / ".device" / "site.tgz", out / "site.tgz")
        log(
            f"Ray and {', '.join(DEVICE_WHEELS)}: {out / 'site.tgz'} ({(out / 'site.tgz').stat().st_size / 2**20:.1f} MiB)"
        )
    return assets


def _ray_version() -> str:
    import ray

    return ray.__version__


def _synthetic_assets() -> tuple[list[str], list[Any], np.ndarray]:
    from PIL import Image

    rng = random.Random(0)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("n", "r", "s", "")]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(200)]
    pixels = np.random.default_rng(0).integers(0, 256, (3, 96, 128, 3), dtype=np.uint8)
    photos = [Image.fromarray(p) for p in pixels]
    speech = np.random.default_rng(0).normal(0, 0.1, asr.RATE * 4).astype(np.float32)
    return texts, photos, speech


@dataclass(frozen=True)
class _Assets:
    texts: list[str]
    photos: list[Any]
    speech: np.ndarray


def _load_assets(root: Path) -> _Assets:
    import pyarrow.parquet as pq
    import soundfile as sf
    from PIL import Image

    if not (root / "texts.parquet").exists():
        raise FileNotFoundError(f"{root}/texts.parquet is missing: run `python -m bench.gpu pack` first")
    texts = pq.read_table(root / "texts.parquet").column("text").to_pylist()
    photos = [Image.open(p).convert("RGB") for p in sorted((root / "photos").glob("*.jpg"))]
    speech, _ = sf.read(root / "speech.flac", dtype="float32")
    return _Assets(texts, photos, speech)


# -------------------------------------------------------------------------------------------------------
# Models (random init from configs)


def _wordpiece(texts: Sequence[str], dest: Path, *, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=512)
    fast.save_pretrained(dest)
    return fast


def _bert(dest: Path, texts: Sequence[str], *, tiny: bool) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _wordpiece(texts, dest, vocab_size=200 if tiny else 30_522)
    hidden, layers, heads = (32, 1, 2) if tiny else (768, 12, 12)
    config = BertConfig(
        vocab_size=len(tok) if tiny else 30_522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(dest)
    return dest


def _gpt2(dest: Path, texts: Sequence[str], *, tiny: bool) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = generation.train_bpe(texts, vocab_size=300 if tiny else 8_000)
    hidden, layers, heads = (32, 1, 2) if tiny else (768, 12, 12)
    config = GPT2Config(
        vocab_size=len(tok) if tiny else 50_257,
        n_positions=1024,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    dest.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).eval().save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


# -------------------------------------------------------------------------------------------------------
# The run


def _run_one(
    name: str,
    assets: _Assets,
    work: Path,
    *,
    tiny: bool,
    device: str,
    systems: Sequence[str] | None,
    results_dir: Path | None,
    log: Any,
) -> dict[str, Any]:
    size = (TINY if tiny else BASE)[name]

    def chosen(default: Sequence[str]) -> tuple[str, ...]:
        return tuple(s for s in default if systems is None or s in systems)

    common = {
        "rows": size.rows,
        "batch_size": size.batch_size,
        "shard_rows": size.shard_rows,
        "warmup_rows": size.warmup_rows,
        "device": device,
        "threads": os.cpu_count() or 1,
    }
    out = work / name
    if name == "text_classification":
        # Median ~30 words, as the anchor's texts.
        cfg_t = replace(
            text_classification.BenchConfig(), **common, model_size="base", min_words=5, max_words=60
        )
        cfg_t = replace(cfg_t, systems=chosen(cfg_t.systems))
        texts = _texts(assets.texts, cfg_t.rows, min_words=5, max_words=60)
        model = _bert(out / "model", assets.texts, tiny=tiny)
        payload, _ = text_classification.run_benchmark(
            cfg_t, model_dir=model, texts=texts, work_dir=out, results_dir=results_dir, log=log
        )
    elif name == "image_classification":
        cfg_i = replace(
            image_classification.BenchConfig(), **common, model="vit-nano" if tiny else "vit-base"
        )
        cfg_i = replace(cfg_i, systems=chosen(cfg_i.systems))
        model = image_classification.prepare_model(cfg_i.model, out / "model")
        images = image_classification.build_images(cfg_i.rows, photos=assets.photos)
        payload, _ = image_classification.run_benchmark(
            cfg_i, model_dir=model, images=images, work_dir=out, results_dir=results_dir, log=log
        )
    elif name == "text_generation":
        # ~32-token prompts (24 words of reviews), 128 new tokens, greedy.
        cfg_g = replace(
            generation.GenBenchConfig(),
            **common,
            max_new_tokens=4 if tiny else 128,
            min_words=24,
            max_words=24,
            systems=chosen(generation.SYSTEMS),
        )
        texts = _texts(assets.texts, cfg_g.rows, min_words=24, max_words=24)
        model = _gpt2(out / "model", assets.texts, tiny=tiny)
        payload, _ = generation.run_benchmark(
            cfg_g, model_dir=model, texts=texts, work_dir=out, results_dir=results_dir, log=log
        )
    else:
        cfg_a = replace(
            asr.BenchConfig(),
            **common,
            model="nano" if tiny else "base",
            min_s=1.0 if tiny else 10.0,
            max_s=2.0 if tiny else 10.0,
            batching="pad",
        )
        cfg_a = replace(cfg_a, systems=chosen(cfg_a.systems))
        model = asr.prepare_model(cfg_a.model, out / "model")
        clips = asr.build_clips(cfg_a.rows, min_s=cfg_a.min_s, max_s=cfg_a.max_s, speech=assets.speech)
        payload, _ = asr.run_benchmark(
            cfg_a, model_dir=model, clips=clips, work_dir=out, results_dir=results_dir, log=log
        )
    return payload


def _texts(pool: Sequence[str], n: int, *, min_words: int, max_words: int) -> list[str]:
    from bench.common import build_texts

    return build_texts(pool, n, seed=0, min_words=min_words, max_words=max_words)


def anchor_ratios(name: str, payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system: its steady rate in the anchor's unit, the anchor it is compared with, and the ratio."""
    out = {}
    for system, fig in payload["systems"].items():
        if name == "text_generation":
            rate = float(np.median([r["extra"]["steady_new_tokens_per_s"] for r in fig["repeats"]]))
        elif name == "asr":
            rate = float(np.median([r["extra"]["steady_audio_s_per_s"] for r in fig["repeats"]]))
        else:
            rate = fig["steady_rows_per_s"]
        anchor, what = ANCHORS.get((name, system), ANCHORS[(name, "*")])
        out[system] = {"rate": round(rate, 2), "unit": UNITS[name], "anchor": anchor, "anchor_is": what}
        out[system]["ratio"] = float(f"{rate / anchor:.3g}")
    return out


def run(
    assets_dir: Path,
    *,
    tiny: bool = False,
    device: str = "cuda",
    only: Sequence[str] = BENCHMARKS,
    systems: Sequence[str] | None = None,
    results_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> tuple[dict[str, Any], Path]:
    """Run the benchmarks of `only` on one embedded Ray cluster; write gpu-<time>.json; return
    (payload, path) with each system's ratio to its anchor."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device (use --device cpu for a smoke test)")
    assets = _load_assets(assets_dir)
    results: dict[str, Any] = {}
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="shardwise-bench-gpu-") as tmp,
        harness.embedded_ray(
            needed=systems is None or any(s in harness.RAY_SYSTEMS for s in systems),
            num_cpus=max(os.cpu_count() or 1, 4),
            num_gpus=1 if device == "cuda" else None,
            niceness=0,
        ),
    ):
        for name in only:
            log(f"== {name}")
            payload = _run_one(
                name,
                assets,
                Path(tmp),
                tiny=tiny,
                device=device,
                systems=systems,
                results_dir=results_dir,
                log=log,
            )
            results[name] = {
                "results_path": payload["results_path"],
                "ratios": anchor_ratios(name, payload),
                "agreement_pairwise": payload["agreement_pairwise"],
            }
    out = {
        "benchmark": "gpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tiny": tiny,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "wall_s": round(time.time() - started, 1),
        "benchmarks": results,
    }
    path = write_results(out, name="gpu", out_dir=results_dir)
    return out, path


def format_ratios(payload: dict[str, Any]) -> str:
    lines = [
        f"{'benchmark':<22}{'system':<12}{'steady':>12} {'unit':<10}{'anchor':>9}  {'ratio':>7}  anchor is"
    ]
    lines.append("-" * len(lines[0]) + "-" * 30)
    for name, res in payload["benchmarks"].items():
        for system, r in res["ratios"].items():
            lines.append(
                f"{name:<22}{system:<12}{r['rate']:>12.1f} {r['unit']:<10}{r['anchor']:>9,.0f}  "
                f"{r['ratio']:>6.3g}x  {r['anchor_is']}"
            )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="write what the GPU machine lacks under --out")
    pk.add_argument("--out", type=Path, default=ASSETS.parent)
    pk.add_argument("--tiny", action="store_true", help="synthetic assets for a CPU smoke test")
    pk.add_argument("--no-ray", action="store_true", help="assets only, no site.tgz")
    rn = sub.add_parser("run", help="run the benchmarks and print the ratios to the anchors")
    rn.add_argument("--assets", type=Path, default=ASSETS)
    rn.add_argument("--tiny", action="store_true", help="tiny models and 16 rows (a smoke test)")
    rn.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    rn.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of %(default)s")
    rn.add_argument("--systems", default=None, help="comma-separated subset of the systems (default: all)")
    rn.add_argument("--results-dir", type=Path, default=None)
    a = p.parse_args(argv)
    if a.command == "pack":
        pack(a.out, tiny=a.tiny, ray=not a.no_ray)
        return 0
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(BENCHMARKS))
    if bad:
        p.error(f"unknown benchmarks {bad}; available: {', '.join(BENCHMARKS)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    payload, path = run(
        a.assets,
        tiny=a.tiny,
        device=a.device,
        only=only,
        systems=[s.strip() for s in a.systems.split(",")] if a.systems else None,
        results_dir=a.results_dir,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(
        f"\n{'TINY smoke run: figures are meaningless · ' if a.tiny else ''}{a.device} {payload['gpu'] or ''}"
    )
    print(format_ratios(payload))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
