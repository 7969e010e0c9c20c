"""Builders for the NLP span tasks' tests: tiny BERT token classifiers and extractive QA models with a
WordPiece tokenizer trained here (tests.helpers.train_wordpiece), and the tasks' stages run in-process.

Nothing is downloaded. Models are random (parity tests compare against a reference on the same weights),
except `make_span_qa_model`, whose weights are set by hand so that a known span is the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import train_wordpiece

NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _bert_config(vocab_size: int, *, hidden: int, layers: int, **kw: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        **kw,
    )


def make_token_classifier(
    out_dir: Path,
    *,
    labels: Sequence[str] = NER_LABELS,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
) -> Path:
    """A tiny random BERT token classifier (BIO labels) + trained tokenizer (128 tokens), as safetensors."""
    import torch
    from transformers import BertForTokenClassification

    tokenizer = train_wordpiece(out_dir)
    torch.manual_seed(seed)
    config = _bert_config(
        len(tokenizer),
        hidden=hidden,
        layers=layers,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    BertForTokenClassification(config).eval().save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_qa_model(out_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A tiny random BERT extractive QA model + trained tokenizer (128 tokens), as safetensors."""
    import torch
    from transformers import BertForQuestionAnswering

    tokenizer = train_wordpiece(out_dir)
    torch.manual_seed(seed)
    config = _bert_config(len(tokenizer), hidden=hidden, layers=layers)
    BertForQuestionAnswering(config).eval().save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_span_qa_model(out_dir: Path, *, start_word: str, end_word: str, hidden: int = 16) -> Path:
    """A QA model whose answer is known: from `start_word` to `end_word` of the context (when both are there
    in that order), else the null answer (CLS) is the most likely.

    No encoder layers, no position/type embeddings: a token's final hidden state is LayerNorm(its word
    embedding). `start_word` embeds along u = (1, -1, 0, ...), `end_word` along v = (0, 0, 1, -1, 0, ...),
    [CLS] along u + v, every other token as 0 (LayerNorm of 0 is 0); the start head reads u and the end
    head v. Start logits: ~17 on `start_word`, ~12 on [CLS], 0 elsewhere; end logits likewise with
    `end_word`, whatever the position.
    """
    import torch
    from transformers import BertForQuestionAnswering

    tokenizer = train_wordpiece(out_dir)
    ids = {}
    for word in (start_word, end_word):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) == 1, f"{word!r} must be a single token of the test vocabulary, got {pieces}"
        ids[word] = pieces[0]
    config = _bert_config(len(tokenizer), hidden=hidden, layers=0)
    model = BertForQuestionAnswering(config).eval()
    u = torch.zeros(hidden)
    u[0], u[1] = 1.0, -1.0
    v = torch.zeros(hidden)
    v[2], v[3] = 1.0, -1.0
    with torch.no_grad():
        emb = model.bert.embeddings
        emb.word_embeddings.weight.zero_()
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.LayerNorm.weight.fill_(1.0)
        emb.LayerNorm.bias.zero_()
        emb.word_embeddings.weight[ids[start_word]] = u
        emb.word_embeddings.weight[ids[end_word]] = v
        emb.word_embeddings.weight[tokenizer.cls_token_id] = u + v
        model.qa_outputs.weight.zero_()
        model.qa_outputs.bias.zero_()
        model.qa_outputs.weight[0] = 3.0 * u  # start logits
        model.qa_outputs.weight[1] = 3.0 * v  # end logits
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def run_task_in_process(
    task_name: str, model_dir: Path, params: Mapping[str, Any], columns: Mapping[str, list[Any]]
) -> list[dict[str, Any] | tuple[str, str]]:
    """Preprocess → runner (micro-batched as a replica does) → postprocess, without Ray.

    One result per row: the postprocessed fields, or (error_type, message) for a row that failed.
    """
    from models.registry import ROW_ID, RowError, get_task
    from pipeline.batching import run_micro_batches

    task = get_task(task_name)
    parsed = task.parse_params(params, key="params")
    n = len(next(iter(columns.values())))
    pre = task.load_preprocessor(str(model_dir), parsed)
    features = pre({**columns, ROW_ID: [str(i) for i in range(n)]})
    runner = task.load_runner(str(model_dir), parsed, device="cpu", dtype="float32")
    ok = [i for i, f in enumerate(features) if not isinstance(f, RowError)]
    rows = [features[i] for i in ok]
    result = run_micro_batches(runner.forward, rows, [runner.length(r) for r in rows], batch_size=7)
    post = task.load_postprocessor(str(model_dir), parsed)
    out: list[Any] = [None] * n
    for i, f in enumerate(features):
        if isinstance(f, RowError):
            out[i] = (f.error_type, f.message)
    for j, i in enumerate(ok):
        if result.errors[j] is not None:
            out[i] = result.errors[j]
            continue
        kept = {k: v for k, v in features[i].items() if k in task.postprocess_features}
        inputs = {k: columns[k][i] for k in task.postprocess_inputs if k in columns}
        out[i] = post(result.outputs[j], inputs=inputs, features=kept)
    return out
