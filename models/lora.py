"""LoRA fine-tuning through `peft` (`train.lora`), and loading what it writes.

    worker   trainable.build_model(base) → apply_lora: low-rank adapters on `target_modules`, the task head
             (a fresh classifier, qa_outputs, a CTC lm_head, ...) fully trainable through peft's
             `modules_to_save`; every other weight frozen
             checkpoint = save_lora: the adapter (adapter_config.json + adapter_model.safetensors) and the
             trainable's other files (config.json, tokenizer / processor), no base weights
             resume = fresh base → apply_lora(state=read_adapter(checkpoint)): same parameters in the same
             order, so the optimizer state of the checkpoint loads as it is
    driver   publish: `merge: true` → merge_lora turns the final adapter checkpoint into a full model folder
             (base + B·A folded into the weights, saved by the trainable's own `save`); `merge: false` → the
             adapter checkpoint is the output as it is
    runner   models.loading.load_pretrained on an adapter folder → load_adapter_model: the base named in
             adapter_config.json (`base_model_name_or_path`: the fine-tune's resolved base path or URI) with
             the folder's config.json (labels), the adapter applied and merged in memory

An adapter folder is recognised by its adapter_config.json. It keeps config.json (the fine-tuned labels) and
the tokenizer / processor files next to it, so every runner's `AutoConfig` / `AutoTokenizer` /
`AutoImageProcessor` call on the folder works unchanged; only the weights go through `load_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelError

if TYPE_CHECKING:
    import torch

    from pipeline.spec import LoraSpec

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_base",
    "apply_lora",
    "head_modules",
    "is_adapter_folder",
    "load_adapter_model",
    "merge_lora",
    "read_adapter",
    "save_lora",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's save_pretrained writes a model card; the output folder is shardwise's, and the card would only say
# "more information needed".
_PEFT_CARD = "README.md"
# Names of the folders pipeline.train.publish stages a model in (inside the output, or a local temp folder).
_STAGING_PREFIXES = (".staging-", "shardwise-model-")
# peft's task types for the text tasks (its task-specific PeftModel classes); other tasks get the generic
# PeftModel, which forwards every argument to the model unchanged.
_TASK_TYPES = {
    "text-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "question-answering": "QUESTION_ANS",
    "text-generation": "CAUSAL_LM",
    "summarization": "SEQ_2_SEQ_LM",
    "translation": "SEQ_2_SEQ_LM",
}
# Generation heads are pretrained (and mostly tied to the input embeddings): LoRA leaves them alone, as peft
# does. Training a vocabulary-sized head in full would also cost more than all the adapters together.
_GENERATIVE = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
# peft adds these to modules_to_save itself for its task types; listing them again would only repeat them.
_PEFT_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# How many Linear module names an error about target_modules lists.
_NAMES_SHOWN = 12


def is_adapter_folder(path: str | Path) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


def head_modules(model: torch.nn.Module, task_name: str) -> list[str]:
    """Names of the task head's modules: the model's top-level children outside its backbone
    (`base_model_prefix`: `bert` in BertForSequenceClassification, `model` in DETR) that hold parameters of
    their own, e.g. [classifier], [pre_classifier, classifier] (DistilBERT), [projector, classifier]
    (wav2vec2 audio classification), [lm_head] (CTC), [class_labels_classifier, bbox_predictor] (DETR).

    These are new or resized for the job's labels, so they train in full. A head that shares its weights
    with the backbone (an lm_head tied to the embeddings) and the heads of generation tasks are left out.
    """
    if _TASK_TYPES.get(task_name) in _GENERATIVE:
        return []
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or backbone is model:
        return []
    shared = {id(p) for p in backbone.parameters()}
    heads = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if child is backbone or not params or any(id(p) in shared for p in params):
            continue
        heads.append(name)
    return heads


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Distinct last name parts of the Linear/Conv1D layers: what `target_modules` can name."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }
    return sorted(names)


def apply_lora(
    model: torch.nn.Module,
    lora: LoraSpec,
    *,
    task_name: str,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """`model` wrapped in a peft LoRA model: adapters on `lora.target_modules` (peft's default for the
    architecture when None), the task head trainable in full, everything else frozen. `state` (from
    `read_adapter`) restores a checkpoint's adapter and head weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    task_type = _TASK_TYPES.get(task_name)
    heads = [h for h in head_modules(model, task_name) if h not in _PEFT_HEADS.get(task_type or "", ())]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules is not None else None,
        modules_to_save=heads or None,
        task_type=task_type,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        # peft: no default targets for this architecture, or none of the names matched. A ModelError, not a
        # SpecError: this runs in a Ray worker, and SpecError(key, message) does not survive unpickling.
        names = _linear_names(model)
        shown = ", ".join(names[:_NAMES_SHOWN]) + (" ..." if len(names) > _NAMES_SHOWN else "")
        what = (
            f"{list(lora.target_modules)} match no layer of {type(model).__name__}"
            if lora.target_modules is not None
            else f"peft has no default LoRA targets for {type(model).__name__}"
        )
        raise ModelError(
            f"train.lora.target_modules: {what} (peft: {e}). Set train.lora.target_modules to names of its "
            f"Linear layers, e.g. the attention projections; this model has: {shown}"
        ) from e
    if state is not None:
        result = set_peft_model_state_dict(peft_model, dict(state))
        unexpected = sorted(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise ModelError(
                f"the LoRA checkpoint holds weights this model does not have ({unexpected[:3]}); "
                "it was written with other train.lora settings. Rerun with output.mode: overwrite"
            )
    return peft_model


def read_adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter (and head) weights of a checkpoint written by `save_lora`."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder, ADAPTER_WEIGHTS)))


class _ConfigOnly:
    """Stands in for the model in `Trainable.save`: its `save_pretrained` writes what a full save writes
    besides the weights (config.json with `architectures`, generation_config.json), so the trainable puts
    its tokenizer / processor files next to the adapter exactly as it does next to a full model."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def save_pretrained(self, out_dir: str, **_: Any) -> None:
        model = self._model
        model.config.architectures = [type(model).__name__]
        model.config.dtype = str(model.dtype).removeprefix("torch.")
        model.config.save_pretrained(out_dir)
        if model.can_generate():
            model.generation_config.save_pretrained(out_dir)


def save_lora(model: Any, out_dir: str, *, trainable: Any, base: str) -> None:
    """An adapter folder: the LoRA adapter and head weights (adapter_model.safetensors), adapter_config.json
    naming `base` (the fine-tune's resolved base model path or URI) and the trainable's other files. A
    checkpoint (resumable: `read_adapter`) and, with `merge: false`, the published model.

    `out_dir` must be a new, empty folder (the caller's temp folder): the model card peft writes there is
    removed, and nothing that was there before could be."""
    if any(Path(out_dir).iterdir()):
        raise ValueError(f"save_lora writes into a new, empty folder; {out_dir!r} is not empty")
    model.save_pretrained(out_dir)
    Path(out_dir, _PEFT_CARD).unlink(missing_ok=True)  # peft's card, written just now
    path = Path(out_dir, ADAPTER_CONFIG)
    config = json.loads(path.read_text())
    # peft writes the base's `name_or_path`: a node-local cache folder when the base came from a URI.
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    trainable.save(_ConfigOnly(model.get_base_model()), out_dir)


def merge_lora(folder: str, *, trainable: Any, base_dir: str) -> None:
    """Turn an adapter folder written by `save_lora` into a full model folder, in place: the base built the
    way training built it, the adapter applied and merged (W + B·A·alpha/r; the trained head replaces the
    base's), saved by the trainable's own `save`. Runs on the driver at publish time, on the staging copy
    of the checkpoint that `pipeline.train.publish` made: any other folder is refused, since the adapter
    files are deleted from it."""
    if not Path(folder).name.startswith(_STAGING_PREFIXES):
        raise ValueError(f"merge_lora rewrites a publish staging folder only; {folder!r} is not one")
    from peft import PeftModel

    model = trainable.build_model(base_dir)
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        Path(folder, name).unlink()
    trainable.save(merged, folder)


def adapter_base(config_text: str, *, uri: str) -> str:
    """`base_model_name_or_path` of an adapter_config.json's text."""
    try:
        base = json.loads(config_text)["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"model {uri!r}: {ADAPTER_CONFIG} cannot be read or names no base_model_name_or_path ({e}); "
            "point `model` at a LoRA adapter folder written by a shardwise fine-tune (train.lora.merge: false)"
        ) from e
    if not isinstance(base, str) or not base:
        raise ModelError(
            f"model {uri!r}: {ADAPTER_CONFIG} has no base_model_name_or_path; cannot load the adapter"
        )
    return base


def load_adapter_model(cls: Any, model_dir: str, *, dtype: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """(the base model with the adapter of `model_dir` merged in, names of weights neither the base nor the
    adapter provide). The base is `cls.from_pretrained(base, config=<model_dir's config.json>)`: the head
    takes the fine-tuned label count, its weights come from the adapter (peft's modules_to_save)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoConfig

    from models.loading import resolve_model  # here, not at the top: models.loading imports this module

    base = resolve_model(adapter_base(Path(model_dir, ADAPTER_CONFIG).read_text(), uri=model_dir))
    if Path(base).resolve() == Path(model_dir).resolve():
        raise ModelError(f"model {model_dir!r}: {ADAPTER_CONFIG} names the adapter folder itself as its base")
    config = AutoConfig.from_pretrained(model_dir) if Path(model_dir, "config.json").is_file() else None
    model, info = cls.from_pretrained(
        base,
        config=config,
        dtype=dtype,
        use_safetensors=True,
        output_loading_info=True,
        # A base head of another size (3 labels, fine-tuned to 2) is replaced by the adapter's head.
        ignore_mismatched_sizes=True,
        **kwargs,
    )
    with safe_open(str(Path(model_dir, ADAPTER_WEIGHTS)), framework="pt") as f:
        provided = {k.removeprefix("base_model.model.") for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    mismatched = [k[0] if isinstance(k, tuple | list) else k for k in info.get("mismatched_keys") or ()]
    lacking = sorted(k for k in [*(info.get("missing_keys") or ()), *mismatched] if k not in provided)
    merged = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    return merged, lacking
