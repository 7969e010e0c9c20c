"""Fixtures for engine tests: a tiny trained-tokenizer BERT (the Ray cluster is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_text_classifier


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_text_classifier(tmp_path_factory.mktemp("tiny-bert"), num_labels=3)
