"""`test-faulty`: text-classification that fails on chosen rows, in a chosen step (test-only task).

It wraps the real text-classification preprocess, runner and postprocess, so every row without a marker
gets exactly the prediction a plain text-classification job gives. A marker word in a row's text picks the
failure:

    FAIL_PREPROCESS   the preprocess call raises PreprocessFault for the whole batch whenever the batch holds
                      such a row (the engine must retry row by row: only the marked rows may fail)
    SHORT_PREPROCESS  the preprocess call returns no result for the row (one result too few)
    FAIL_FORWARD      the runner's forward raises ForwardFault for any micro-batch holding the row
    SHORT_FORWARD     forward returns one output too few (the row's is left out)
    EMPTY_FORWARD     forward returns an empty output for the row (nothing to postprocess)
    FAIL_POSTPROCESS  postprocess raises PostprocessFault for the row

Messages name the row id, so a test can check that each error record carries its own row's error.

Its params may only be parsed on the driver: workers get the bound stage (parsed params) and must never parse
a spec again, so `parse_params` raises inside a Ray worker (`WorkerParsedParams`, failing the job).
Ray workers find this module through `SHARDWISE_TASK_MODULES` (set by the `ray_session` fixture).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from models.registry import ROW_ID, RowError, register_task
from models.text_classification import TextClassification, TextClassificationParams

# Feature codes the preprocessor attaches to rows the runner must fail.
_FORWARD_CODES = {"FAIL_FORWARD": 1, "SHORT_FORWARD": 2, "EMPTY_FORWARD": 3}


class PreprocessFault(Exception):
    pass


class ForwardFault(Exception):
    pass


class PostprocessFault(Exception):
    pass


class WorkerParsedParams(Exception):
    pass


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _markers(text: Any) -> set[str]:
    return {w for w in text.split() if w.isupper()} if isinstance(text, str) else set()


class _Preprocessor:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        texts, ids = columns["text"], columns[ROW_ID]
        markers = [_markers(t) for t in texts]
        failing = [ids[i] for i, m in enumerate(markers) if "FAIL_PREPROCESS" in m]
        if failing:
            raise PreprocessFault(f"preprocess failed on row {failing[0]}")
        out = self.inner(columns)
        for i, m in enumerate(markers):
            if not isinstance(out[i], dict) or not m:
                continue
            out[i] = {**out[i], "row": np.array([int(ids[i])])}
            codes = [_FORWARD_CODES[w] for w in m if w in _FORWARD_CODES]
            if codes:
                out[i]["fault"] = np.array(codes[:1], np.int8)
        return [r for m, r in zip(markers, out, strict=True) if "SHORT_PREPROCESS" not in m]


class _Runner:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def length(self, features: Mapping[str, Any]) -> int:
        return self.inner.length(features)

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        codes = [int(f["fault"][0]) if "fault" in f else 0 for f in batch]
        if 1 in codes:
            raise ForwardFault(f"forward failed on row {int(batch[codes.index(1)]['row'][0])}")
        outputs = self.inner.forward(batch)
        outputs = [{} if code == 3 else out for code, out in zip(codes, outputs, strict=True)]
        return [out for code, out in zip(codes, outputs, strict=True) if code != 2]


class _Postprocessor:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        if "FAIL_POSTPROCESS" in _markers(inputs["text"]):
            raise PostprocessFault(f"postprocess failed on row {int(features['row'][0])}")
        return self.inner(output, inputs=inputs, features=features)


@register_task("test-faulty")
class FaultyTextClassification:
    name = "test-faulty"
    length_unit = "tokens"  # what its runner.length counts, for the job metrics (pipeline.metrics.unit_of)
    inputs = {"text": True}
    description = "Test only: text-classification that fails on rows carrying a marker word."
    postprocess_inputs = ("text",)
    postprocess_features = ("row",)

    def __init__(self) -> None:
        self.real = TextClassification()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> TextClassificationParams:
        if _in_ray_worker():
            raise WorkerParsedParams("a Ray worker parsed a stage's params: workers must get the bound stage")
        return self.real.parse_params(params, key=key)

    def output_schema(self, params: TextClassificationParams) -> pa.Schema:
        return self.real.output_schema(params)

    def load_preprocessor(self, model_dir: str, params: TextClassificationParams) -> _Preprocessor:
        return _Preprocessor(self.real.load_preprocessor(model_dir, params))

    def load_runner(
        self, model_dir: str, params: TextClassificationParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(self.real.load_runner(model_dir, params, device=device, dtype=dtype))

    def load_postprocessor(self, model_dir: str, params: TextClassificationParams) -> _Postprocessor:
        return _Postprocessor(self.real.load_postprocessor(model_dir, params))
