"""Inference job entry point: what `shardwise run` calls for `kind: inference`, usable from Python too.

from jobs.inference import run
from pipeline.spec import load_spec
result = run(load_spec("jobs/examples/rt-sentiment.yaml"))
"""

from __future__ import annotations

from pipeline.errors import SpecError
from pipeline.execute import JobResult, run_inference
from pipeline.spec import JobSpec

__all__ = ["run"]


def run(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
    verify_input: bool = False,
    wait_s: float = 0.0,
) -> JobResult:
    """Run or resume `spec` to completion; raises a ShardwiseError subclass with the reason otherwise."""
    if spec.kind != "inference":
        raise SpecError(
            "kind", f"jobs.inference.run takes kind: inference, got {spec.kind!r}; use jobs.finetune"
        )
    return run_inference(
        spec,
        address=address,
        overwrite=overwrite,
        progress=progress,
        verify=verify,
        verify_input=verify_input,
        wait_s=wait_s,
    )
