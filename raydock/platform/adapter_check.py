"""An adapter checked against its base model: the second stage of an adapter's import.

The archive stage (model_archive.inspect_model_dir) sees only the adapter's own files; this
one reads the base model's safetensors headers (no tensor data) and refuses an adapter that
cannot apply to it: another architecture, target modules the base lacks, shapes or depth
that do not match, ranks and alphas out of range. What it returns is what serving the
adapter needs (rank, alpha, target modules, and the settings that keep it from being applied
per request: :func:`per_request_unsupported`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from raydock.platform.model_archive import (
    _SAFETENSORS_DTYPE_BITS,
    ArchiveError,
    _check_adapter_config,
    _inspect_base_weights,
    _is_count,
    _list_files,
    _read_json_object,
    check_layout,
    read_safetensors_header,
)

#: Above these an adapter_config.json value is a mistake, not a choice (LoRA ranks are small
#: by design: 4 to 256 in practice; alphas are of the order of the rank).
MAX_LORA_RANK = 1024
MAX_LORA_ALPHA = 100_000
#: Seconds one check may spend matching the adapter's regexes (target_modules, rank_pattern
#: keys) against the base model's layer names: a hostile pattern such as "(?:.|.)*\d\d"
#: backtracks for minutes per name, and nothing cancels an import task. Plain patterns take
#: microseconds per name, so thousands of layers fit in it many times over.
REGEX_BUDGET_S = 5.0
_PEFT_PREFIX = "base_model.model."
# What peft's save_pretrained writes per adapted layer (the adapter name is stripped).
_LORA_TENSOR = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A"
    r"|lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_LORA_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_FLOAT_DTYPES = _LORA_DTYPES | {name for name in _SAFETENSORS_DTYPE_BITS if name.startswith("F")}
_RESAVE_ADAPTER = "save the adapter again with peft's model.save_pretrained(dir)"


class _RegexBudget:
    """What is left of one check's REGEX_BUDGET_S. Patterns are matched with the regex
    module, whose matches can time out (Python's re cannot be interrupted); its syntax and
    matching are re's (VERSION0), and validation still compiles with re, as peft does."""

    def __init__(self) -> None:
        self._end = time.monotonic() + REGEX_BUDGET_S

    def match(self, pattern: str, module: str, field: str, shown: str, *, whole: bool) -> bool:
        """re.fullmatch (``whole``) or re.match of ``pattern`` on ``module``; ``field`` and
        ``shown`` (the pattern as the user wrote it) name it in errors."""
        try:
            left = self._end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            find = regex.fullmatch if whole else regex.match
            return find(pattern, module, timeout=left) is not None
        except TimeoutError:
            raise ArchiveError(
                f"adapter_config.json {field}: {shown!r} is too slow to match: matching "
                f"target_modules and rank_pattern against the base model's layer names may "
                f"take at most {REGEX_BUDGET_S:g} s in all; use a simpler regex without nested "
                'repeats, or list the layers (e.g. ["q_proj", "v_proj"])'
            ) from None


@dataclass
class _BaseLayers:
    """What an adapter is checked against: the base model's layers, from its headers."""

    config: dict
    tensors: dict[str, list[int]]  # every tensor's shape
    # (out_features, in_features) of each layer with a weight matrix; None where a
    # quantization method this module does not know hides the real shape
    linear: dict[str, tuple[int, int] | None]
    num_layers: int | None

    @property
    def modules(self) -> set[str]:
        """Every layer (module path) with weights: what target_modules can name."""
        names = set(self.linear)
        names.update(name.rsplit(".", 1)[0] for name in self.tensors if "." in name)
        return names

    def leaf_names(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.linear})


def check_adapter_against_base(
    adapter_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    base_name: str | None = None,
) -> dict:
    """Check that a LoRA adapter fits its base model; return the facts serving it needs.

    The second stage of an adapter import, after :func:`inspect_model_dir` (``kind="adapter"``)
    accepted the adapter's own files. Compares adapter_config.json and the headers of
    adapter_model.safetensors with the base model's config.json and safetensors headers (no
    tensor data is read): peft_type, r, lora_alpha (and rank_pattern / alpha_pattern),
    target_modules, and the shape and layer index of every tensor. ``base_name`` is the base
    model's name in the hub, compared (as a hint only) with the adapter's
    base_model_name_or_path. Raises :class:`ArchiveError` saying what does not fit.

    Returns ``peft_type``, ``rank`` (the largest of r and the rank_pattern ranks: what a
    deployment's maxAdapterRank bounds, as vLLM counts it), ``alpha``, ``target_modules`` (the
    layer names that carry LoRA weights, e.g. ``["q_proj", "v_proj"]``),
    ``base_model_name_or_path``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
    ``use_dora``, ``bias``, ``modules_to_save``, ``per_request_unsupported``
    (:func:`per_request_unsupported`), ``adapted_layers`` (how many layers the adapter changes)
    and ``warnings`` (user-facing notes that did not refuse the adapter).
    """
    adapter_root, base_root = Path(adapter_dir), Path(base_dir)
    if not adapter_root.is_dir():
        raise ArchiveError(f"adapter folder {adapter_root} does not exist")
    if not base_root.is_dir():
        raise ArchiveError(f"base model folder {base_root} does not exist")
    # allow_pickle=False whatever the settings: a pickled adapter's shapes cannot be checked
    # without unpickling it.
    check_layout(_list_files(adapter_root), "adapter", allow_pickle=False)
    config = _read_json_object(adapter_root, "adapter_config.json")
    _check_adapter_config(config)
    _check_peft_type(config["peft_type"])
    _check_served_as_saved(config)
    rank = _lora_rank(config.get("r"), "'r'")
    alpha = _lora_alpha(config.get("lora_alpha"), "'lora_alpha'")
    rank_pattern = _lora_pattern(config, "rank_pattern", _lora_rank)
    alpha_pattern = _lora_pattern(config, "alpha_pattern", _lora_alpha)
    targets = _lora_targets(config)
    base = _read_base_layers(base_root)
    if config.get("fan_in_fan_out") is True:  # GPT-2's Conv1D stores its weight as [in, out]
        base.linear = {m: dims and (dims[1], dims[0]) for m, dims in base.linear.items()}
    adapter_name = config["base_model_name_or_path"]
    budget = _RegexBudget()
    _check_targets_exist(targets, base, adapter_name, budget)

    header = read_safetensors_header(
        adapter_root / "adapter_model.safetensors", "adapter_model.safetensors"
    )
    parts: dict[str, dict[str, list[int]]] = {}
    too_deep: list[tuple[int, str]] = []  # (layer index, tensor) beyond the base's layers
    for name, entry in sorted(header.items()):
        if not name.startswith(_PEFT_PREFIX):
            raise ArchiveError(
                f"adapter tensor {name!r} does not follow peft's naming (base_model.model."
                f"<layer>.lora_A.weight); {_RESAVE_ADAPTER}"
            )
        layer = _layer_index(name)
        if layer is not None and base.num_layers is not None and layer >= base.num_layers:
            too_deep.append((layer, name))
            continue
        module, part = _split_adapter_tensor(name, entry, base, adapter_name)
        if part is not None:
            parts.setdefault(module, {})[part] = entry["shape"]
    # Layers that differ in size say more (another model) than extra layers (a deeper one):
    # the shapes of the layers both have are checked first.
    for module, shapes in sorted(parts.items()):
        _check_lora_shapes(module, shapes, None, base, adapter_name)
    if too_deep:
        layer, name = max(too_deep)
        raise ArchiveError(
            f"adapter_model.safetensors has weights for layers up to {layer} (e.g. {name!r}), "
            f"but the base model has only {base.num_layers} layers (0 to "
            f"{base.num_layers - 1}); the adapter was made for a deeper model: import it on "
            f"the base model it was trained on ({adapter_name!r})"
        )
    if not parts:
        raise ArchiveError(
            "adapter_model.safetensors holds no LoRA weights (no *.lora_A.weight / "
            f"*.lora_B.weight tensors); {_RESAVE_ADAPTER}"
        )
    for module, shapes in sorted(parts.items()):
        if not _is_targeted(module, targets, base, budget):
            raise ArchiveError(
                f"adapter_model.safetensors has LoRA weights for {module}, but target_modules "
                f"in adapter_config.json ({_describe_targets(targets)}) does not name that "
                f"layer; the config and the weights do not belong together ({_RESAVE_ADAPTER})"
            )
        effective_rank = _pattern_value(rank_pattern, module, rank, budget, "rank_pattern")
        _check_lora_shapes(module, shapes, effective_rank, base, adapter_name)
        # matched here, under the budget, as peft will when it merges or loads the adapter
        _pattern_value(alpha_pattern, module, None, budget, "alpha_pattern")
    leaves = sorted({module.rsplit(".", 1)[-1] for module in parts})
    modules_to_save = config.get("modules_to_save")
    return {
        "peft_type": "LORA",
        "rank": max([rank, *rank_pattern.values()]),
        "alpha": alpha,
        "target_modules": leaves,
        "base_model_name_or_path": adapter_name,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.get("use_rslora") is True,
        "use_dora": config.get("use_dora") is True,
        "bias": config.get("bias", "none"),
        "modules_to_save": modules_to_save if isinstance(modules_to_save, list) else None,
        "per_request_unsupported": per_request_unsupported(config),
        "adapted_layers": len(parts),
        "warnings": _base_name_warnings(adapter_name, base.config, base_name),
    }


def per_request_unsupported(config: dict) -> list[str]:
    """The adapter_config.json settings that keep an adapter from being applied per request on
    a deployment of its base, each as "field: value (allowed: ...)"; empty for a plain LoRA.

    vLLM refuses them when it loads the adapter, and PEFT's mixed batches (the transformers
    engine) fail every sequence of a batch a DoRA adapter joins. A merge applies them all: the
    adapter deployed as its own deployment, or on a CTranslate2 replica, which merges too.
    (An init_lora_weights that rewrites the base is refused at import: _LOADS_AS_SAVED.)
    """
    found = []
    if config.get("use_dora"):
        found.append("use_dora: true (DoRA; allowed: false)")
    if config.get("bias", "none") != "none":
        found.append(f'bias: {json.dumps(config["bias"])} (allowed: "none")')
    if config.get("lora_bias"):
        found.append("lora_bias: true (allowed: false)")
    for field in ("layer_replication", "use_qalora", "use_bdlora"):  # vLLM refuses them
        if config.get(field):
            found.append(f"{field}: {json.dumps(config[field])} (allowed: null or false)")
    if config.get("modules_to_save"):
        found.append(
            f"modules_to_save: {json.dumps(config['modules_to_save'])} (allowed: null or [])"
        )
    return found


# init_lora_weights values under which PEFT loads an adapter onto the base's weights as they
# are. The others (pissa*, corda*, olora, loftq, lora_ga) compute their start from the base's
# weights and rewrite them in place when the adapter loads: on a replica that serves the base
# and its adapters, every later answer, the base's own too, would come from altered weights.
_LOADS_AS_SAVED = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _check_served_as_saved(config: dict) -> None:
    init = config.get("init_lora_weights", True)
    if init not in _LOADS_AS_SAVED:
        allowed = ", ".join(json.dumps(v) for v in _LOADS_AS_SAVED)
        raise ArchiveError(
            f"adapter_config.json init_lora_weights is {json.dumps(init)}: loading such an "
            "adapter rewrites the base model's weights; save it converted to a plain LoRA "
            "(peft: save_pretrained(..., path_initial_model_for_weight_conversion=...)) and "
            f"import that (allowed: {allowed})"
        )
    if config.get("alora_invocation_tokens"):
        raise ArchiveError(
            "adapter_config.json has alora_invocation_tokens (an activated LoRA, which applies "
            "only after those tokens): it can be neither merged nor served per request; "
            "import a plain LoRA (alora_invocation_tokens: null)"
        )


def _check_peft_type(peft_type: str) -> None:
    if peft_type != "LORA":
        hint = " (write it in capitals: 'LORA')" if peft_type.upper() == "LORA" else ""
        raise ArchiveError(
            f"adapter_config.json has peft_type {peft_type!r}, but only LoRA adapters "
            f"(peft_type 'LORA') can be served{hint}; train the adapter with peft's LoraConfig"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _lora_rank(value: Any, key: str) -> int:
    """``key``: how messages name the value (quoted)."""
    if value is None:
        raise ArchiveError(f"adapter_config.json has no {key} (the LoRA rank); {_RESAVE_ADAPTER}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ArchiveError(
            f"adapter_config.json {key} must be a positive whole number (the LoRA rank, "
            f"e.g. 8 or 16), not {value!r}"
        )
    if value > MAX_LORA_RANK:
        raise ArchiveError(
            f"adapter_config.json {key} is {value}, above the {MAX_LORA_RANK} limit: a LoRA "
            "rank is small by design (typically 4 to 256); retrain the adapter with a lower r"
        )
    return value


def _lora_alpha(value: Any, key: str) -> int | float:
    if value is None:
        raise ArchiveError(
            f"adapter_config.json has no {key} (the LoRA scaling numerator); {_RESAVE_ADAPTER}"
        )
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ArchiveError(
            f"adapter_config.json {key} must be a positive number (usually r or 2 * r), "
            f"not {value!r}"
        )
    if value > MAX_LORA_ALPHA:
        raise ArchiveError(
            f"adapter_config.json {key} is {value:g}, above the {MAX_LORA_ALPHA} limit: the "
            "adapter's update would swamp the base model; check the value (usually r or 2 * r)"
        )
    return value


def _lora_pattern(config: dict, key: str, check: Callable[[Any, str], Any]) -> dict:
    """rank_pattern / alpha_pattern: {layer name or regex: value}; null counts as empty."""
    pattern = config.get(key)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise ArchiveError(
            f"adapter_config.json {key!r} must be an object mapping layer names to values"
        )
    for name, value in pattern.items():
        _compile_target(name, key)
        # and as peft matches it: some keys fail only there (e.g. "(?i)q_proj" for re)
        _compile_target(name, key, _pattern_key_regex(name))
        check(value, f"{key!r} entry {name!r}")
    return dict(pattern)


def _compile_target(pattern: str, key: str, matched: str | None = None) -> None:
    """Refuse ``pattern`` unless re (what peft uses) and regex (what matches here) both read
    it; ``matched``: the regex built from it, where that is what gets matched."""
    matched = matched or pattern
    try:
        re.compile(matched)
        regex.compile(matched)
    except (re.error, regex.error) as e:
        how = f" as peft matches it, {matched!r}" if matched != pattern else ""
        raise ArchiveError(
            f"adapter_config.json {key!r} holds {pattern!r}, which is not a valid regular "
            f"expression{how} ({e})"
        ) from None


def _pattern_key_regex(key: str) -> str:
    """peft's rule for rank_pattern / alpha_pattern: the key matches the end of the module
    path, after a dot or from its start."""
    return rf"(.*\.)?({key})$"


def _pattern_value(
    pattern: dict, module: str, default: Any, budget: _RegexBudget, field: str
) -> Any:
    """peft's rule: the first key that matches the end of the module path wins."""
    for key, value in pattern.items():
        if budget.match(_pattern_key_regex(key), module, f"{field}.{key}", key, whole=False):
            return value
    return default


def _lora_targets(config: dict) -> str | list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets:
        if targets != "all-linear":
            _compile_target(targets, "target_modules")
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return sorted(set(targets))
    raise ArchiveError(
        "adapter_config.json 'target_modules' must list the layers the adapter changes "
        f'(e.g. ["q_proj", "v_proj"]), not {targets!r}; {_RESAVE_ADAPTER}'
    )


def _describe_targets(targets: str | list[str]) -> str:
    return repr(targets) if isinstance(targets, str) else ", ".join(targets)


def _is_targeted(
    module: str, targets: str | list[str], base: _BaseLayers, budget: _RegexBudget
) -> bool:
    """peft's rules: a list names layers by their last path components, a string is a regex
    the whole module path must match, and "all-linear" is every linear layer but lm_head."""
    if targets == "all-linear":
        return module in base.linear and module.rsplit(".", 1)[-1] != "lm_head"
    if isinstance(targets, str):
        return budget.match(targets, module, "target_modules", targets, whole=True)
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_targets_exist(
    targets: str | list[str], base: _BaseLayers, adapter_name: str, budget: _RegexBudget
) -> None:
    modules = base.modules
    names = ", ".join(base.leaf_names())
    if isinstance(targets, str):
        if targets != "all-linear" and not any(
            _is_targeted(m, targets, base, budget) for m in modules
        ):
            raise ArchiveError(
                f"adapter_config.json target_modules {targets!r} matches no layer of the base "
                f"model (its weight layers are {names}); the adapter was made for another "
                f"architecture than this base: import it on {adapter_name!r} or a model like it"
            )
        return
    for target in targets:
        if not any(_is_targeted(m, [target], base, budget) for m in modules):
            raise ArchiveError(
                f"adapter_config.json target_modules names {target!r}, but the base model has "
                f"no such layer (its weight layers are {names}); the adapter was made for "
                f"another architecture than this base: import it on {adapter_name!r} or a "
                "model like it, or fix target_modules"
            )


def _read_base_layers(root: Path) -> _BaseLayers:
    files = _list_files(root)
    if "config.json" not in files:
        raise ArchiveError(
            f"the base model folder {root.name} has no config.json, so the adapter cannot be "
            "checked against it; re-import the base model"
        )
    config = _read_json_object(root, "config.json")
    weight_format, headers = _inspect_base_weights(root, files, allow_pickle=True)
    if headers is None:
        raise ArchiveError(
            "the base model's weights are only in pickle format, so the adapter's shapes "
            "cannot be checked against them; re-import the base model with safetensors weights "
            "(model.save_pretrained(dir, safe_serialization=True)), then the adapter"
        )
    tensors: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for header in headers.values():
        for name, entry in header.items():
            tensors[name] = entry["shape"]
            dtypes[name] = entry["dtype"]
    quant = config.get("quantization_config")
    linear: dict[str, tuple[int, int] | None] = {}
    for name, shape in tensors.items():
        if name.endswith(".weight") and len(shape) == 2:
            module = name[: -len(".weight")]
            # every weight matrix (embeddings too: headers do not tell them apart)
            known = dtypes[name] in _FLOAT_DTYPES
            linear[module] = (shape[0], shape[1]) if known else None
        elif name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            linear[module] = _quantized_linear_shape(module, tensors, quant)
    for section in (config, config.get("text_config")):
        num_layers = section.get("num_hidden_layers") if isinstance(section, dict) else None
        if _is_count(num_layers):
            break
    else:
        num_layers = None
    return _BaseLayers(config, tensors, linear, num_layers)


def _quantized_linear_shape(
    module: str, tensors: dict[str, list[int]], quant: Any
) -> tuple[int, int] | None:
    """(out, in) of an AWQ ("gemm") or GPTQ layer; None for a packing this module does not know.

    Both keep ``scales`` as [in / group_size, out]; AWQ packs ``qweight`` as [in, out * bits
    / 32], GPTQ as [in * bits / 32, out].
    """
    quant = quant if isinstance(quant, dict) else {}
    method = str(quant.get("quant_method", "")).lower()
    bits = quant.get("bits", 4)
    qweight, scales = tensors.get(module + ".qweight"), tensors.get(module + ".scales")
    if not (_is_count(bits) and bits in (2, 4, 8) and scales and len(scales) == 2 and qweight):
        return None
    if len(qweight) != 2:
        return None
    out_features = scales[1]
    if method == "awq":
        return out_features, qweight[0]
    if method == "gptq":
        return out_features, qweight[0] * (32 // bits)
    return None


def _split_adapter_tensor(
    name: str, entry: dict, base: _BaseLayers, adapter_name: str
) -> tuple[str, str | None]:
    """(module path, LoRA part) of an adapter tensor; part None for a full copy of a base
    tensor (modules_to_save, saved embeddings), which must have the base tensor's shape."""
    inner = name[len(_PEFT_PREFIX) :]
    match = _LORA_TENSOR.match(inner)
    module = match["module"] if match else inner.replace(".base_layer.", ".").rsplit(".", 1)[0]
    if match is None:
        base_key = inner.replace(".base_layer.", ".")
        if base_key not in base.tensors:
            raise ArchiveError(
                f"adapter tensor {name!r} is neither a LoRA matrix nor a copy of a base model "
                f"weight (the base has no {base_key!r}); the adapter was made for another model "
                f"than this base: import it on {adapter_name!r} or a model like it"
            )
        if entry["shape"] != base.tensors[base_key]:
            raise ArchiveError(
                f"adapter tensor {name!r} replaces the base model's {base_key!r} but has shape "
                f"{entry['shape']} where the base has {base.tensors[base_key]} (a resized "
                "vocabulary or another model); import the adapter on the base model it was "
                f"trained on ({adapter_name!r})"
            )
        return module, None
    if entry["dtype"] not in _LORA_DTYPES:
        raise ArchiveError(
            f"adapter tensor {name!r} has dtype {entry['dtype']}; LoRA weights must be "
            "floating point (F32, F16 or BF16)"
        )
    part = match["part"].replace(".weight", "")
    if part.startswith("lora_embedding"):
        known = module + ".weight" in base.tensors
    elif part in ("lora_A", "lora_B"):
        known = module in base.linear
    else:  # DoRA's magnitude or lora_B.bias: of a linear layer or an embedding
        known = module in base.linear or module + ".weight" in base.tensors
    if not known:
        raise _missing_layer(name, module, base, adapter_name)
    return module, part


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match[1]) if match else None


def _missing_layer(name: str, module: str, base: _BaseLayers, adapter_name: str) -> ArchiveError:
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in base.leaf_names():
        return ArchiveError(
            f"adapter tensor {name!r} adapts {leaf!r} layers, which the base model does not "
            f"have (its weight layers are {', '.join(base.leaf_names())}); the adapter was "
            f"made for another architecture: import it on {adapter_name!r} or a model like it"
        )
    example = min(m for m in base.linear if m.rsplit(".", 1)[-1] == leaf)
    return ArchiveError(
        f"adapter tensor {name!r} adapts {module!r}, which is not a layer of the base model "
        f"(whose {leaf} layers are named like {example!r}); the adapter was made for "
        f"another model: import it on {adapter_name!r} or a model like it"
    )


def _check_lora_shapes(
    module: str,
    shapes: dict[str, list[int]],
    rank: int | None,
    base: _BaseLayers,
    adapter_name: str,
) -> None:
    """lora_A [r, in] and lora_B [out, r] against the base layer's weight [out, in]
    (an embedding's weight is [in, out]: lora_embedding_A [r, vocab], _B [dim, r]), then
    (unless ``rank`` is None) their rank against the config's."""
    embedding = "lora_embedding_A" in shapes or "lora_embedding_B" in shapes
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in shapes and b_key not in shapes:
        raise ArchiveError(
            f"adapter_model.safetensors has {', '.join(sorted(shapes))} but no {a_key} and "
            f"{b_key} for {module}; the weights file is incomplete: {_RESAVE_ADAPTER}"
        )
    for present, absent in ((a_key, b_key), (b_key, a_key)):
        if present in shapes and absent not in shapes:
            raise ArchiveError(
                f"adapter_model.safetensors has {present} but no {absent} for {module}; the "
                f"weights file is incomplete: {_RESAVE_ADAPTER}"
            )
    if embedding:
        in_features, out_features = base.tensors[module + ".weight"]
        base_shape = f"[{in_features}, {out_features}] (vocabulary, width)"
    else:
        dims = base.linear[module]
        if dims is None:  # quantized by a method whose packing is not known here
            return
        out_features, in_features = dims
        base_shape = f"[{out_features}, {in_features}] (out, in)"
    a, b = shapes[a_key], shapes[b_key]
    other_model = (
        "the adapter was made for a model with other layer sizes (another model or "
        f"architecture): import it on the base model it was trained on ({adapter_name!r})"
    )
    for key, shape, axis, want in ((a_key, a, 1, in_features), (b_key, b, 0, out_features)):
        if len(shape) != 2 or shape[axis] != want:
            raise ArchiveError(
                f"adapter tensor {module}.{key} has shape {shape}, which does not fit the base "
                f"model's {module} with weight shape {base_shape}; {other_model}"
            )
    for key in ("lora_magnitude_vector", "lora_B.bias"):
        if key in shapes and shapes[key] != [out_features]:
            raise ArchiveError(
                f"adapter tensor {module}.{key} has shape {shapes[key]}, but the base model's "
                f"{module} has {out_features} outputs; {other_model}"
            )
    if rank is None:
        return
    if rank > min(in_features, out_features):
        raise ArchiveError(
            f"adapter_config.json sets rank {rank} for {module}, more than that layer's "
            f"smaller dimension ({min(in_features, out_features)}): such an adapter is no "
            "low-rank adapter; retrain it with a lower r"
        )
    if a[0] != rank or b[1] != rank:
        raise ArchiveError(
            f"adapter tensors {module}.{a_key} {a} and .{b_key} {b} have rank "
            f"{a[0] if a[0] != rank else b[1]}, but adapter_config.json sets r (or "
            f"rank_pattern) to {rank} for this layer; the config and the weights do not belong "
            f"together ({_RESAVE_ADAPTER})"
        )


def _same_model_name(a: str, b: str) -> bool:
    """Same model by name: the last path component, case-insensitively ("org/Llama-3-8B"
    and "/models/llama-3-8b/" match)."""

    def last(name: str) -> str:
        return re.split(r"[/\\]", name.strip().rstrip("/\\"))[-1].casefold()

    return last(a) == last(b)


def _base_name_warnings(adapter_name: str, base_config: dict, base_name: str | None) -> list[str]:
    # Decision: the base model's *name* is a hint, never a reason to refuse. Names are
    # unreliable both ways: base_model_name_or_path is often a local path of the trainer's
    # machine ("/home/u/llama3"), a hub mirror or an older repo name; config.json's
    # _name_or_path is absent (transformers 5 no longer saves it) or equally local; and the
    # hub name of the base is whatever its archive was called. An adapter trained on one
    # fine-tune of an architecture also applies, on purpose, to a sibling fine-tune with the
    # same shapes (e.g. a base and its instruct model). What decides whether the weights
    # apply is checked exactly above (layer names, shapes, depth); a different name with
    # matching shapes is reported as a warning for the user to confirm.
    names = [
        name
        for name in (base_name, base_config.get("_name_or_path"))
        if isinstance(name, str) and name.strip()
    ]
    if not names or any(_same_model_name(adapter_name, name) for name in names):
        return []
    return [
        f"the adapter was made for {adapter_name!r}, but its base model here is {names[0]!r}; "
        "its layers fit, so it was accepted: check that this is the model it was trained on "
        "(or a fine-tune of it), else its output will be poor"
    ]
