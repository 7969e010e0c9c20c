"""Fixtures for engine tests: one embedded Ray cluster per session, a tiny trained-tokenizer BERT."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_text_classifier


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray cluster with 4 logical CPUs: 2 replicas + a read task + a commit task always fit."""
    import ray

    from pipeline.execute import init_ray

    init_ray(address=None, num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_text_classifier(tmp_path_factory.mktemp("tiny-bert"), num_labels=3)
