"""Builders for the generation family's tests: tiny random causal LMs (GPT-2, Llama) and seq2seq models
(BART, T5, Marian), each saved with a byte-level BPE tokenizer trained here on the test vocabulary.

The models are random, so greedy decoding has near-ties; `initializer_range` is raised above the usual
0.02 so the logits spread out and a greedy choice does not hinge on the last bits of a float (the tests are
about our batching, padding and decoding, not about float summation order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import WORDS, make_texts

# A Jinja chat template in the ChatML style SmolLM2 uses (the tests need one that is short and exact).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(
    out_dir: Path,
    *,
    special: list[str],
    bos: str | None,
    eos: str,
    pad: str | None,
    unk: str | None = None,
    template: tuple[str, str] | None = None,
    vocab_size: int = 320,
    max_length: int = 256,
    chat_template: str | None = None,
) -> Any:
    """A byte-level BPE tokenizer trained on the test vocabulary, wrapped as a fast tokenizer and saved.

    template: (single, pair) post-processor templates such as ("<s> $A </s>", ...); None adds nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_texts(2000, seed=1) + WORDS + ["Hello. Hi! What? 1, 2, 3: ok"], trainer)
    if template is not None:
        tokens = {t for part in template for t in part.split() if t in special}
        tok.post_processor = processors.TemplateProcessing(
            single=template[0],
            pair=template[1],
            special_tokens=[(t, tok.token_to_id(t)) for t in sorted(tokens)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=max_length,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def make_causal_lm(
    out_dir: Path,
    *,
    arch: str = "gpt2",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    positions: int = 128,
    init_range: float = 0.5,
    chat: bool = False,
) -> Path:
    """A tiny random GPT-2 (`arch="gpt2"`) or Llama (`arch="llama"`) + tokenizer, saved as safetensors.

    GPT-2: one special token `<|endoftext|>` (BOS = EOS, no pad, as the real GPT-2). Llama: `<s>`, `</s>`,
    `<pad>`, BOS added to every prompt, and a ChatML template with `<|im_start|>`/`<|im_end|>` (EOS)
    when `chat`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "gpt2":
        tok = train_bpe(
            out_dir,
            special=["<|endoftext|>"],
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad=None,
            max_length=positions,
        )
        config: Any = GPT2Config(
            vocab_size=len(tok),
            n_embd=hidden,
            n_layer=layers,
            n_head=2,
            n_positions=positions,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            initializer_range=init_range,
        )
        model: Any = GPT2LMHeadModel
    elif arch == "llama":
        special = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
        tok = train_bpe(
            out_dir,
            special=special,
            bos="<s>",
            eos="<|im_end|>" if chat else "</s>",
            pad="<pad>",
            template=("<s> $A", "<s> $A $B"),
            max_length=positions,
            chat_template=CHAT_TEMPLATE if chat else None,
        )
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=positions,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            initializer_range=init_range,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}; gpt2 or llama")
    torch.manual_seed(seed)
    model(config).eval().save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_seq2seq(
    out_dir: Path,
    *,
    arch: str = "bart",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 1,
    positions: int = 128,
    init_range: float = 0.5,
) -> Path:
    """A tiny random BART, T5 or Marian + tokenizer, saved as safetensors.

    BART: `<s> $A </s>`, decoder starts from `</s>`. T5: `$A </s>`, pad = decoder start, and the real T5's
    `task_specific_params` (prefixes "summarize: ", "translate English to German: ", ...). Marian: `$A </s>`,
    pad = decoder start."""
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    if arch == "bart":
        tok = train_bpe(
            out_dir,
            special=["<s>", "<pad>", "</s>", "<unk>"],
            bos="<s>",
            eos="</s>",
            pad="<pad>",
            unk="<unk>",
            template=("<s> $A </s>", "<s> $A </s> </s> $B </s>"),
            max_length=positions,
        )
        config: Any = BartConfig(
            vocab_size=len(tok),
            d_model=hidden,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=hidden * 2,
            decoder_ffn_dim=hidden * 2,
            max_position_embeddings=positions,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id,
            init_std=init_range,
        )
        cls: Any = BartForConditionalGeneration
    elif arch in ("t5", "marian"):
        tok = train_bpe(
            out_dir,
            special=["<pad>", "</s>", "<unk>"],
            bos=None,
            eos="</s>",
            pad="<pad>",
            unk="<unk>",
            template=("$A </s>", "$A </s> $B </s>"),
            max_length=positions,
        )
        if arch == "t5":
            config = T5Config(
                vocab_size=len(tok),
                d_model=hidden,
                d_kv=hidden // 2,
                d_ff=hidden * 2,
                num_layers=layers,
                num_decoder_layers=layers,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                decoder_start_token_id=tok.pad_token_id,
                initializer_factor=init_range * 20,
                n_positions=positions,
                task_specific_params={
                    "summarization": {
                        "early_stopping": True,
                        "length_penalty": 2.0,
                        "max_length": 12,
                        "min_length": 3,
                        "no_repeat_ngram_size": 3,
                        "num_beams": 2,
                        "prefix": "summarize: ",
                    },
                    "translation_en_to_de": {
                        "early_stopping": True,
                        "max_length": 10,
                        "num_beams": 2,
                        "prefix": "translate English to German: ",
                    },
                    "translation_en_to_fr": {
                        "early_stopping": True,
                        "max_length": 10,
                        "num_beams": 2,
                        "prefix": "translate English to French: ",
                    },
                },
            )
            cls = T5ForConditionalGeneration
        else:
            config = MarianConfig(
                vocab_size=len(tok),
                decoder_vocab_size=len(tok),
                d_model=hidden,
                encoder_layers=layers,
                decoder_layers=layers,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=hidden * 2,
                decoder_ffn_dim=hidden * 2,
                max_position_embeddings=positions,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                decoder_start_token_id=tok.pad_token_id,
                forced_eos_token_id=tok.eos_token_id,
                init_std=init_range,
            )
            cls = MarianMTModel
    else:
        raise ValueError(f"unknown arch {arch!r}; bart, t5 or marian")
    torch.manual_seed(seed)
    cls(config).eval().save_pretrained(out_dir, safe_serialization=True)
    return out_dir
