"""The same job runs unchanged on a multi-node Ray cluster (`--address`), here a real 2-node
`ray.cluster_utils.Cluster` on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.commit import OutputDir, read_errors
from tests.engine.readback import assert_each_id_once
from tests.helpers import job_dict, make_texts, write_texts_parquet

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_job_runs_on_a_two_node_cluster_via_address(tiny_model, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        cluster.wait_for_nodes()
        write_texts_parquet(tmp_path / "in.parquet", make_texts(300, seed=40))
        spec = job_dict(
            input_uri=str(tmp_path / "in.parquet"),
            output_uri=str(tmp_path / "out"),
            model=str(tiny_model),
            stages=[
                {
                    "name": "s",
                    "task": "text-classification",
                    "model": str(tiny_model),
                    "inputs": {"text": "text"},
                    "replicas": 2,
                }
            ],
        )
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs",
                "run",
                str(tmp_path / "job.yaml"),
                "--address",
                cluster.address,
                "--no-progress",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
        assert (manifest["state"], manifest["rows_ok"], manifest["rows_error"]) == ("succeeded", 300, 0)
        assert len(OutputDir(str(tmp_path / "out")).committed()) == 6
        assert_each_id_once(str(tmp_path / "out"), range(300))
        assert not read_errors(str(tmp_path / "out")).num_rows
    finally:
        cluster.shutdown()
