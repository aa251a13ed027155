"""Import checks that an extracted base model can actually be served.

:mod:`raydock.platform.model_archive` calls these after the layout and architecture checks.
They catch archives whose files are well-formed but that fail (or silently misbehave) once
deployed:

- :func:`check_chat_template` renders sample conversations with the model's own tokenizer,
  exactly as the serving engines do (:func:`raydock.serve_apps.chat_render.render`);
- :func:`check_weights_match_config` compares the tensors in the safetensors headers with a
  skeleton of the model that ``config.json`` describes, built on the meta device (no memory,
  no weights read).

Both raise :class:`~raydock.platform.model_archive.ArchiveError` with a user-facing message.
torch and transformers are imported lazily (they are slow to import).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydock.platform.model_archive import ArchiveError
from raydock.serve_apps import chat_render

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
#: (which conversation, messages, tools): what every chat model must render.
SAMPLE_CHATS: tuple[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None], ...] = (
    ("system+user", [_SYSTEM, {"role": "user", "content": "Hello!"}], None),
    (
        "user/assistant/user",
        [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        None,
    ),
    ("tool-call", chat_render.SAMPLE_CONVERSATION, chat_render.SAMPLE_TOOLS),
)
_MAX_NAMED = 3  # tensors named in one message
_RESAVE_HINT = (
    "save the model and its config together with model.save_pretrained(dir, "
    "safe_serialization=True)"
)


def check_chat_template(root: Path) -> None:
    """Refuse a chat template that cannot render the sample conversations."""
    tokenizer = _load_tokenizer(root)
    if chat_render.template_source(tokenizer) is None:
        return  # only named templates, no default: served like a model without a template
    for which, messages, tools in SAMPLE_CHATS:
        try:
            chat_render.render(tokenizer, copy.deepcopy(messages), copy.deepcopy(tools))
        except chat_render.ChatTemplateError as e:
            raise ArchiveError(
                f"chat template cannot render a {which} conversation: {e}; fix the template "
                "(chat_template in tokenizer_config.json, or chat_template.jinja)"
            ) from None


def _load_tokenizer(root: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except Exception as e:
        raise ArchiveError(
            f"the tokenizer cannot be loaded by the installed transformers "
            f"{transformers.__version__}: {_short(e)}; save it with tokenizer.save_pretrained(dir)"
        ) from None


def check_weights_match_config(root: Path, config: dict, headers: dict[str, dict] | None) -> None:
    """Refuse weights whose names or shapes differ from the model ``config.json`` describes.

    ``headers`` are the safetensors headers of the weight files transformers loads (``None``
    for pickle weights, which are not checked: their shapes are unknown without unpickling).
    """
    if headers is None or _is_quantized(config):
        # Pre-quantized checkpoints (AWQ, GPTQ, FP8, ...) store other tensors than the float
        # modules have (qweight, qzeros, scales; see raydock/modelgen/quantized.py).
        return
    model = _meta_skeleton(root)
    to_model_key = _checkpoint_key_mapper(model)
    if to_model_key is None:
        return  # transformers fuses or splits this model's tensors while loading
    file_shapes = {
        tensor: entry["shape"] for header in headers.values() for tensor, entry in header.items()
    }
    _compare(model, {to_model_key(name): (name, shape) for name, shape in file_shapes.items()})


def _is_quantized(config: dict) -> bool:
    text_config = config.get("text_config")
    return "quantization_config" in config or (
        isinstance(text_config, dict) and "quantization_config" in text_config
    )


def _meta_skeleton(root: Path) -> PreTrainedModel:
    """The model config.json describes, as the engines build it, with meta tensors only."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise ArchiveError(
            f"the installed transformers {transformers.__version__} cannot build the model "
            f"config.json describes: {_short(e)}"
        ) from None


def _checkpoint_key_mapper(model: PreTrainedModel) -> Callable[[str], str] | None:
    """Map a checkpoint tensor name to the model's, the way transformers does when loading.

    ``None`` when transformers also fuses or splits tensors for this model (transformers 5
    stores e.g. Mixtral's experts stacked): file shapes then differ from the modules' by design.
    """
    rename = _transformers_renaming(model)
    if rename is None:
        return None
    known = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    return lambda key: _with_base_prefix(rename(key), model.base_model_prefix, known)


def _transformers_renaming(model: PreTrainedModel) -> Callable[[str], str] | None:
    try:  # transformers >= 5 renames legacy and some models' checkpoint keys while loading
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4.x: names are compared as they are (prefix aside)
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    if any(isinstance(t, WeightConverter) for t in transforms):
        return None
    return lambda key: rename_source_key(key, transforms, [])[0]


def _with_base_prefix(key: str, prefix: str, known: set[str]) -> str:
    """Checkpoints of the bare base model lack its prefix ("model."); others may carry it
    where the model does not: transformers loads both."""
    if not prefix or key in known:
        return key
    if f"{prefix}.{key}" in known:
        return f"{prefix}.{key}"
    stripped = key.removeprefix(f"{prefix}.")
    return stripped if stripped in known else key


def _compare(model: PreTrainedModel, file_tensors: dict[str, tuple[str, list[int]]]) -> None:
    """``file_tensors``: model key -> (name in the file, shape in the file)."""
    state_dict = model.state_dict(keep_vars=True)
    mismatched = [
        f"{name} has shape {shape} but config.json implies {list(state_dict[key].shape)}"
        for key, (name, shape) in _natural(file_tensors.items())
        if key in state_dict and list(state_dict[key].shape) != shape
    ]
    if mismatched:
        raise ArchiveError(
            f"the weights do not match config.json: {_some(mismatched)}; {_RESAVE_HINT}"
        )
    missing = [key for key in state_dict if key not in file_tensors]
    missing = _natural(_drop_allowed_missing(model, missing, set(file_tensors)))
    if missing:
        raise ArchiveError(
            f"the weights lack {len(missing)} tensor(s) that config.json's model "
            f"({type(model).__name__}) needs: {_some(missing)}; {_RESAVE_HINT}"
        )
    unexpected = [key for key in file_tensors if key not in state_dict]
    unexpected = _natural(_drop_allowed_unexpected(model, unexpected))
    if unexpected:
        names = [file_tensors[key][0] for key in unexpected]
        raise ArchiveError(
            f"the weights hold {len(names)} tensor(s) that config.json's model "
            f"({type(model).__name__}) does not have: {_some(names)}; {_RESAVE_HINT}"
        )


def _drop_allowed_missing(
    model: PreTrainedModel, missing: list[str], present: set[str]
) -> list[str]:
    """Tied weights (lm_head.weight with tie_word_embeddings) are the same tensor as another,
    so checkpoints hold only one of them; transformers also ignores its listed patterns."""
    state_dict = model.state_dict(keep_vars=True)
    present_ids = {id(tensor) for key, tensor in state_dict.items() if key in present}
    ignored = _patterns(model._keys_to_ignore_on_load_missing)
    return [
        key
        for key in missing
        if id(state_dict[key]) not in present_ids and not (ignored and ignored.search(key))
    ]


def _drop_allowed_unexpected(model: PreTrainedModel, unexpected: list[str]) -> list[str]:
    """Buffers are not weights: older checkpoints saved some (rotary inv_freq, per layer,
    position_ids) that are now computed; transformers ignores them and its listed patterns."""
    buffer_tails = {_tail(name) for name, _ in model.named_buffers()}
    ignored = _patterns(model._keys_to_ignore_on_load_unexpected)
    return [
        key
        for key in unexpected
        if _tail(key) not in buffer_tails and not (ignored and ignored.search(key))
    ]


def _tail(key: str) -> str:
    return ".".join(key.split(".")[-2:])


def _patterns(patterns: Iterable[str] | None) -> re.Pattern[str] | None:
    patterns = list(patterns or ())
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _natural(items: Iterable[Any]) -> list[Any]:
    """Sorted with numbers compared as numbers (layers.2 before layers.10)."""

    def key(item: Any) -> list[Any]:
        text = item[0] if isinstance(item, tuple) else item
        # re.split with a group alternates text and digit runs: odd positions are numbers
        return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"([0-9]+)", text))]

    return sorted(items, key=key)


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" (and {len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def _short(error: Exception, limit: int = 400) -> str:
    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return reason if len(reason) <= limit else reason[:limit] + "..."
