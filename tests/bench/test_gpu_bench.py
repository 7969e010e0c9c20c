"""`make bench-gpu`'s entry point (python -m bench.gpu) on CPU at tiny sizes: `pack --tiny` writes the
synthetic assets, `run --tiny --device cpu` runs all four benchmarks through the same code as the GPU run
and prints one ratio to an anchor per system; every ratio exists and is positive. The figures themselves
are meaningless (tiny models on a shared CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu


@pytest.mark.slow  # eight Ray Data jobs (shardwise + naive per benchmark) on tiny models
@pytest.mark.timeout(600)  # ~60 s on a quiet 2-core machine; minutes under load
def test_tiny_cpu_run_prints_positive_ratios_for_every_system(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assets = gpu.pack(tmp_path / "device", tiny=True, ray=False, log=lambda _: None)
    assert (assets / "texts.parquet").exists() and (assets / "speech.flac").exists()

    rc = gpu.main(
        [
            "run",
            "--assets",
            str(assets),
            "--tiny",
            "--device",
            "cpu",
            "--results-dir",
            str(tmp_path / "results"),
        ]
    )

    assert rc == 0
    printed = capsys.readouterr().out
    saved = json.loads(next((tmp_path / "results").glob("gpu-*.json")).read_text())
    assert saved["tiny"] is True and set(saved["benchmarks"]) == set(gpu.BENCHMARKS)
    for name, res in saved["benchmarks"].items():
        systems = set(res["ratios"])
        assert {"model_only", "pipeline", "shardwise", "naive_ray"} <= systems, name
        for system, r in res["ratios"].items():
            assert r["rate"] > 0 and r["anchor"] > 0 and r["ratio"] > 0, (name, system, r)
            assert r["ratio"] == pytest.approx(r["rate"] / r["anchor"], rel=1e-2)
            line = next(ln for ln in printed.splitlines() if ln.startswith(f"{name:<22}{system:<12}"))
            assert float(line.split()[-1 - len(r["anchor_is"].split())].rstrip("x")) > 0, line
