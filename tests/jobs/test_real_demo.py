"""The real path, offline: MiniLM fine-tuned on Rotten Tomatoes reviews with Ray Train, then the test split
annotated by an inference job. What `make demo` runs, at its default size."""

from __future__ import annotations

import pytest

from jobs.demo import run_demo


@pytest.mark.real_assets
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_minilm_rotten_tomatoes_finetune_then_annotate_reaches_75_percent(tmp_path):
    result = run_demo(tmp_path, n_train=4000, n_test=1000, epochs=1, log=lambda _msg: None)
    assert result.test_rows == 1000
    assert result.accuracy >= 0.75, f"test accuracy {result.accuracy:.1%}"
