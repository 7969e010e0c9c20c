"""Real jobs for the report/preview tests, over tiny models built here, on the session's embedded Ray.

- text: 5 stages over one text column (generation, classification top-2, NER, QA, summarization), with a
  null row (fails in the first stage) and a prompt too long for the generator (fails in `gen`);
- vision: detection, semantic segmentation, depth and classification (top-3) of one image column;
- audio: speech recognition and audio classification (top-2) of one audio column;
- failed: one stage, a null row and max_error_rate 0 (the job fails);
- partial: the same job stopped after its first shard (`max_shards=1`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ErrorRateExceeded
from pipeline.execute import run_inference
from pipeline.metrics import EVENT_SCHEMA
from pipeline.spec import parse_spec
from tests.helpers import make_text_classifier, make_texts, write_texts_parquet

NULL_ROW, LONG_ROW = 2, 5
GEN_PARAMS = {
    "max_new_tokens": 6,
    "do_sample": False,
    "return_full_text": False,
    "handle_long_generation": "error",
}


def _stage(name: str, task: str, model: Path, inputs: dict[str, str], **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "task": task,
        "model": str(model),
        "inputs": inputs,
        "num_cpus": 0.5,
        "batch_size": 4,
        **kw,
    }


def _job(name: str, inp: Path, out: Path, stages: list[dict[str, Any]], **kw: Any) -> Any:
    spec = {
        "name": name,
        "input": {"uri": str(inp), "id_column": "id", "shard_rows": kw.pop("shard_rows", 8)},
        "stages": stages,
        "output": {"uri": str(out)},
        "max_error_rate": kw.pop("max_error_rate", 0.5),
        **kw,
    }
    return parse_spec(spec)


def text_job(root: Path) -> Path:
    from tests.models.gen_helpers import make_causal_lm, make_seq2seq
    from tests.models.nlp_helpers import make_qa_model, make_token_classifier

    texts: list[Any] = make_texts(16, seed=5, min_words=4, max_words=12)
    texts[NULL_ROW] = None
    texts[LONG_ROW] = " ".join(["film"] * 70)  # more than the generator's 64 positions
    questions = [f"what is {t.split()[0]}?" if t else None for t in texts]
    inp = write_texts_parquet(root / "text.parquet", texts, extra={"question": questions})
    out = root / "text-out"
    stages = [
        _stage(
            "gen",
            "text-generation",
            make_causal_lm(root / "gpt2", positions=64),
            {"text": "text"},
            params=GEN_PARAMS,
        ),
        _stage(
            "sentiment",
            "text-classification",
            make_text_classifier(root / "cls", num_labels=3),
            {"text": "text"},
            params={"top_k": 2},
        ),
        _stage(
            "ents",
            "token-classification",
            make_token_classifier(root / "ner"),
            {"text": "text"},
            params={"aggregation_strategy": "simple"},
        ),
        _stage(
            "qa",
            "question-answering",
            make_qa_model(root / "qa"),
            {"question": "question", "context": "text"},
        ),
        _stage(
            "summary",
            "summarization",
            make_seq2seq(root / "bart"),
            {"text": "text"},
            params={"max_new_tokens": 8},
        ),
    ]
    run_inference(_job("reviews", inp, out, stages), progress=False)
    return out


def vision_job(root: Path) -> Path:
    from tests.models.seg_depth_helpers import make_glpn, make_segformer
    from tests.models.vision_helpers import encode, make_detr, make_vit_classifier, shapes_image

    images = [encode(shapes_image(i, size=(96, 64))[0]) for i in range(6)]
    inp = root / "images.parquet"
    pq.write_table(pa.table({"id": list(range(len(images))), "image": pa.array(images, pa.binary())}), inp)
    out = root / "vision-out"
    stages = [
        _stage(
            "det", "object-detection", make_detr(root / "detr"), {"image": "image"}, params={"threshold": 0.0}
        ),
        _stage("seg", "image-segmentation", make_segformer(root / "segformer"), {"image": "image"}),
        _stage("depth", "depth-estimation", make_glpn(root / "glpn"), {"image": "image"}),
        _stage(
            "kind",
            "image-classification",
            make_vit_classifier(root / "vit"),
            {"image": "image"},
            params={"top_k": 3},
        ),
    ]
    run_inference(_job("photos", inp, out, stages, shard_rows=3), progress=False)
    return out


def audio_job(root: Path) -> Path:
    from tests.models.audio_helpers import (
        encode,
        make_audio_classifier,
        make_ctc_model,
        sound,
        write_audio_parquet,
    )

    kinds = ["chirps", "noise", "hum", "whistle"]
    clips = [encode(sound(k, 0.6 + 0.2 * i, seed=i)) for i, k in enumerate(kinds)]
    inp = write_audio_parquet(root / "audio.parquet", clips)
    out = root / "audio-out"
    stages = [
        _stage("asr", "automatic-speech-recognition", make_ctc_model(root / "ctc"), {"audio": "audio"}),
        _stage(
            "intent",
            "audio-classification",
            make_audio_classifier(root / "audiocls"),
            {"audio": "audio"},
            params={"top_k": 2},
        ),
    ]
    run_inference(_job("speech", inp, out, stages), progress=False)
    return out


def failed_and_partial_jobs(root: Path) -> tuple[Path, Path]:
    """(an output whose job failed on its error rate, an output stopped after its first shard)."""
    texts: list[Any] = make_texts(24, seed=9, max_words=8)
    texts[20] = None  # in the last shard: the partial run never reaches it
    inp = write_texts_parquet(root / "small.parquet", texts)
    model = make_text_classifier(root / "cls-small", num_labels=2)
    stages = [_stage("s", "text-classification", model, {"text": "text"})]
    failed = root / "failed-out"
    try:
        run_inference(_job("strict", inp, failed, stages, max_error_rate=0.0), progress=False)
    except ErrorRateExceeded:
        pass
    else:
        raise AssertionError("the strict job should fail on its null row")
    partial = root / "partial-out"
    run_inference(_job("stopped", inp, partial, stages), progress=False, max_shards=1)
    return failed, partial


def interrupt(output: Path) -> None:
    """Make `output` look like the output of a killed driver: the manifest says running, no lease."""
    path = output / "_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["state"] = "running"
    path.write_text(json.dumps(manifest))
    (output / "_lease.json").unlink(missing_ok=True)


# --- runtime metrics in the documented format (/_metrics/runtime/<run_id>/, format v1) -----------------


def write_runtime_metrics(output: Path, stages: list[str], *, shards: int = 6, rows: int = 32) -> str:
    """Write one run's events, run.json and summary.json as the metrics writer does: per shard a read, per
    stage a preprocess, micro-batches of 8 through 2 replicas and a postprocess, then a commit. Returns the
    run id."""
    manifest = json.loads((output / "_manifest.json").read_text())
    run_id = manifest["runs"][-1]["run_id"]
    folder = output / "_metrics" / "runtime" / run_id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t0 = float(manifest["runs"][-1]["started_at"])
    events: list[dict[str, Any]] = []

    def event(
        stage: str | None, step: str, shard: int, worker: str, t: float, sec: float, n: int, **kw: Any
    ) -> None:
        events.append(
            {
                "run_id": run_id,
                "stage": stage,
                "step": step,
                "shard": f"{shard:05d}",
                "worker": worker,
                "t_start": t,
                "seconds": sec,
                "rows": n,
                "rows_error": kw.get("rows_error", 0),
                "real_units": kw.get("real"),
                "padded_units": kw.get("padded"),
                "unit": kw.get("unit"),
                "error_types": kw.get("error_types"),
            }
        )

    for shard in range(shards):
        t = t0 + 1.0 + shard * 2.0
        event(None, "read", shard, "100@node", t, 0.05, rows)
        t += 0.05
        for k, stage in enumerate(stages):
            event(stage, "preprocess", shard, "101@node", t, 0.1, rows)
            t += 0.1
            for b in range(rows // 8):
                sec = float(0.05 + 0.02 * k + rng.exponential(0.02))
                lengths = rng.integers(5, 30, size=8)
                event(
                    stage,
                    "forward",
                    shard,
                    f"replica{k}{b % 2}",
                    t + b * 0.01,
                    sec,
                    8,
                    real=int(lengths.sum()),
                    padded=int(lengths.max() * 8),
                    unit="tokens",
                )
            t += 0.3
            event(stage, "postprocess", shard, "102@node", t, 0.05, rows)
            t += 0.05
        event(None, "commit", shard, "103@node", t, 0.02, rows)
    table = pa.Table.from_pylist(events, schema=EVENT_SCHEMA)
    pq.write_table(table, folder / "events-000000.parquet")
    (folder / "run.json").write_text(
        json.dumps(
            {
                "format": 1,
                "run_id": run_id,
                "name": manifest["name"],
                "started_at": t0,
                "rows_total": shards * rows,
                "shards_total": shards,
                "shards_todo": shards,
                "stages": [{"name": s, "task": "text-classification", "unit": "tokens"} for s in stages],
            }
        )
    )
    fwd = [e for e in events if e["step"] == "forward"]
    summary_stages = {}
    for s in stages:
        mine = [e for e in fwd if e["stage"] == s]
        secs = np.array([e["seconds"] for e in mine])
        real, padded = sum(e["real_units"] for e in mine), sum(e["padded_units"] for e in mine)
        replicas = sorted({e["worker"] for e in mine})
        summary_stages[s] = {
            "task": "text-classification",
            "unit": "tokens",
            "rows_in": shards * rows,
            "rows_ok": shards * rows,
            "rows_error": 0,
            "rows_per_s": shards * rows / 12.0,
            "forward": {
                "micro_batches": len(mine),
                "rows": 8 * len(mine),
                "rows_per_batch_mean": 8.0,
                "seconds": float(secs.sum()),
                "latency_s": {
                    "mean": float(secs.mean()),
                    "p50": float(np.median(secs)),
                    "p95": float(np.percentile(secs, 95)),
                    "max": float(secs.max()),
                },
                "real_units": real,
                "padded_units": padded,
                "padding_efficiency": real / padded,
            },
            "replicas": len(replicas),
            "busy_share": 0.4,
            "replica_busy": {r: 0.3 + 0.1 * i for i, r in enumerate(replicas)},
            "waiting_max": {"forward": rows, "postprocess": 8},
        }
    end = max(e["t_start"] + e["seconds"] for e in events)
    summary = {
        "format": 1,
        "run_id": run_id,
        "name": manifest["name"],
        "state": "succeeded",
        "reason": None,
        "started_at": t0,
        "finished_at": end,
        "wall_s": end - t0,
        "rows_run": shards * rows,
        "rows_error_run": 0,
        "shards_run": shards,
        "rows_per_s": shards * rows / (end - t0),
        "first_commit_s": 1.7,
        "events": len(events),
        "steps": [],
        "stages": summary_stages,
        "errors": [],
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return run_id
