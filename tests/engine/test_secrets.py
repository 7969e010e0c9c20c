"""Secrets never persist: a real job reads from and writes to S3 with credentials in its spec, and the
secret appears in no output object and in nothing the job logged or printed."""

from __future__ import annotations

import io
import logging
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.helpers import job_dict, make_texts


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_storage_secret_is_in_no_output_object_and_no_log(
    ray_session, tiny_model, s3_server, s3_bucket, capfd, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = f"S3CR3T-{uuid.uuid4().hex}"  # moto accepts any secret
    options = {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": secret}
    fs = fsspec.filesystem("s3", **options)
    buf = io.BytesIO()
    texts = make_texts(60, seed=11)
    pq.write_table(pa.table({"id": list(range(60)), "text": texts}), buf)
    fs.pipe(f"{s3_bucket}/in/part-0.parquet", buf.getvalue())
    spec = job_dict(
        input_uri=f"s3://{s3_bucket}/in/part-0.parquet",
        output_uri=f"s3://{s3_bucket}/out",
        model=str(tiny_model),
    )
    spec["input"]["storage_options"] = dict(options)
    spec["output"]["storage_options"] = dict(options)

    result = run_inference(parse_spec(spec), progress=True)
    assert result.state == "succeeded" and result.rows_ok == 60

    objects = fs.find(f"{s3_bucket}/out")
    assert any(o.endswith("_manifest.json") for o in objects) and any(o.endswith(".parquet") for o in objects)
    holding = [o for o in objects if secret.encode() in fs.cat_file(o)]
    captured = capfd.readouterr()
    assert secret not in captured.out and secret not in captured.err
    assert secret not in caplog.text
    assert [o for o in holding if not o.endswith("/_manifest.json")] == []
    assert holding == [], f"the secret is stored in {holding}"
