"""`max_error_rate` at its boundaries: a job exactly at the limit passes, one bad row more fails, 0 allows no
bad row (exit 1 from the CLI), 1.0 passes even when every row is bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.errors import ErrorRateExceeded
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.engine.readback import assert_each_id_once, errors_by_id
from tests.helpers import job_dict, make_texts, write_texts_parquet

pytestmark = pytest.mark.timeout(240)

N = 100  # two 50-row shards


def _input(tmp_path: Path, bad: list[int]) -> Path:
    texts: list = make_texts(N, seed=60)
    for i in bad:
        texts[i] = None
    return write_texts_parquet(tmp_path / "in.parquet", texts)


def _job(tmp_path: Path, model: Path, max_error_rate: float) -> dict:
    return job_dict(
        input_uri=str(tmp_path / "in.parquet"),
        output_uri=str(tmp_path / "out"),
        model=str(model),
        max_error_rate=max_error_rate,
    )


def _manifest(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "_manifest.json").read_text())


@pytest.mark.parametrize(
    ("bad", "max_error_rate"),
    [(list(range(0, N, 20)), 0.05), (list(range(N)), 1.0)],
    ids=["exactly-at-limit-5-of-100", "every-row-bad-at-1.0"],
)
def test_error_rate_at_the_limit_passes(ray_session, tiny_model, tmp_path, bad, max_error_rate):
    _input(tmp_path, bad)
    result = run_inference(parse_spec(_job(tmp_path, tiny_model, max_error_rate)), progress=False)
    assert result.state == "succeeded"
    assert (result.rows_in, result.rows_ok, result.rows_error) == (N, N - len(bad), len(bad))
    manifest = _manifest(tmp_path)
    assert (manifest["state"], manifest["rows_ok"], manifest["rows_error"]) == (
        "succeeded",
        N - len(bad),
        len(bad),
    )
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert_each_id_once(str(tmp_path / "out"), range(N))
    assert set(errors_by_id(str(tmp_path / "out"))) == set(bad)


def test_one_bad_row_above_the_limit_fails(ray_session, tiny_model, tmp_path):
    _input(tmp_path, list(range(0, N, 20)) + [99])  # 6 of 100 against 5%
    with pytest.raises(ErrorRateExceeded, match="max_error_rate"):
        run_inference(parse_spec(_job(tmp_path, tiny_model, 0.05)), progress=False)
    assert _manifest(tmp_path)["state"] == "failed"
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_zero_allows_no_bad_row_and_the_cli_exits_1(ray_session, tiny_model, tmp_path, capsys):
    _input(tmp_path, [57])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(tmp_path, tiny_model, 0.0)))
    assert main(["run", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "max_error_rate" in err and "Traceback" not in err
    assert _manifest(tmp_path)["state"] == "failed"
    assert not (tmp_path / "out" / "_SUCCESS").exists()
