"""Builders for tiny real things the tests use: a WordPiece tokenizer trained here, tiny BERT models,
Parquet inputs. Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "the a movie film great terrible plot actor acting was is and but not very good bad boring fun "
    "story scene music ending slow fast loved hated it this that of to in with for on an best worst "
    "ever funny sad long short beautiful ugly script director cast brilliant awful charming dull"
).split()


def make_texts(n: int, *, seed: int = 0, min_words: int = 1, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def train_wordpiece(out_dir: Path, *, vocab_size: int = 200) -> Any:
    """A BERT-style uncased WordPiece tokenizer trained on the test vocabulary, saved to out_dir."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(make_texts(2000, seed=1) + WORDS, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=128)
    fast.save_pretrained(out_dir)
    return fast


def make_text_classifier(
    out_dir: Path, *, num_labels: int = 3, seed: int = 0, layers: int = 2, hidden: int = 32
) -> Path:
    """A tiny random BERT sequence classifier + trained tokenizer, saved as safetensors."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_wordpiece(out_dir)
    torch.manual_seed(seed)
    labels = (
        ["negative", "neutral", "positive", "mixed", "other"][:num_labels]
        if num_labels <= 5
        else [f"L{i}" for i in range(num_labels)]
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_texts_parquet(
    path: Path,
    texts: list[Any],
    *,
    row_group_size: int | None = None,
    extra: dict[str, list[Any]] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"id": list(range(len(texts))), "text": pa.array(texts, pa.string())}
    data.update(extra or {})
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return path


def job_dict(
    *, input_uri: str, output_uri: str, model: str, task: str = "text-classification", **overrides: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "test-job",
        "input": {"uri": input_uri, "id_column": "id", "shard_rows": 50},
        "stages": [{"name": "s", "task": task, "model": model, "inputs": {"text": "text"}, "batch_size": 16}],
        "output": {"uri": output_uri},
    }
    for key, value in overrides.items():
        spec[key] = value
    return spec
