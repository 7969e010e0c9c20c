"""Generation and summarization, three (or four) ways, on the same model and the same mixed-length texts:

    shardwise    run_inference(parse_spec({...})): Parquet in → sharded Ray Data job (length-sorted,
                 left-padded micro-batches, KV cache) → Parquet out
    pipeline     text-generation: transformers.pipeline("text-generation", batch_size=B) over the list;
                 summarization (no pipeline in transformers 5): the loop a user writes instead — batches
                 of B in input order, tokenizer(padding=True) → generate → batch_decode
    naive_ray    ray.data.read_parquet → map_batches(class that tokenizes + generates + decodes,
                 batch_size=B, one actor) → write_parquet, on the same embedded Ray
    model_only   (opt-in: --systems model_only,...) prompts tokenized beforehand, length-sorted and padded
                 on the device, straight into `generate` (an upper bound)

    python -m bench.generation [--task text-generation|summarization] [--rows 48] [--batch-size 8]
                               [--max-new-tokens 16] [--repeats 1] [--device cpu|cuda]

Models. text-generation: the real SmolLM2-135M-Instruct (`infra.assets.fetch_smollm2`; Llama, 30 layers,
hidden 576), greedy. summarization: a seeded random BART (d_model 256, 3+3 layers, `--num-beams`, default
2) with a byte-level BPE tokenizer trained on the review pool; random weights never emit EOS, so every
summary is max_new_tokens long (a fixed amount of decoding per row). Every system runs greedy/beam search
with the same params, threads and dtype.

Texts: real Rotten Tomatoes reviews concatenated to a word count drawn uniformly from [min_words,
max_words] (seeded). Prompt lengths vary ~10×, which is where length-sorted batching saves prefill work
over batches in input order.

Steady-state rates and `startup_s` are defined in bench.harness, which runs the systems. Prints a table (medians over repeats; ratios against `pipeline`, and the share
of rows whose text equals the pipeline's) and writes bench/results/<task>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench import harness
from bench.common import SystemRun, build_texts, rt_review_pool, text_stats

__all__ = ["SYSTEMS", "GenBenchConfig", "main", "prepare_model", "run_benchmark"]

SYSTEMS = ("model_only", "pipeline", "shardwise", "naive_ray")
REFERENCE = "pipeline"
Task = Literal["text-generation", "summarization"]


@dataclass(frozen=True)
class GenBenchConfig(harness.HarnessConfig):
    task: Task = "text-generation"
    rows: int = 48
    batch_size: int = 8
    max_new_tokens: int = 16
    num_beams: int = 2  # summarization only
    min_words: int = 5
    max_words: int = 200
    # Rows per shard: the replica sorts by length within a shard, so a shard holds several micro-batches;
    # two or more shards give a steady-state window.
    shard_rows: int = 24
    warmup_rows: int = 4
    # model_only is opt-in (the three user-facing systems are the comparison; bench.gpu adds it).
    systems: tuple[str, ...] = ("pipeline", "shardwise", "naive_ray")

    @property
    def name(self) -> str:
        return self.task.replace("-", "_")

    def params(self) -> dict[str, Any]:
        if self.task == "text-generation":
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "return_full_text": False}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}

    def generate_params(self) -> dict[str, Any]:
        """params() as `model.generate` takes them."""
        return {k: v for k, v in self.params().items() if k != "return_full_text"}

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
    from transformers import BartConfig, BartForConditionalGeneration

    fast = train_bpe(texts)
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


def train_bpe(texts: Sequence[str], *, vocab_size: int = 8000) -> Any:
    """A byte-level BPE tokenizer (<s> … </s>, <pad>, <unk>) trained on `texts`, as a
    PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def _decode(tokenizer: Any, ids: Any) -> list[str]:
    return tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _load(cfg: GenBenchConfig, model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, model on the device in eval mode); a causal LM's tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    auto: Any = AutoModelForSeq2SeqLM
    if cfg.task == "text-generation":
        tok.padding_side = "left"
        auto = AutoModelForCausalLM
    return tok, auto.from_pretrained(model_dir, dtype=cfg.torch_dtype()).to(cfg.device).eval()


# -------------------------------------------------------------------------------------------------------
# Systems


def _pipeline_callable(cfg: GenBenchConfig, model_dir: Path) -> Any:
    import torch

    torch.set_num_threads(cfg.threads)
    params = cfg.params()
    if cfg.task == "text-generation":
        from transformers import pipeline

        pipe = pipeline(
            "text-generation",
            model=str(model_dir),
            device=cfg.device,
            batch_size=cfg.batch_size,
            dtype=cfg.torch_dtype(),
        )
        return lambda texts: [o[0]["generated_text"] for o in pipe(list(texts), **params)]

    # summarization: what a user writes without the 4.x pipeline.
    tok, model = _load(cfg, model_dir)

    def run(texts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(texts), cfg.batch_size):
            enc = tok(list(texts[i : i + cfg.batch_size]), padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                ids = model.generate(**enc.to(cfg.device), **params)
            out.extend(_decode(tok, ids))
        return out

    return run


class _NaiveGenerator:
    """What a Ray Data user writes first: tokenizer + model in __init__; tokenize, generate, decode per batch."""

    def __init__(
        self, model_dir: str, *, task: str, params: dict[str, Any], device: str, dtype: str, threads: int
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        self.task = task
        self.params = dict(params)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if task == "text-generation":
            self.tokenizer.padding_side = "left"
            auto: Any = AutoModelForCausalLM
            self.params.pop("return_full_text", None)
        else:
            auto = AutoModelForSeq2SeqLM
        self.model = auto.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(list(batch["text"]), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        with self.torch.inference_mode():
            ids = self.model.generate(**enc, **self.params)
        if self.task == "text-generation":
            ids = ids[:, enc["input_ids"].shape[1] :]
        texts = _decode(self.tokenizer, ids)
        n = len(texts)
        return {
            "id": batch["id"],
            "text_out": np.array(texts, dtype=object),
            "batch_done_at": np.full(n, time.time()),
        }


class _ModelOnly:
    """Prompts tokenized, length-sorted and padded on the device before the clock; `generate` timed."""

    def __init__(self, cfg: GenBenchConfig, inp: harness.BenchInputs) -> None:
        self.cfg, self.inp = cfg, inp
        self.tok: Any = None

    def load(self) -> Any:
        self.tok, model = _load(self.cfg, self.inp.model_dir)
        return model

    def prepare(self, model: Any) -> list[Any]:
        texts = self.inp.items
        lengths = [len(x) for x in self.tok(texts, truncation=True)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        step = self.cfg.batch_size
        return [
            (
                idx,
                self.tok([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt").to(
                    self.cfg.device
                ),
            )
            for idx in (order[k : k + step] for k in range(0, len(order), step))
        ]

    def forward(self, model: Any, batch: Any) -> Any:
        _, enc = batch
        ids = model.generate(**enc, **self.cfg.generate_params())
        return ids[:, enc["input_ids"].shape[1] :] if self.cfg.task == "text-generation" else ids

    def collect(self, model: Any, batches: list[Any], outputs: list[Any]) -> tuple[list[str], list[float]]:
        texts = [""] * len(self.inp.items)
        for (idx, _), ids in zip(batches, outputs, strict=True):
            for i, text in zip(idx, _decode(self.tok, ids), strict=True):
                texts[i] = text
        return texts, []


def _systems(cfg: GenBenchConfig, inp: harness.BenchInputs) -> harness.Systems:
    field = cfg.output_field()
    return harness.Systems(
        inputs=inp,
        job=f"bench-{cfg.name}",
        stage={
            "name": "gen",
            "task": cfg.task,
            "model": str(inp.model_dir),
            "inputs": {"text": "text"},
            "params": cfg.params(),
        },
        read=lambda uri, n: (harness.read_by_id(uri, n, {field: ""})[0], []),
        udf=_NaiveGenerator,
        udf_kwargs={"task": cfg.task, "params": cfg.params()},
        read_naive=lambda uri, n: (harness.read_by_id(uri, n, {"text_out": ""})[0], []),
        in_process={
            "pipeline": harness.InProcess(
                construct=lambda: _pipeline_callable(cfg, inp.model_dir), parse=lambda out: (list(out), [])
            )
        },
        model_only=_ModelOnly(cfg, inp),
    )


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
    from transformers import AutoConfig, AutoTokenizer

    texts = list(texts)
    lengths = [len(x) for x in AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]]
    inp = harness.bench_inputs(
        model_dir, texts, column="text", work_dir=work_dir, warmup_rows=cfg.warmup_rows
    )
    config = AutoConfig.from_pretrained(model_dir)
    shape = ("model_type", "hidden_size", "num_hidden_layers", "d_model", "encoder_layers", "vocab_size")

    def new_tokens(run: SystemRun) -> str:  # upper bound: a row that stops at EOS makes fewer
        run.extra["new_tokens_per_s"] = round(run.rows_per_s * cfg.max_new_tokens, 2)
        run.extra["steady_new_tokens_per_s"] = round(run.steady_rows_per_s * cfg.max_new_tokens, 2)
        return ""

    return harness.run_benchmark(
        cfg,
        name=cfg.name,
        systems=SYSTEMS,
        run=_systems(cfg, inp),
        ray_cpus=max(4, os.cpu_count() or 1),
        describe={
            "params": cfg.params(),
            "model": {"dir": str(model_dir), **{k: getattr(config, k, None) for k in shape}},
            "data": text_stats(texts, lengths),
        },
        results_dir=results_dir,
        log=log,
        reference=REFERENCE,
        per_run=new_tokens,
        agreement_key="text_agreement_vs_reference",
    )


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> GenBenchConfig:
    d = GenBenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, d, SYSTEMS)
    p.add_argument("--task", choices=["text-generation", "summarization"], default=d.task)
    for name in ("max_new_tokens", "num_beams", "min_words", "max_words"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    positive = ("rows", "batch_size", "max_new_tokens", "num_beams", "repeats", "threads", "shard_rows")
    return harness.config_from_args(p, p.parse_args(argv), d, SYSTEMS, positive=positive)


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
        payload, _ = run_benchmark(
            cfg, model_dir=model_dir, texts=texts, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    return report(payload, cfg)


def report(payload: dict[str, Any], cfg: GenBenchConfig) -> int:
    d = payload["data"]
    harness.print_report(
        payload,
        header=f"{cfg.task} · {payload['model']['model_type']} · {d['rows']} texts, {d['words']['min']}–"
        f"{d['words']['max']} words (mean {d['words']['mean']}), tokens {d['tokens']['min']}–{d['tokens']['max']} "
        f"(mean {d['tokens']['mean']}) · {payload['params']}",
        agreement_key="text_agreement_vs_reference",
    )
    print("(agree: share of rows whose text equals the pipeline's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
