"""Inference refuses weights the checkpoint lacks: a base encoder (saved without a classification head, as
MiniLM is shipped) used for text-classification would otherwise predict with a random head and no warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import get_task
from pipeline.errors import ModelError, ShardwiseError
from tests.helpers import job_dict, make_texts, train_wordpiece, write_texts_parquet


@pytest.fixture(scope="module")
def base_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved as a bare `BertModel` (encoder + pooler, no task head) with its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("bert-base")
    tokenizer = train_wordpiece(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out, safe_serialization=True)
    return out


def test_base_encoder_for_text_classification_is_refused_naming_the_head(base_encoder):
    task = get_task("text-classification")
    params = task.parse_params({}, key="params")
    with pytest.raises(ModelError) as info:
        task.load_runner(str(base_encoder), params, device="cpu", dtype="float32")
    message = str(info.value)
    assert str(base_encoder) in message
    assert "classifier.weight" in message and "classifier.bias" in message
    assert "kind: finetune" in message and "fine-tuned folder" in message


def test_base_encoder_for_token_classification_is_refused(base_encoder):
    task = get_task("token-classification")
    params = task.parse_params({}, key="params")
    with pytest.raises(ModelError, match="classifier.weight"):
        task.load_runner(str(base_encoder), params, device="cpu", dtype="float32")


def test_a_model_with_its_head_loads(tmp_path):
    from tests.helpers import make_text_classifier

    model = make_text_classifier(tmp_path / "clf")
    task = get_task("text-classification")
    runner = task.load_runner(str(model), task.parse_params({}, key="params"), device="cpu", dtype="float32")
    assert not runner.model.training


@pytest.mark.slow  # Ray Data retries a failing actor constructor before it gives up
@pytest.mark.timeout(240)
def test_a_job_on_a_base_encoder_fails(ray_session, base_encoder, tmp_path):
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    write_texts_parquet(tmp_path / "in.parquet", make_texts(20, seed=3))
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(base_encoder)
        )
    )
    with pytest.raises(ShardwiseError) as info:
        run_inference(spec, progress=False)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    # The driver reports the replica's root cause, not Ray's wrapper: the user reads the missing head and the fix.
    message = str(info.value)
    assert "classifier.weight" in message and str(base_encoder) in message and "kind: finetune" in message
