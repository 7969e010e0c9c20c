"""text-generation: any `AutoModelForCausalLM` (GPT-2, Llama-family such as SmolLM2, ...).

Inputs: `text` (a prompt) or `messages` (a chat: a list of {role, content}, formatted with the tokenizer's
chat template as `transformers.pipeline("text-generation")` does). Map exactly one of them.

Params follow the pipeline and `generate`: `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`,
`repetition_penalty`, `num_return_sequences`, `stop_strings`, `return_full_text`, plus `seed` (per-row
sampling, below), `continue_final_message` (chats) and `handle_long_generation`. A param left null takes
the model's `generation_config.json` value, else the pipeline's default (max_new_tokens 256, sampling with
temperature 0.7), resolved by the pipeline's own `_prepare_generate_kwargs`.

Outputs: `generated_text`, `num_generated_tokens` (new tokens, the final EOS included) and `finish_reason`
("eos": the model ended it; "stop": a stop string; "length": max_new_tokens), each a list when
num_return_sequences > 1. `generated_text` is the pipeline's: the prompt + the new text when
`return_full_text` (default), else the new text only. For a chat it is the content of the assistant message
the pipeline returns last: the reply, or the prefilled final assistant message + its continuation.

How it runs. Tokenizing (and the chat template) happens in the CPU preprocess tasks; the replica left-pads
micro-batches of similar prompt length (the engine sorts rows by prompt length) and calls `model.generate`
(KV cache on). Prompts that do not fit the context with `max_new_tokens` more are cut from the left
(`handle_long_generation: hole`, the pipeline's strategy; the default here, so a long row never fails the
job) or become error records (`error`).

Reproducible sampling per row. `generate` has one RNG for the whole batch, so a row's text would depend on
its batch neighbours. Here `generate` runs its greedy loop, and a last logits processor does the sampling:
it applies the pipeline's warpers (temperature, top-k, top-p, ... — HF's own classes, in HF's order), then
draws each sequence's token by inverse CDF from a uniform stream seeded by (seed, row id, sequence index),
and returns scores that are -inf except for the drawn token, which greedy then picks. Row ids are stable
across retries, resumes and replicas, so the same row gives the same text whatever its micro-batch. (Exact
up to floating point: a batch of another shape can change logits in the last bits, which changes a draw
only if it lands within that distance of a token boundary.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.loading import load_pretrained
from models.registry import ROW_ID, RowError, parse_params_dataclass, register_task
from models.text import clip_text, effective_max_length, pad_tokens
from models.text import load_tokenizer as _load_tokenizer  # the name the training code uses
from pipeline.errors import SpecError

__all__ = ["CausalLMTrainOptions", "CausalLMTrainable", "TextGeneration", "TextGenerationParams", "row_seed"]

# finish_reason codes between the replica and postprocess.
_FINISH = ("length", "eos", "stop")


@dataclass(frozen=True)
class TextGenerationParams:
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int = 1
    stop_strings: str | tuple[str, ...] | None = None
    return_full_text: bool = True
    # Seeds every row's sampling stream together with the row id (see the module docstring).
    seed: int = 0
    # Chats: continue the last message instead of starting an assistant reply. None: when it is the
    # assistant's (a prefill), as the pipeline does.
    continue_final_message: bool | None = None
    # Prompt + max_new_tokens longer than the model's context: "hole" keeps the prompt's last tokens (the
    # pipeline's `handle_long_generation="hole"`); "error" makes the row an error record.
    handle_long_generation: Literal["hole", "error"] = "hole"
    # A `text` input goes into this template where it says {text} (e.g. "Summarize in one sentence: {text}"):
    # what a stage that reads an earlier stage's text needs to turn it into an instruction.
    prompt_template: str | None = None
    # A `text` input (after the template) becomes one user message through the tokenizer's chat template, as
    # the pipeline does with [{"role": "user", "content": text}]: what instruct models expect.
    chat: bool = False
    # With `chat`: a system message before the user's.
    system_prompt: str | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop_strings is None:
            return ()
        return (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings


_USER_GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
# Sampling params: kept out of `generate` (it runs greedy); the row sampler applies them.
_SAMPLING_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
)


def row_seed(seed: int, row_id: Any, index: int) -> int:
    """The sampling seed of one returned sequence of one row: a hash, the same on every machine."""
    digest = hashlib.blake2b(f"{seed}:{row_id}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


# -------------------------------------------------------------------------------------------------------
# Generation settings: what the pipeline would pass to `generate`, resolved once per process.


@dataclass(frozen=True)
class _Settings:
    generate_kwargs: dict[str, Any]  # for generate(), sampling params removed
    config: Any  # the fully resolved GenerationConfig (model file + pipeline defaults + params)
    max_new_tokens: int | None  # None: only a total max_length is set (per row: max_length - prompt)
    max_length: int
    do_sample: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    prefix: str  # model.config.prefix, prepended to text prompts as the pipeline does
    context: int  # the longest sequence (prompt + new tokens) the model takes


def _resolve(model_dir: str, params: TextGenerationParams, tokenizer: Any) -> _Settings:
    from transformers import AutoConfig, GenerationConfig
    from transformers.pipelines.text_generation import TextGenerationPipeline

    config = AutoConfig.from_pretrained(model_dir)
    try:
        model_generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: what from_pretrained gives the model
        model_generation = GenerationConfig.from_model_config(config)
    defaults = TextGenerationPipeline._default_generation_config.to_diff_dict()
    defaults.pop("transformers_version", None)
    if tokenizer.pad_token_id is not None:
        defaults["pad_token_id"] = tokenizer.pad_token_id
    # The pipeline's own resolution (user params > the model's generation config > pipeline defaults),
    # called on a stand-in for the pipeline object: it reads only these attributes.
    pipe = SimpleNamespace(
        _generate_kwargs={},
        _generation_defaults=defaults,
        model=SimpleNamespace(generation_config=model_generation),
    )
    pipe._get_set_generation_params = lambda kw: TextGenerationPipeline._get_set_generation_params(pipe, kw)
    user = {k: getattr(params, k) for k in _USER_GENERATION_KEYS if getattr(params, k) is not None}
    kwargs = TextGenerationPipeline._prepare_generate_kwargs(pipe, user)
    # What generate() then builds from them (GenerationMixin._prepare_generation_config's order).
    resolved = GenerationConfig()
    resolved.update(**model_generation.to_dict(), defaults_only=True)
    resolved.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    resolved.update(**kwargs)
    eos = resolved.eos_token_id
    eos_ids = tuple(int(e) for e in ([] if eos is None else [eos] if isinstance(eos, int) else eos))
    pad = kwargs.get("pad_token_id", resolved.pad_token_id)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0  # what generate() falls back to (with a warning)
    generate_kwargs = {k: v for k, v in kwargs.items() if k not in _SAMPLING_KEYS and k != "max_new_tokens"}
    generate_kwargs["pad_token_id"] = int(pad)
    prefix = getattr(config, "prefix", None) or ""
    return _Settings(
        generate_kwargs=generate_kwargs,
        config=resolved,
        max_new_tokens=resolved.max_new_tokens,
        max_length=int(resolved.max_length),
        do_sample=bool(resolved.do_sample),
        eos_ids=eos_ids,
        pad_id=int(pad),
        prefix=prefix,
        context=effective_max_length(tokenizer, config, None),
    )


# -------------------------------------------------------------------------------------------------------
# Preprocess (CPU)


def _check_messages(value: Any) -> list[dict[str, Any]] | RowError:
    if value is None:
        return RowError("InvalidInput", "input 'messages' is null; expected a list of {role, content}")
    if not isinstance(value, list | tuple) or not value:
        return RowError(
            "InvalidInput",
            f"input 'messages' is {type(value).__name__}{' (empty)' if value == [] else ''}; expected a "
            "non-empty list of {role, content} messages",
        )
    messages = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return RowError(
                "InvalidInput",
                f"message {i} is {m!r}; every message needs a string 'role' and a string 'content'",
            )
        # Arrow structs give every message every key of the column's struct, null where it was absent.
        messages.append({k: v for k, v in m.items() if v is not None})
    return messages


def _continues(messages: list[Mapping[str, Any]], params: TextGenerationParams) -> bool:
    if params.continue_final_message is not None:
        return params.continue_final_message
    return messages[-1]["role"] == "assistant"


class _Preprocessor:
    def __init__(self, model_dir: str, params: TextGenerationParams) -> None:
        self.tokenizer = _load_tokenizer(model_dir)
        self.settings = _resolve(model_dir, params, self.tokenizer)
        self.params = params
        bos = self.settings.config.bos_token_id
        self.bos = bos if isinstance(bos, int) else None

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        ids_col = columns[ROW_ID]
        n = len(ids_col)
        if ("text" in columns) == ("messages" in columns):
            err = RowError(
                "InvalidSpec",
                "text-generation takes exactly one of the inputs 'text' (a prompt) or 'messages' (a chat); "
                "map one of them in the stage's inputs",
            )
            return [err] * n
        out: list[dict[str, Any] | RowError] = [RowError("", "")] * n
        prompts: dict[int, list[int]] = {}
        if "text" in columns and self.params.chat:
            for i, value in enumerate(columns["text"]):
                if not isinstance(value, str):
                    what = "null" if value is None else f"a {type(value).__name__}"
                    out[i] = RowError("InvalidInput", f"input 'text' is {what}; expected a string")
                    continue
                encoded = self._chat(self._messages(value))
                if isinstance(encoded, RowError):
                    out[i] = encoded
                else:
                    prompts[i] = encoded
        elif "text" in columns:
            ok, texts = [], []
            for i, value in enumerate(columns["text"]):
                if not isinstance(value, str):
                    what = "null" if value is None else f"a {type(value).__name__}"
                    out[i] = RowError("InvalidInput", f"input 'text' is {what}; expected a string")
                else:
                    ok.append(i)
                    if self.params.handle_long_generation == "hole":
                        # The prompt keeps at most `context` tokens from its end (see _features): tokenize
                        # only what they come from, so a 50 MB prompt costs milliseconds.
                        value = clip_text(value, self.settings.context, keep="end")
                    texts.append(self.settings.prefix + self._template(value))
            if ok:
                encoded = self.tokenizer(texts)["input_ids"]
                prompts = dict(zip(ok, encoded, strict=True))
        else:
            for i, value in enumerate(columns["messages"]):
                messages = _check_messages(value)
                if isinstance(messages, RowError):
                    out[i] = messages
                    continue
                encoded = self._chat(messages)
                if isinstance(encoded, RowError):
                    out[i] = encoded
                else:
                    prompts[i] = encoded
        for i, ids in prompts.items():
            out[i] = self._features(ids, ids_col[i])
        return out

    def _template(self, text: str) -> str:
        template = self.params.prompt_template
        return text if template is None else template.replace("{text}", text)

    def _messages(self, text: str) -> list[dict[str, Any]]:
        system = self.params.system_prompt
        user = {"role": "user", "content": self._template(text)}
        return [{"role": "system", "content": system}, user] if system is not None else [user]

    def _chat(self, messages: list[dict[str, Any]]) -> list[int] | RowError:
        cont = _continues(messages, self.params)
        try:
            enc = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=not cont,
                continue_final_message=cont,
                tokenize=True,
                return_dict=True,
            )
        except Exception as e:  # noqa: BLE001 - a template that rejects this chat: the row's error
            return RowError("ChatTemplateError", f"the tokenizer's chat template failed: {e}")
        return list(enc["input_ids"])

    def _features(self, ids: list[int], row_id: Any) -> dict[str, Any] | RowError:
        s, p = self.settings, self.params
        if not ids:
            if self.bos is None:
                return RowError(
                    "EmptyPrompt", "the prompt has no tokens and the model has no BOS token to start from"
                )
            ids = [self.bos]  # what generate() starts an empty prompt from
        budget = s.max_new_tokens if s.max_new_tokens is not None else s.max_length - len(ids)
        if budget < 1:
            return RowError(
                "InputTooLong",
                f"the prompt has {len(ids)} tokens, at or above max_length {s.max_length}; set "
                "params.max_new_tokens",
            )
        if len(ids) + budget > s.context:
            keep = s.context - budget
            if p.handle_long_generation == "error" or keep < 1:
                return RowError(
                    "InputTooLong",
                    f"{len(ids)} prompt tokens + {budget} new tokens > the model's context of {s.context}; "
                    + (
                        "lower params.max_new_tokens"
                        if keep < 1
                        else "shorten the prompt or set params.handle_long_generation: hole (keeps its end)"
                    ),
                )
            ids = ids[-keep:]
        return {
            "input_ids": np.asarray(ids, dtype=np.int32),
            "max_new_tokens": np.asarray([budget], dtype=np.int32),
            "seeds": np.asarray(
                [row_seed(p.seed, row_id, k) for k in range(p.num_return_sequences)], dtype=np.int64
            ),
        }


# -------------------------------------------------------------------------------------------------------
# Replica: left-pad + generate


def _warpers(config: Any, device: Any) -> list[Any]:
    """HF's sampling warpers for `config`, in the order GenerationMixin._get_logits_processor adds them."""
    from transformers import generation as g

    out: list[Any] = []
    if config.temperature is not None and config.temperature != 1.0:
        out.append(g.TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        out.append(g.TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(g.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        out.append(g.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        out.append(g.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        out.append(g.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        out.append(g.EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1, device=device))
    return out


def _row_sampler(warpers: list[Any], uniforms: Any, prompt_len: int) -> Any:
    """The last logits processor: per-sequence inverse-CDF sampling from its own uniform stream.

    uniforms: (N, max_new) in [0, 1), row i's draws in order. Returns scores that are 0 at the drawn token
    and -inf elsewhere, so `generate`'s greedy argmax picks it."""
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            for warp in warpers:
                scores = warp(input_ids, scores)
            step = input_ids.shape[1] - prompt_len
            # float64 like the draws: u * total stays below the last cdf value, so a zero-probability token
            # is never picked (searchsorted also wants one dtype on both sides).
            cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)  # (N, V)
            u = uniforms[:, step : step + 1] * cdf[:, -1:]  # (N, 1)
            token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, token, 0.0)

    return RowSampler()


def _row_stops(prompt_len: int, budgets: Any, eos: Any, stop_strings: Any) -> Any:
    """A stopping criterion that ends each sequence at its own budget and records why and when each one
    finished (HF's EOS / max-length criteria still run beside it)."""
    import torch
    from transformers import StoppingCriteria

    class RowStops(StoppingCriteria):
        def __init__(self) -> None:
            n = budgets.shape[0]
            self.length = torch.full((n,), -1, dtype=torch.long, device=budgets.device)
            self.reason = torch.zeros((n,), dtype=torch.long, device=budgets.device)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            step = input_ids.shape[1] - prompt_len
            last = input_ids[:, -1]
            hit_eos = torch.isin(last, eos) if eos is not None else torch.zeros_like(last, dtype=torch.bool)
            hit_stop = (
                stop_strings(input_ids, scores).to(last.device)
                if stop_strings is not None
                else torch.zeros_like(hit_eos)
            )
            hit_budget = budgets <= step
            new = (self.length < 0) & (hit_eos | hit_stop | hit_budget)
            reason = torch.where(hit_eos, 1, torch.where(hit_stop, 2, 0))
            self.length = torch.where(new, step, self.length)
            self.reason = torch.where(new, reason, self.reason)
            return self.length >= 0

    return RowStops()


class _Runner:
    def __init__(self, model_dir: str, params: TextGenerationParams, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, StopStringCriteria

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_pretrained(AutoModelForCausalLM, model_dir, device=device, dtype=dtype)
        tokenizer = _load_tokenizer(model_dir)
        self.settings = _resolve(model_dir, params, tokenizer)
        self.params = params
        if params.num_return_sequences > 1 and not self.settings.do_sample:
            raise ValueError(
                f"num_return_sequences is {params.num_return_sequences} but the model's generation config "
                "makes decoding greedy, which returns one sequence; set params.do_sample: true"
            )
        self.warpers = _warpers(self.settings.config, self.device) if self.settings.do_sample else []
        stops = params.stops()
        self.stop_strings = (
            StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops)) if stops else None
        )
        self.eos = (
            torch.tensor(self.settings.eos_ids, dtype=torch.long, device=self.device)
            if self.settings.eos_ids
            else None
        )

    def length(self, features: Mapping[str, Any]) -> int:
        return int(features["input_ids"].shape[0])

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        k = self.params.num_return_sequences
        rows = [f for f in batch for _ in range(k)]  # sequence r*k + j: row r, returned sequence j
        padded = pad_tokens(rows, pad_id=self.settings.pad_id, side="left")  # (N, T)
        longest = padded["input_ids"].shape[1]
        budgets_np = np.array([int(f["max_new_tokens"][0]) for f in rows], dtype=np.int64)
        max_new = int(budgets_np.max())
        budgets = torch.from_numpy(budgets_np).to(self.device)
        processors = LogitsProcessorList()
        if self.settings.do_sample:
            seeds = [int(f["seeds"][j]) for f in batch for j in range(k)]
            uniforms = torch.stack(  # (N, max_new): each sequence's own stream, independent of the batch
                [
                    torch.rand(max_new, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                    for s in seeds
                ]
            ).to(self.device, non_blocking=True)
            processors.append(_row_sampler(self.warpers, uniforms, longest))
        stops = _row_stops(longest, budgets, self.eos, self.stop_strings)
        with torch.inference_mode():
            out = self.model.generate(
                **{k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in padded.items()},
                max_new_tokens=max_new,
                do_sample=False,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stops]),
                **self.settings.generate_kwargs,
            )
        new = out[:, longest:].cpu().numpy().astype(np.int32)  # (N, steps)
        lengths = stops.length.cpu().numpy()
        lengths = np.where(lengths < 0, new.shape[1], lengths)
        reasons = stops.reason.cpu().numpy().astype(np.int8)
        results = []
        for r in range(len(batch)):
            seq = slice(r * k, (r + 1) * k)
            lens = lengths[seq].astype(np.int32)
            results.append({"tokens": new[seq, : int(lens.max())], "lengths": lens, "finish": reasons[seq]})
        return results


# -------------------------------------------------------------------------------------------------------
# Postprocess (CPU)


class _Postprocessor:
    def __init__(self, model_dir: str, params: TextGenerationParams) -> None:
        self.tokenizer = _load_tokenizer(model_dir)
        self.params = params

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        texts, counts, reasons = [], [], []
        for tokens, length, finish in zip(output["tokens"], output["lengths"], output["finish"], strict=True):
            # The pipeline's decode of the new tokens (skip_special_tokens drops the EOS and padding).
            new_text = self.tokenizer.decode(tokens[: int(length)].tolist(), skip_special_tokens=True)
            texts.append(self._full_text(new_text, inputs))
            counts.append(int(length))
            reasons.append(_FINISH[int(finish)])
        if self.params.num_return_sequences == 1:
            return {
                "generated_text": texts[0],
                "num_generated_tokens": counts[0],
                "finish_reason": reasons[0],
            }
        return {"generated_text": texts, "num_generated_tokens": counts, "finish_reason": reasons}

    def _full_text(self, new_text: str, inputs: Mapping[str, Any]) -> str:
        if not self.params.return_full_text:
            return new_text
        if inputs.get("text") is not None:
            if self.params.chat:
                return new_text  # the new assistant message's content, as for a chat
            template = self.params.prompt_template
            prompt = inputs["text"] if template is None else template.replace("{text}", inputs["text"])
            return prompt + new_text
        messages = inputs["messages"]
        if _continues(messages, self.params):
            return messages[-1]["content"] + new_text  # the prefilled message, continued
        return new_text  # the new assistant message's content


@register_task("text-generation")
class TextGeneration:
    name = "text-generation"
    inputs = {"text": False, "messages": False}
    description = (
        "Causal LM generation (GPT-2, Llama, SmolLM2) from a prompt or a chat: generated_text, "
        "num_generated_tokens, finish_reason per row; reproducible per-row sampling."
    )
    postprocess_inputs = ("text", "messages")
    postprocess_features = ()
    # Fine-tuning (pipeline.train): no label column (the text is its own target); `messages` is a list, not a string.
    training_labels = "none"
    training_text_inputs = ("text",)

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> TextGenerationParams:
        p = parse_params_dataclass(TextGenerationParams, params, key=key)
        checks = (
            ("max_new_tokens", p.max_new_tokens is None or p.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", p.temperature is None or p.temperature > 0, "must be > 0 (use do_sample: false)"),
            ("top_k", p.top_k is None or p.top_k >= 0, "must be >= 0"),
            ("top_p", p.top_p is None or 0 < p.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", p.repetition_penalty is None or p.repetition_penalty > 0, "must be > 0"),
            ("num_return_sequences", p.num_return_sequences >= 1, "must be >= 1"),
            ("stop_strings", all(p.stops()), "must be non-empty strings"),
        )
        for name, ok, what in checks:
            if not ok:
                raise SpecError(f"{key}.{name}", f"{what}, got {getattr(p, name)!r}")
        if p.prompt_template is not None and "{text}" not in p.prompt_template:
            raise SpecError(
                f"{key}.prompt_template",
                "must contain {text}, where each row's text goes (e.g. 'Summarize in one sentence: {text}')",
            )
        if p.system_prompt is not None and not p.chat:
            raise SpecError(f"{key}.system_prompt", "is a chat's system message; set chat: true to use it")
        if p.num_return_sequences > 1 and p.do_sample is False:
            raise SpecError(
                f"{key}.num_return_sequences",
                "greedy decoding (do_sample: false) returns one sequence per prompt; set do_sample: true "
                "or num_return_sequences: 1",
            )
        return p

    def output_schema(self, params: TextGenerationParams) -> pa.Schema:
        if params.num_return_sequences == 1:
            return pa.schema(
                [
                    ("generated_text", pa.string()),
                    ("num_generated_tokens", pa.int32()),
                    ("finish_reason", pa.string()),
                ]
            )
        return pa.schema(
            [
                ("generated_text", pa.list_(pa.string())),
                ("num_generated_tokens", pa.list_(pa.int32())),
                ("finish_reason", pa.list_(pa.string())),
            ]
        )

    def load_preprocessor(self, model_dir: str, params: TextGenerationParams) -> _Preprocessor:
        return _Preprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: TextGenerationParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(model_dir, params, device=device, dtype=dtype)

    def load_postprocessor(self, model_dir: str, params: TextGenerationParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> CausalLMTrainOptions:
        return _parse_training_options(options, key=key)

    def training(
        self, base_dir: str, *, label_names: Any, max_length: int, options: Mapping[str, Any] | None = None
    ) -> CausalLMTrainable:
        """`models.registry.FineTunable` (label_names is unused: no label column)."""
        return CausalLMTrainable(base_dir, max_length=max_length, options=options or {})


# --- fine-tuning ------------------------------------------------------------------------------------------
# Causal LM fine-tuning for `kind: finetune` (a `models.registry.Trainable`). No label column is read
# (`training_labels = "none"`): the targets are the inputs themselves.
#
#   inputs: {text: col}       plain text; loss on every token. Each text gets the EOS token appended
#                             (`add_eos`) so the model learns to stop. `packing: true` concatenates the
#                             batch's texts (EOS-separated) and cuts them into max_length blocks (no padding
#                             waste); `packing: false` pads each text (right) to the batch's longest.
#   inputs: {messages: col}   chats (list<struct{role, content}>) through the tokenizer's chat template;
#                             `completion_only: true` (default) puts the loss on the final assistant message
#                             only (its tokens after the template's generation prompt, EOS included) — the
#                             prompt/completion split; false: on every token of the chat.
#
# Texts are cut to train.max_length tokens (packing: blocks of that size). Reported eval accuracy is
# next-token accuracy over the positions that carry loss.


@dataclass(frozen=True)
class CausalLMTrainOptions:
    packing: bool = False
    completion_only: bool = True
    add_eos: bool = True


def _parse_training_options(options: Mapping[str, Any], *, key: str) -> CausalLMTrainOptions:
    return parse_params_dataclass(CausalLMTrainOptions, options, key=key)


class CausalLMTrainable:
    """Training-side view of text-generation; built inside each Ray Train worker."""

    def __init__(self, base_dir: str, *, max_length: int, options: Mapping[str, Any]) -> None:
        from transformers import AutoConfig

        self.tokenizer = _load_tokenizer(base_dir)
        self.max_length = effective_max_length(
            self.tokenizer, AutoConfig.from_pretrained(base_dir), max_length
        )
        self.options = _parse_training_options(options, key="train.options")
        eos = self.tokenizer.eos_token_id
        self.eos = eos if isinstance(eos, int) else None
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def build_model(self, weights_dir: str) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(weights_dir, use_safetensors=True)

    def encode(self, columns: Mapping[str, list[Any]], labels: Any) -> dict[str, Any]:
        """Rows → input_ids, attention_mask, labels (B, T); labels are -100 where no loss is taken."""
        if "messages" in columns:
            seqs = [self._chat(m) for m in columns["messages"]]
        else:
            seqs = [self._text(t) for t in columns["text"]]
            if self.options.packing:
                seqs = self._pack([ids for ids, _ in seqs])
        return self._collate(seqs)

    def _text(self, text: str) -> tuple[list[int], list[bool]]:
        ids = list(self.tokenizer(text)["input_ids"])
        if self.options.add_eos and self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        ids = ids[: self.max_length] if not self.options.packing else ids
        return ids, [True] * len(ids)

    def _chat(self, value: Any) -> tuple[list[int], list[bool]]:
        messages = _check_messages(value)
        if isinstance(messages, RowError):
            raise ValueError(messages.message)
        full = list(
            self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
        loss = [True] * len(full)
        if self.options.completion_only:
            if messages[-1]["role"] != "assistant":
                raise ValueError(
                    "completion_only needs every training chat to end with an assistant message (the "
                    f"completion); this one ends with a {messages[-1]['role']!r} message. Fix the data or set "
                    "train.options.completion_only: false"
                )
            prompt = list(
                self.tokenizer.apply_chat_template(
                    messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    "the chat template does not render the prompt as a prefix of the whole chat, so the "
                    "completion cannot be told apart; set train.options.completion_only: false"
                )
            loss = [False] * len(prompt) + [True] * (len(full) - len(prompt))
        return full[: self.max_length], loss[: self.max_length]

    def _pack(self, seqs: list[list[int]]) -> list[tuple[list[int], list[bool]]]:
        flat = [t for ids in seqs for t in ids]
        blocks = [flat[i : i + self.max_length] for i in range(0, len(flat), self.max_length)]
        return [(b, [True] * len(b)) for b in blocks]

    def _collate(self, seqs: list[tuple[list[int], list[bool]]]) -> dict[str, Any]:
        import torch

        n, longest = len(seqs), max(max(len(ids) for ids, _ in seqs), 1)
        ids = torch.full((n, longest), self.pad, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((n, longest), dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        for r, (row, loss) in enumerate(seqs):
            t = len(row)
            ids[r, :t] = torch.tensor(row, dtype=torch.long)
            mask[r, :t] = 1
            labels[r, :t] = torch.where(torch.tensor(loss), ids[r, :t], -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_counts(self, output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
        """Next-token accuracy: logits at t predict the token at t + 1 (the model shifts labels itself)."""
        predicted = output.logits[:, :-1].argmax(-1)  # (B, T-1)
        target = batch["labels"][:, 1:]
        keep = target != -100
        return float(((predicted == target) & keep).sum().item()), float(keep.sum().item())

    # Task metrics per epoch (pipeline.train.loop): token perplexity, lower is better, picks the best epoch.
    eval_score = ("eval_perplexity", "min")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """(summed negative log-likelihood, tokens) of each eval row's next-token targets: the sufficient
        statistics of perplexity (no text is generated)."""
        import torch.nn.functional as F

        logits = output.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t + 1
        target = batch["labels"][:, 1:]  # (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # (B, T-1)
        return list(zip(nll.sum(-1).tolist(), (target != -100).sum(-1).tolist(), strict=True))

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        """`eval_perplexity`: exp of the mean negative log-likelihood per target token over the eval set."""
        tokens = sum(n for _, n in pairs)
        return {"eval_perplexity": math.exp(sum(nll for nll, _ in pairs) / tokens)} if tokens else {}

    def save(self, model: Any, out_dir: str) -> None:
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
