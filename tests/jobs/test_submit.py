"""`shardwise submit` and `shardwise jobs ...` against a real 2-node Ray cluster on 127.0.0.1 (head with
the job server, plus a worker node), token authentication on. The job drivers run on the cluster."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.commit import OutputDir, read_output
from tests.helpers import job_dict, make_text_classifier, make_texts, write_texts_parquet
from tests.jobs.ray_nodes import start_cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(pythonpath=str(ROOT), head_cpus=4, worker_cpus=2)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cli(cluster, monkeypatch, capsys):
    """`shardwise ...` in this process against the test cluster; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, "--address", cluster.address])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_text_classifier(tmp_path_factory.mktemp("submit-bert"), num_labels=3)


def _spec(tmp_path: Path, model: Path, *, rows: int, shard_rows: int, words: int = 60, name: str) -> Path:
    write_texts_parquet(tmp_path / "in.parquet", make_texts(rows, seed=rows, max_words=words))
    spec = job_dict(
        input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(model)
    )
    spec["name"] = name
    spec["input"]["shard_rows"] = shard_rows
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _job_ids(cli) -> list[str]:
    code, out, _ = cli("jobs", "list", "--json")
    assert code == 0
    return [j["submission_id"] for j in json.loads(out)]


def _exactly_once(out_dir: Path, rows: int) -> None:
    ids = read_output(str(out_dir)).column("id").to_pylist()
    assert sorted(ids) == list(range(rows))  # every input id, exactly once


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_specs_and_unseen_paths_never_reach_the_cluster(cluster, cli, model, tmp_path, monkeypatch):
    before = _job_ids(cli)
    good = _spec(tmp_path, model, rows=20, shard_rows=10, name="refused")
    data = yaml.safe_load(good.read_text())

    data["stages"][0]["batch_sise"] = 8
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(data))
    code, _, err = cli("submit", str(tmp_path / "typo.yaml"), "--local-paths-ok")
    assert code == 2 and "stages[0].batch_sise" in err and "batch_size" in err

    # The driver's cwd on the cluster is not ours: relative paths are refused even with --local-paths-ok.
    code, _, err = cli("submit", str(good), "--local-paths-ok", "--set", "output.uri=out/rel")
    assert code == 2 and "output.uri" in err and "relative" in err

    # An absolute path on this machine needs the explicit flag.
    code, _, err = cli("submit", str(good))
    assert code == 2 and "input.uri" in err and "--local-paths-ok" in err

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    code, _, err = cli("submit", str(good), "--local-paths-ok")
    assert code == 2 and "token" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = cli("submit", str(good), "--local-paths-ok")
    assert code == 2 and "token" in err
    (tmp_path / "token").write_text(cluster.token + "\n")
    code, out, err = cli("jobs", "list", "--auth-token-file", str(tmp_path / "token"))
    assert code == 0, err
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)

    # `schedule --submit` refuses the same way at each tick, and the schedule goes on.
    from jobs.schedule import SubmitRun

    summary = SubmitRun(str(tmp_path / "typo.yaml"), address=cluster.address, local_paths_ok=True)()
    assert (summary.state, summary.exit_code) == ("refused", 2) and "batch_sise" in summary.reason

    assert _job_ids(cli) == before  # nothing was submitted
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_runs_the_driver_on_the_cluster_and_follows_its_logs(cluster, cli, model, tmp_path):
    spec = _spec(tmp_path, model, rows=100, shard_rows=50, name="tiny submit")
    started = time.monotonic()
    code, out, _ = cli("submit", str(spec), "--local-paths-ok")
    assert code == 0
    job_id = out.strip()
    assert job_id.startswith("shardwise-tiny-submit-")
    assert time.monotonic() - started < 30  # returns once submitted, not when the job is done

    code, logs, err = cli("jobs", "logs", job_id, "--follow")
    assert code == 0, logs[-3000:] + err
    assert "succeeded: 100 rows ok, 0 errors" in logs  # the driver's own summary line, from the cluster
    _exactly_once(tmp_path / "out", 100)

    code, out, _ = cli("jobs", "status", job_id, "--json")
    info = json.loads(out)
    assert info["status"] == "SUCCEEDED" and info["name"] == "tiny submit"
    assert info["output"] == str(tmp_path / "out")
    code, logs, _ = cli("jobs", "logs", job_id)
    assert code == 0 and "succeeded: 100 rows ok" in logs

    # What `schedule --submit` does at a tick: submit, wait for the end, summarise from the manifest.
    from jobs.schedule import SubmitRun

    summary = SubmitRun(str(spec), address=cluster.address, local_paths_ok=True, poll_s=0.5)()
    assert (summary.state, summary.exit_code, summary.rows_ok, summary.rows_error) == ("succeeded", 0, 100, 0)
    assert summary.job_id in _job_ids(cli) and summary.job_id != job_id
    _exactly_once(tmp_path / "out", 100)  # the rerun found every shard committed


# Timeouts guard against hangs, not speed: each driver start imports torch + transformers on the cluster
# (~15 s on a quiet 2-core machine, 100-150 s measured at load average 40-50 on the shared one).
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_job_resumes_on_resubmit_without_recomputing_committed_shards(
    cluster, cli, model, tmp_path
):
    rows, shard_rows = 600, 20
    spec = _spec(tmp_path, model, rows=rows, shard_rows=shard_rows, name="big submit")
    out_dir = tmp_path / "out"
    code, out, _ = cli("submit", str(spec), "--local-paths-ok")
    assert code == 0
    first = out.strip()

    deadline = time.monotonic() + 400
    while len(list((out_dir / "_shards").glob("*.json"))) < 2:
        assert time.monotonic() < deadline, "no shard was committed in time"
        time.sleep(0.2)
    code, out, _ = cli("jobs", "stop", first)
    assert code == 0 and "STOPPED" in out and "resume" in out
    code, out, _ = cli("jobs", "status", first)
    assert "STOPPED" in out

    time.sleep(2)  # a commit already in flight when the driver was killed may still land
    before = OutputDir(str(out_dir)).read_records()
    assert 0 < len(before) < rows // shard_rows, "stopped mid-run"
    parts_before = {s: (out_dir / f"part-{s}.parquet").stat().st_mtime_ns for s in before}

    code, out, _ = cli("submit", str(spec), "--local-paths-ok", "--wait", "120")
    assert code == 0
    second = out.strip()
    code, logs, err = cli("jobs", "logs", second, "--follow")
    assert code == 0, logs[-3000:] + err
    skipped = re.search(r"(\d+) already committed\)", logs)
    assert skipped and int(skipped.group(1)) >= len(before), logs[-2000:]

    _exactly_once(out_dir, rows)
    after = OutputDir(str(out_dir)).read_records()
    assert len(after) == rows // shard_rows
    for shard, record in before.items():  # committed before the stop: not computed again
        assert (after[shard].run_id, after[shard].committed_at) == (record.run_id, record.committed_at)
        assert (out_dir / f"part-{shard}.parquet").stat().st_mtime_ns == parts_before[shard]
    new_runs = {r.run_id for shard, r in after.items() if shard not in before}
    assert len(new_runs) == 1 and not new_runs & {r.run_id for r in before.values()}

    code, out, _ = cli("jobs", "list")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "STOPPED" in lines[first] and "SUCCEEDED" in lines[second] and "big submit" in lines[first]


def test_local_path_rules_without_a_cluster(tmp_path, monkeypatch):
    """The rules alone (no Ray): URIs and hub ids pass, memory:// and relative paths never do."""
    from jobs.submit import check_paths
    from pipeline.errors import SpecError
    from pipeline.spec import parse_spec

    def spec(**over):
        data = job_dict(input_uri="s3://b/in.parquet", output_uri="s3://b/out", model="org/tiny-bert")
        for key, value in over.items():
            section, _, field = key.partition("__")
            (data["stages"][0] if section == "stage" else data[section])[field] = value
        return parse_spec(data)

    check_paths(spec())  # URIs and a hub id: fine
    monkeypatch.chdir(tmp_path)
    for over, key in (
        ({"input__uri": "memory://x/in.parquet"}, "input.uri"),
        ({"output__uri": "out"}, "output.uri"),
        ({"output__uri": "~/out"}, "output.uri"),
        ({"stage__model": "./models/bert"}, "stages[0].model"),
        ({"input__uri": "file:///data/in.parquet"}, "input.uri"),
    ):
        with pytest.raises(SpecError) as e:
            check_paths(spec(**over), local_paths_ok=over.get("input__uri", "").startswith("memory"))
        assert e.value.key == key
    check_paths(spec(input__uri="file:///data/in.parquet"), local_paths_ok=True)
    (tmp_path / "bert").mkdir()  # a folder that exists here is a local path, not a hub id
    with pytest.raises(SpecError, match="relative"):
        check_paths(spec(stage__model="bert"), local_paths_ok=True)
