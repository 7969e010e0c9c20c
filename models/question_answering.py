"""question-answering (extractive): any `AutoModelForQuestionAnswering` with a fast tokenizer.

transformers 5 removed the question-answering pipeline; this task keeps its 4.x names and behaviour:
inputs `question` and `context`; params `top_k`, `doc_stride`, `max_seq_len`, `max_question_len`,
`max_answer_len`, `handle_impossible_answer`, `align_to_words` with the 4.x defaults; output `answer`,
`score`, `start`, `end` (character offsets into `context`, `answer == context[start:end]`), plus `answers`
(the best `top_k`, best first) when `top_k > 1`.

How (as in 4.x with a fast tokenizer):
- The question and the context are tokenized as a pair, `truncation="only_second"` (context first for
  tokenizers that pad on the left), `max_length=max_seq_len`, `stride=doc_stride`,
  `return_overflowing_tokens=True`: a long context becomes windows that overlap by `doc_stride` tokens,
  each with the whole question.
- Per window, `select_starts_ends` (the 4.x pipeline's function, which transformers 5 still ships in
  `pipelines/document_question_answering.py`) masks every token that is not context (CLS is kept for the
  null answer), softmaxes start and end logits over the window, scores a span as p(start)·p(end) with
  start <= end and length <= max_answer_len, and keeps the window's best `top_k`.
- Spans from all windows are ranked by score; the null answer ("" at 0..0, scored by the lowest CLS score
  of any window) joins them when `handle_impossible_answer`. Character offsets come from the offset
  mapping, widened to whole words when `align_to_words` (4.x's `token_to_word` + `word_to_chars`).

`max_question_len` truncates the question to that many tokens, as the 4.x docs say (its fast-tokenizer path
ignored it and failed on over-long questions instead). Where the question leaves less than twice the default
`doc_stride` of context room, the default is lowered for that row (4.x failed there too); an explicit
`doc_stride` is kept, and a row it does not fit is an error record. Null, non-string or empty question/context, and a
question that leaves no room for the context in `max_seq_len`, are error records.

Fine-tuning (`training()`): SQuAD-style answers → start/end token positions per window, see
`QuestionAnsweringTrainable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from models.loading import load_pretrained
from models.metrics import epoch_metrics, qa_metrics
from models.registry import RowError, parse_params_dataclass, register_task
from models.text import check_text, load_tokenizer, model_max_length, pad_token_id, pad_tokens
from pipeline.errors import SpecError

__all__ = [
    "QuestionAnswering",
    "QuestionAnsweringParams",
    "QuestionAnsweringTrainable",
    "QuestionAnsweringTrainingOptions",
]

# 4.x defaults: windows of at most 384 tokens (or the model's limit if lower) that overlap by half a
# window, capped at 128 tokens.
_DEFAULT_MAX_SEQ_LEN = 384
_DEFAULT_MAX_STRIDE = 128


@dataclass(frozen=True)
class QuestionAnsweringParams:
    top_k: int = 1
    # None: min(max_seq_len // 2, 128).
    doc_stride: int | None = None
    # None: min(the model's limit, 384).
    max_seq_len: int | None = None
    max_question_len: int = 64
    max_answer_len: int = 15
    handle_impossible_answer: bool = False
    align_to_words: bool = True


_ANSWER = pa.struct(
    [("answer", pa.string()), ("score", pa.float64()), ("start", pa.int64()), ("end", pa.int64())]
)


def _load_fast_tokenizer(model_dir: str) -> Any:
    return load_tokenizer(
        model_dir, fast_for="question-answering needs a fast one for character offsets and context windows"
    )


_model_limit = model_max_length  # the name the training code uses


def _check_text(value: Any, name: str) -> str | RowError:
    if value is None:
        return RowError("InvalidInput", f"input {name!r} is null; expected a non-empty string")
    text = check_text(value, name)
    if isinstance(text, str) and not text.strip():
        return RowError("InvalidInput", f"input {name!r} is empty; a question and a context are both needed")
    return text


def _truncate_question(tokenizer: Any, question: str, max_tokens: int) -> tuple[str, int]:
    """The question cut after its `max_tokens`-th token (at that token's last character), and its length."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if n <= max_tokens:
        return question, n
    return question[: enc["offset_mapping"][max_tokens - 1][1]], max_tokens


def _pair(tokenizer: Any, question: str, context: str, *, max_len: int, stride: int, **kw: Any) -> Any:
    """The 4.x windowed encoding: question + context, only the context truncated and windowed."""
    question_first = tokenizer.padding_side == "right"
    return tokenizer(
        text=question if question_first else context,
        text_pair=context if question_first else question,
        truncation="only_second" if question_first else "only_first",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        **kw,
    )


def _stride(requested: int | None, max_seq_len: int, room: int) -> int:
    """`doc_stride`, or the 4.x default min(max_seq_len // 2, 128) lowered to half the room a long question
    leaves (4.x failed on such rows: windows must advance)."""
    if requested is not None:
        return requested
    return min(max_seq_len // 2, _DEFAULT_MAX_STRIDE, max(room, 0) // 2)


class _Preprocessor:
    def __init__(self, model_dir: str, params: QuestionAnsweringParams) -> None:
        self.tokenizer = _load_fast_tokenizer(model_dir)
        limit = model_max_length(model_dir, self.tokenizer)
        self.max_seq_len = min(params.max_seq_len or _DEFAULT_MAX_SEQ_LEN, limit)
        if params.max_seq_len is not None and params.max_seq_len > limit:
            raise SpecError(
                "params.max_seq_len",
                f"is {params.max_seq_len} but the model takes at most {limit} tokens; lower it or leave it null",
            )
        # None: the 4.x default, lowered per row where a long question leaves less room (see _row).
        self.doc_stride = params.doc_stride
        self.max_question_len = params.max_question_len
        self.align_to_words = params.align_to_words
        self.context_index = 1 if self.tokenizer.padding_side == "right" else 0
        self.specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        self.pad_id = pad_token_id(self.tokenizer)

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        return [self._row(q, c) for q, c in zip(columns["question"], columns["context"], strict=True)]

    def _row(self, question_value: Any, context_value: Any) -> dict[str, Any] | RowError:
        question = _check_text(question_value, "question")
        if isinstance(question, RowError):
            return question
        context = _check_text(context_value, "context")
        if isinstance(context, RowError):
            return context
        question, q_len = _truncate_question(self.tokenizer, question, self.max_question_len)
        room = self.max_seq_len - q_len - self.specials  # context tokens per window
        stride = _stride(self.doc_stride, self.max_seq_len, room)
        if room <= stride:
            return RowError(
                "InputTooLong",
                f"the question takes {q_len} tokens, which leaves {max(room, 0)} context tokens per window of "
                f"max_seq_len={self.max_seq_len}, not more than doc_stride={stride}; lower "
                "params.max_question_len or params.doc_stride, or raise params.max_seq_len",
            )
        enc = _pair(self.tokenizer, question, context, max_len=self.max_seq_len, stride=stride)
        windows = len(enc["input_ids"])
        longest = max(len(ids) for ids in enc["input_ids"])
        ids = np.full((windows, longest), self.pad_id, dtype=np.int32)  # (W, T)
        types = np.zeros((windows, longest), dtype=np.int8)
        attention = np.zeros((windows, longest), dtype=np.int8)
        # 1 = cannot be in the answer: the question, special tokens and padding; CLS stays 0 (null answer).
        p_mask = np.ones((windows, longest), dtype=np.int8)
        is_context = np.zeros((windows, longest), dtype=np.int8)
        spans = np.zeros((windows, longest, 2), dtype=np.int32)  # (W, T, 2) character span per token
        cls_id = self.tokenizer.cls_token_id
        for w in range(windows):
            n = len(enc["input_ids"][w])
            ids[w, :n] = enc["input_ids"][w]
            types[w, :n] = enc["token_type_ids"][w]
            attention[w, :n] = 1
            sequence = enc.sequence_ids(w)
            is_context[w, :n] = [s == self.context_index for s in sequence]
            p_mask[w, :n] = 1 - is_context[w, :n]
            if cls_id is not None:
                p_mask[w, :n][ids[w, :n] == cls_id] = 0
            encoding = enc[w]
            spans[w, :n] = encoding.offsets
            if self.align_to_words:
                # 4.x `get_indices`: a span starts and ends on whole words of the context.
                for t, (s, word) in enumerate(zip(sequence, encoding.word_ids, strict=True)):
                    if s == self.context_index and word is not None:
                        spans[w, t] = encoding.word_to_chars(word, sequence_index=self.context_index)
        return {
            "input_ids": ids,
            "token_type_ids": types,
            "attention_mask": attention,
            "p_mask": p_mask,
            "is_context": is_context,
            "spans": spans,
        }


class _Runner:
    """All windows of all rows of a micro-batch in one padded forward; start/end logits back per row."""

    def __init__(self, model_dir: str, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForQuestionAnswering

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_pretrained(AutoModelForQuestionAnswering, model_dir, device=device, dtype=dtype)
        tokenizer = _load_fast_tokenizer(model_dir)
        self.pad_id = pad_token_id(tokenizer)
        self.uses_types = "token_type_ids" in tokenizer.model_input_names

    def length(self, features: Mapping[str, Any]) -> int:
        return int(features["input_ids"].size)  # windows × tokens

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        counts = [f["input_ids"].shape[0] for f in batch]
        padded = pad_tokens(batch, pad_id=self.pad_id, token_types=self.uses_types)  # (sum W, T)
        inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in padded.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
            start = out.start_logits.float().cpu().numpy()  # (sum W, T)
            end = out.end_logits.float().cpu().numpy()
        rows, r = [], 0
        for f, w in zip(batch, counts, strict=True):
            t = f["input_ids"].shape[1]
            rows.append({"start_logits": start[r : r + w, :t], "end_logits": end[r : r + w, :t]})
            r += w
        return rows


class _Postprocessor:
    def __init__(self, model_dir: str, params: QuestionAnsweringParams) -> None:
        from transformers.pipelines.document_question_answering import select_starts_ends

        self._select = select_starts_ends  # the 4.x question-answering pipeline's span decoding
        self.params = params

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        p = self.params
        context = inputs["context"]
        min_null_score = 1000000.0  # 4.x: large and positive, lowered by every window's CLS score
        answers = []
        for w in range(output["start_logits"].shape[0]):
            n = int(features["attention_mask"][w].sum())  # the window's tokens, without our padding
            starts, ends, scores, min_null_score = self._select(
                np.asarray(output["start_logits"][w][None, :n], dtype=np.float32),  # (1, n)
                np.asarray(output["end_logits"][w][None, :n], dtype=np.float32),
                features["p_mask"][w][None, :n].astype(np.int64),
                features["attention_mask"][w][None, :n].astype(np.int64),
                min_null_score,
                p.top_k,
                p.handle_impossible_answer,
                p.max_answer_len,
            )
            spans, is_context = features["spans"][w], features["is_context"][w]
            for s, e, score in zip(starts, ends, scores, strict=True):
                if not (is_context[s] and is_context[e]):
                    # 4.x's mask check lets token 0 (CLS) through with score 0 when top_k exceeds the
                    # window's spans, which gave empty zero-score answers; only context spans are answers.
                    continue
                start, end = int(spans[s][0]), int(spans[e][1])
                answers.append(
                    {"answer": context[start:end], "score": float(score), "start": start, "end": end}
                )
        if p.handle_impossible_answer:
            answers.append({"answer": "", "score": float(min_null_score), "start": 0, "end": 0})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[: p.top_k]
        if not answers:
            raise ValueError("no answer span in the context (every window was masked); check the context")
        row = dict(answers[0])
        if p.top_k > 1:
            row["answers"] = answers
        return row


@register_task("question-answering")
class QuestionAnswering:
    name = "question-answering"
    inputs = {"question": True, "context": True}
    description = "Extractive QA: the answer span of `context` (text, score, character offsets)."
    postprocess_inputs = ("context",)
    postprocess_features = ("attention_mask", "p_mask", "is_context", "spans")
    # Fine-tuning: the label column holds SQuAD-style answers, read as Python objects.
    training_labels = "raw"
    training_text_inputs = ("question", "context")

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> QuestionAnsweringParams:
        p = parse_params_dataclass(QuestionAnsweringParams, params, key=key)
        for name, low in (("top_k", 1), ("max_answer_len", 1), ("max_question_len", 1), ("max_seq_len", 8)):
            value = getattr(p, name)
            if value is not None and value < low:
                raise SpecError(f"{key}.{name}", f"must be >= {low}, got {value}")
        if p.doc_stride is not None and p.doc_stride < 0:
            raise SpecError(f"{key}.doc_stride", f"must be >= 0, got {p.doc_stride}")
        if p.doc_stride is not None and p.max_seq_len is not None and p.doc_stride >= p.max_seq_len:
            raise SpecError(
                f"{key}.doc_stride",
                f"({p.doc_stride}) must be smaller than max_seq_len ({p.max_seq_len}): windows overlap by "
                "doc_stride tokens and must still advance",
            )
        return p

    def output_schema(self, params: QuestionAnsweringParams) -> pa.Schema:
        fields = [
            ("answer", pa.string()),
            ("score", pa.float64()),
            ("start", pa.int64()),
            ("end", pa.int64()),
        ]
        if params.top_k > 1:
            fields.append(("answers", pa.list_(_ANSWER)))
        return pa.schema(fields)

    def load_preprocessor(self, model_dir: str, params: QuestionAnsweringParams) -> _Preprocessor:
        return _Preprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: QuestionAnsweringParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(model_dir, device=device, dtype=dtype)

    def load_postprocessor(self, model_dir: str, params: QuestionAnsweringParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(
        self, options: Mapping[str, Any], *, key: str
    ) -> QuestionAnsweringTrainingOptions:
        o = parse_params_dataclass(QuestionAnsweringTrainingOptions, options, key=key)
        if o.doc_stride is not None and o.doc_stride < 0:
            raise SpecError(f"{key}.doc_stride", f"must be >= 0, got {o.doc_stride}")
        if o.max_question_len < 1:
            raise SpecError(f"{key}.max_question_len", f"must be >= 1, got {o.max_question_len}")
        return o

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...] = (),
        max_length: int,
        options: Mapping[str, Any] | None = None,
    ) -> QuestionAnsweringTrainable:
        """`models.registry.FineTunable`: `train.max_length` is the window length (max_seq_len)."""
        opts = self.parse_training_options(options or {}, key="train.options")
        return QuestionAnsweringTrainable(base_dir, max_length=max_length, options=opts)


# --- fine-tuning ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionAnsweringTrainingOptions:
    # Overlap of the context windows, as at inference. None: min(max_length // 2, 128), lowered for
    # batches whose longest question leaves less room than twice that.
    doc_stride: int | None = None
    max_question_len: int = 64


class QuestionAnsweringTrainable:
    """Training-side view of question-answering; built inside each Ray Train worker.

    Labels are SQuAD-style answers, one per row: `{"text": [...], "answer_start": [...]}` (the first answer
    is used; empty lists mean no answer) or `{"text": str, "answer_start": int}`. Every row becomes one
    training example per context window (the inference windows: same tokenizer call, `max_length` tokens,
    `doc_stride` overlap); a window that holds the whole answer targets its first and last token, any other
    window (and an unanswerable row) targets CLS, i.e. "no answer here" (the recipe of the HF `run_qa`
    example). `eval_counts` counts windows whose start and end are both right.
    """

    def __init__(self, base_dir: str, *, max_length: int, options: QuestionAnsweringTrainingOptions) -> None:
        self.tokenizer = _load_fast_tokenizer(base_dir)
        self.max_length = min(max_length, _model_limit(base_dir, self.tokenizer))
        self.doc_stride = options.doc_stride
        self.max_question_len = options.max_question_len
        self.context_index = 1 if self.tokenizer.padding_side == "right" else 0
        self.specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        self._answer = _Postprocessor(base_dir, QuestionAnsweringParams(align_to_words=False))

    def build_model(self, weights_dir: str) -> Any:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(
            weights_dir, ignore_mismatched_sizes=True, use_safetensors=True
        )

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any]) -> dict[str, Any]:
        import torch

        cut = [_truncate_question(self.tokenizer, q, self.max_question_len) for q in columns["question"]]
        questions = [q for q, _ in cut]
        contexts = columns["context"]
        # One stride for the batch (the tokenizer takes one): the one the longest question allows.
        room = self.max_length - max(n for _, n in cut) - self.specials
        stride = _stride(self.doc_stride, self.max_length, room)
        if room <= stride:
            raise ValueError(
                f"a question of {max(n for _, n in cut)} tokens leaves {max(room, 0)} context tokens per window "
                f"of train.max_length={self.max_length}, not more than doc_stride={stride}; raise "
                "train.max_length or lower train.options.max_question_len / doc_stride"
            )
        enc = _pair(self.tokenizer, questions, contexts, max_len=self.max_length, stride=stride, padding=True)
        sample = enc["overflow_to_sample_mapping"]
        answers = [_answer_span(a, c, row) for row, (a, c) in enumerate(zip(labels, contexts, strict=True))]
        starts, ends = [], []
        for w, row in enumerate(sample):
            span = answers[row]
            start = end = 0  # CLS: no answer in this window
            if span is not None:
                offsets, sequence = enc["offset_mapping"][w], enc.sequence_ids(w)
                ctx = [t for t, s in enumerate(sequence) if s == self.context_index]
                if offsets[ctx[0]][0] <= span[0] and offsets[ctx[-1]][1] >= span[1]:
                    start = next(t for t in ctx if offsets[t][1] > span[0])
                    end = next(t for t in reversed(ctx) if offsets[t][0] < span[1])
            starts.append(start)
            ends.append(end)
        batch = {
            k: torch.as_tensor(enc[k])
            for k in ("input_ids", "attention_mask", "token_type_ids")
            if k in enc and k in self.tokenizer.model_input_names
        }
        batch["start_positions"] = torch.as_tensor(starts, dtype=torch.long)  # (windows,)
        batch["end_positions"] = torch.as_tensor(ends, dtype=torch.long)
        # Not model inputs: what eval_predictions needs to turn a window's logits into answer text.
        is_context = np.zeros(batch["input_ids"].shape, dtype=np.int8)  # (windows, T)
        spans = np.zeros((*batch["input_ids"].shape, 2), dtype=np.int64)  # (windows, T, 2) characters
        for w in range(len(sample)):
            is_context[w] = [s == self.context_index for s in enc.sequence_ids(w)]
            spans[w] = enc["offset_mapping"][w]
        batch.update(
            _row=list(sample), _is_context=is_context, _spans=spans, _context=contexts, _answers=labels
        )
        return batch

    # Task metrics per epoch (pipeline.train.loop): SQuAD token F1 of the answer text picks the best epoch.
    eval_score = ("eval_f1", "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({"answer": text}, gold answers) per eval row: the inference postprocess (the 4.x span search,
        top_k 1, max_answer_len 15, no null answer) over the row's windows, on token offsets."""
        start = output.start_logits.detach().float().cpu().numpy()  # (windows, T)
        end = output.end_logits.detach().float().cpu().numpy()
        attention = batch["attention_mask"].cpu().numpy()
        p_mask = 1 - batch["_is_context"]
        cls_id = self.tokenizer.cls_token_id
        if cls_id is not None:  # CLS stays answerable, as at inference (the null answer)
            p_mask[batch["input_ids"].cpu().numpy() == cls_id] = 0
        rows = np.asarray(batch["_row"])
        pairs = []
        for row, (context, answers) in enumerate(zip(batch["_context"], batch["_answers"], strict=True)):
            w = np.flatnonzero(rows == row)
            features = {
                "attention_mask": attention[w],
                "p_mask": p_mask[w],
                "is_context": batch["_is_context"][w],
                "spans": batch["_spans"][w],
            }
            try:
                found = self._answer(
                    {"start_logits": start[w], "end_logits": end[w]},
                    inputs={"context": context},
                    features=features,
                )
                answer = found["answer"]
            except ValueError:  # no span in any window: an empty answer
                answer = ""
            pairs.append(({"answer": answer}, answers))
        return pairs

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        return epoch_metrics(qa_metrics, pairs, {"exact_match": "eval_exact_match", "f1": "eval_f1"})

    def eval_counts(self, output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
        """(windows whose predicted start and end are both the target's, windows)."""
        hits = (output.start_logits.argmax(-1) == batch["start_positions"]) & (
            output.end_logits.argmax(-1) == batch["end_positions"]
        )
        return float(hits.sum().item()), float(hits.numel())

    def save(self, model: Any, out_dir: str) -> None:
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def _answer_span(answer: Any, context: str, row: int) -> tuple[int, int] | None:
    """(start, end) characters of a SQuAD-style answer in its context; None for no answer."""
    if not isinstance(answer, Mapping) or "text" not in answer or "answer_start" not in answer:
        raise ValueError(
            f"training row {row} of the batch has answers {answer!r}; expected {{'text': ..., 'answer_start': ...}} "
            "(SQuAD style: lists of texts and character starts, or one of each)"
        )
    text, start = answer["text"], answer["answer_start"]
    if isinstance(text, list | tuple):
        if not text:
            return None
        text, start = text[0], start[0]
    if text is None or start is None or text == "":
        return None
    start = int(start)
    if context[start : start + len(text)] != text:
        raise ValueError(
            f"training row {row} of the batch: answer {text!r} is not at character {start} of its context "
            f"(found {context[start : start + len(text)]!r}); answer_start must index `text` in the context"
        )
    return start, start + len(text)
