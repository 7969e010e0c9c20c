"""Fine-tuning keeps credentials out of its run fingerprint: a rotated key resumes the same run, another
endpoint is another run, and the secret is in none of the hashed text."""

from __future__ import annotations

import json

import pyarrow as pa

from jobs.finetune import _fingerprint
from pipeline.spec import parse_spec
from pipeline.train.data import TrainingData

SECRET = "S3CR3T-finetune"


def _spec(*, secret: str, endpoint: str = "http://127.0.0.1:9000"):
    options = {"endpoint_url": endpoint, "key": "AKIA-TEST", "secret": secret}
    return parse_spec(
        {
            "name": "ft",
            "kind": "finetune",
            "input": {"uri": "s3://bucket/train.parquet", "storage_options": options},
            "stages": [
                {"name": "c", "task": "text-classification", "model": "/m", "inputs": {"text": "text"}}
            ],
            "output": {"uri": "/tmp/out"},
            "train": {"eval_input": {"uri": "s3://bucket/eval.parquet", "storage_options": options}},
        }
    )


def test_run_fingerprint_ignores_credentials_but_not_the_endpoint(monkeypatch):
    data = TrainingData(
        train=pa.table({"text": ["a"]}), eval=None, label_names=("neg", "pos"), listing=[["f", 1]]
    )
    hashed: list[str] = []
    real_dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda obj, **kw: hashed.append(real_dumps(obj, **kw)) or hashed[-1])

    first = _fingerprint(_spec(secret=SECRET), data, {"uri": "/m"})
    rotated = _fingerprint(_spec(secret="S3CR3T-rotated"), data, {"uri": "/m"})
    moved = _fingerprint(_spec(secret=SECRET, endpoint="http://10.0.0.1:9000"), data, {"uri": "/m"})

    assert first == rotated
    assert first != moved
    assert hashed and not any(SECRET in text or "AKIA-TEST" in text for text in hashed)
