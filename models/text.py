"""Text helpers shared by the text tasks (the agreed home for them: never import one task file from another):
tokenizer loading, length limits, input checks and padding.

`clip_text` cuts a text that is far longer than the model can use by characters, before tokenizing, so a
50 MB row costs what a few kilobytes cost. Tokenizers work on the whole string they are given even when
they then keep `max_length` tokens: a 50 MB review took 77 s and 6.8 GB in a fast BERT tokenizer to keep
128 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from models.registry import RowError
from pipeline.errors import ModelError

__all__ = [
    "CHARS_PER_TOKEN",
    "check_text",
    "clip_text",
    "effective_max_length",
    "load_tokenizer",
    "model_max_length",
    "pad_token_id",
    "pad_tokens",
]

# An upper bound on the characters one kept token covers, so that `max_length * CHARS_PER_TOKEN` characters
# hold every token the model sees. Vocabulary entries are short: BPE merges and SentencePiece pieces are
# rarely over ~20 characters (SentencePiece caps pieces at 16 by default); WordPiece turns a word over 100
# characters (`max_input_chars_per_word`) into one [UNK]. A cut changes only the tokens of the word it
# falls in, which lie past the kept ones unless the text averages over 100 characters per token: text made
# mostly of whitespace (which tokenizers drop) or of words over 100 characters. The cost is tokenizing at
# most 100 × max_length characters per row (51 KB, ~30 ms, at 512 tokens).
CHARS_PER_TOKEN = 100


def clip_text(text: str, max_tokens: int, *, keep: Literal["start", "end"] = "start") -> str:
    """`text`, or its first (`keep="start"`) or last (`keep="end"`) `max_tokens * CHARS_PER_TOKEN`
    characters when it is longer: the part a tokenizer truncating to `max_tokens` (from the right, or from
    the left for `"end"`) would keep tokens from."""
    limit = max_tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    return text[:limit] if keep == "start" else text[-limit:]


def check_text(value: Any, name: str) -> str | RowError:
    """`value` when it is a string, else the row's InvalidInput error naming input `name`."""
    if value is None:
        return RowError("InvalidInput", f"input {name!r} is null; expected a string")
    if not isinstance(value, str):
        return RowError("InvalidInput", f"input {name!r} is a {type(value).__name__}; expected a string")
    return value


def load_tokenizer(model_dir: str, *, fast_for: str | None = None) -> Any:
    """The tokenizer `transformers.pipeline` would load for this folder. `fast_for` (why the task needs a
    fast tokenizer, e.g. "character offsets") refuses a slow (Python) one with a ModelError."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if fast_for is not None and not tokenizer.is_fast:
        raise ModelError(
            f"the tokenizer in {model_dir!r} is a slow (Python) tokenizer; {fast_for}. Save the model with a "
            "tokenizer.json (e.g. AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir))"
        )
    return tokenizer


def effective_max_length(tokenizer: Any, config: Any, requested: int | None) -> int:
    """The longest input the model takes: the request, else the tokenizer's limit, capped by positions."""
    limits = [requested] if requested else []
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    return min(limits) if limits else 512


def model_max_length(model_dir: str, tokenizer: Any, requested: int | None = None) -> int:
    """`effective_max_length` with the config read from `model_dir`."""
    from transformers import AutoConfig

    return effective_max_length(tokenizer, AutoConfig.from_pretrained(model_dir), requested)


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads input_ids (0 when the tokenizer has no pad token: the mask hides it anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_tokens(
    batch: Sequence[Mapping[str, np.ndarray]],
    *,
    pad_id: int,
    side: Literal["right", "left"] = "right",
    token_types: bool = False,
) -> dict[str, np.ndarray]:
    """The token features of a micro-batch, padded to its longest sequence: int64 `input_ids` (`pad_id` on
    padding), `attention_mask` (0 on padding) and, with `token_types`, `token_type_ids` (0 on padding).

    A row's `input_ids` is one sequence (T,) or W windows (W, T) that become W consecutive rows of the
    result, in batch order: (sum W, T_max). A row's own `attention_mask` (same shape) is copied where it has
    one (windows padded within their row), else its tokens count as 1. `side="left"` pads before the tokens
    (decoder-only generation)."""
    rows = [f["input_ids"] if f["input_ids"].ndim == 2 else f["input_ids"][None] for f in batch]
    n, longest = sum(r.shape[0] for r in rows), max(r.shape[1] for r in rows)
    ids = np.full((n, longest), pad_id, dtype=np.int64)  # (sum W, T)
    mask = np.zeros((n, longest), dtype=np.int64)
    types = np.zeros((n, longest), dtype=np.int64) if token_types else None
    r = 0
    for f, x in zip(batch, rows, strict=True):
        w, t = x.shape
        cols = slice(longest - t, longest) if side == "left" else slice(0, t)
        ids[r : r + w, cols] = x
        mask[r : r + w, cols] = f["attention_mask"].reshape(w, t) if "attention_mask" in f else 1
        if types is not None:
            types[r : r + w, cols] = f["token_type_ids"].reshape(w, t)
        r += w
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    return out
