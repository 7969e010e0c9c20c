"""Text helpers shared by the text tasks (the agreed home for them: never import one task file from another).

`clip_text` cuts a text that is far longer than the model can use by characters, before tokenizing, so a
50 MB row costs what a few kilobytes cost. Tokenizers work on the whole string they are given even when
they then keep `max_length` tokens: a 50 MB review took 77 s and 6.8 GB in a fast BERT tokenizer to keep
128 tokens.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["CHARS_PER_TOKEN", "clip_text"]

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
