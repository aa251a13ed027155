"""Deterministic random LoRA adapters (PEFT layout) for the generated models.

The same arguments always give byte-identical ``adapter_config.json`` and
``adapter_model.safetensors``. The files are written with torch and safetensors directly (peft
is not needed to write them) in the layout ``peft``'s ``model.save_pretrained(dir)`` uses, so
``PeftModel.from_pretrained(base, dir)`` loads them onto any generated model of that size.

Unlike a freshly initialised peft adapter (whose ``lora_B`` is zero, so it changes nothing),
both matrices are random and scaled so that the update ``alpha / r * B @ A`` of each adapted
layer is as large as the layer's own weights: the adapter visibly changes what the model
generates, and adapters of different seeds change it differently.

Usage::

    from raydock.modelgen.adapters import DROP, build_adapter_zip, cached_adapter_dir

    adapter_dir = cached_adapter_dir("tiny", seed=1)  # generated once, then cached
    build_adapter_zip("/tmp/lora.zip", "tiny", seed=1)
    # a broken adapter, for tests of the import checks:
    build_adapter_zip("/tmp/bad.zip", "tiny", overrides={"config": {"r": DROP}})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raydock.modelgen import (
    GENERATOR_VERSION,
    SIZES,
    _cache_lock,
    _check_size,
    _default_cache_root,
    write_zip,
)

__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_GENERATOR_VERSION",
    "DROP",
    "TARGET_MODULES",
    "adapter_config",
    "adapter_tensors",
    "build_adapter_zip",
    "cached_adapter_dir",
    "default_base_name",
    "generate_adapter",
    "lora_tensor_name",
]

#: Bump whenever the output of :func:`generate_adapter` changes for some arguments; it is part
#: of the cache directory name (with the base models' ``GENERATOR_VERSION``).
ADAPTER_GENERATOR_VERSION = 1

ADAPTER_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")

#: The Llama linear layers an adapter may target, with their parent module in a decoder layer.
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

#: Standard deviation of the update ``alpha / r * B @ A`` relative to the base weights' own
#: (``initializer_range``): 1.0 makes each adapted layer roughly twice as "loud".
_UPDATE_STRENGTH = 1.0
_BASE_WEIGHT_STD = 0.02  # llama_config(...).initializer_range


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: In ``build_adapter_zip(overrides=...)``: remove this config key or tensor.
DROP: Any = _Drop()


def default_base_name(size: str) -> str:
    """The ``base_model_name_or_path`` a generated adapter names by default."""
    return f"raydock/modelgen-{size}"


def lora_tensor_name(layer: int, module: str, matrix: str) -> str:
    """PEFT's name of a LoRA matrix (``"A"`` or ``"B"``) of ``module`` in decoder ``layer``."""
    if module not in TARGET_MODULES:
        allowed = ", ".join(TARGET_MODULES)
        raise ValueError(f"unknown target module {module!r}: allowed are {allowed}")
    if matrix not in ("A", "B"):
        raise ValueError(f"matrix must be 'A' or 'B', not {matrix!r}")
    parent = TARGET_MODULES[module]
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{matrix}.weight"


def _linear_shape(spec: Mapping[str, int], module: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Llama linear layer."""
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    q_dim = spec["num_attention_heads"] * head_dim
    kv_dim = spec["num_key_value_heads"] * head_dim
    return {
        "q_proj": (q_dim, hidden),
        "k_proj": (kv_dim, hidden),
        "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, q_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }[module]


def _check_params(size: str, rank: int, alpha: float, target_modules: Sequence[str]) -> list[str]:
    spec = _check_size(size)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, not {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, not {alpha!r}")
    if isinstance(target_modules, str):
        raise ValueError("target_modules must be a sequence of module names, not a string")
    modules = sorted(set(target_modules))
    if not modules:
        raise ValueError("target_modules must name at least one module")
    for module in modules:
        if module not in TARGET_MODULES:
            allowed = ", ".join(TARGET_MODULES)
            raise ValueError(f"unknown target module {module!r}: allowed are {allowed}")
        if rank > min(_linear_shape(spec, module)):
            raise ValueError(f"rank {rank} exceeds the dimensions of {module} in the {size} model")
    return modules


def adapter_config(
    size: str = "tiny",
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    base_name: str | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a generated adapter (keys peft 0.13 and later know)."""
    modules = _check_params(size, rank, alpha, target_modules)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_name or default_base_name(size),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def adapter_tensors(
    size: str = "tiny",
    seed: int = 0,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> dict[str, Any]:
    """The adapter's float32 LoRA matrices by PEFT name: ``lora_A`` [r, in], ``lora_B`` [out, r].

    Drawn in (layer, module) order from a private generator seeded with ``seed``. ``lora_A``
    has PEFT's own initial spread (kaiming-uniform's std, ``1 / sqrt(3 * in)``); ``lora_B`` is
    not zero but sized so that ``alpha / r * B @ A`` has the spread of the base weights times
    ``_UPDATE_STRENGTH``.
    """
    import torch

    modules = _check_params(size, rank, alpha, target_modules)
    spec = SIZES[size]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scaling = alpha / rank
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec["num_hidden_layers"]):
        for module in modules:
            out_features, in_features = _linear_shape(spec, module)
            std_a = 1.0 / math.sqrt(3 * in_features)
            # std(B @ A) = sqrt(r) * std_a * std_b for independent entries
            std_b = _UPDATE_STRENGTH * _BASE_WEIGHT_STD / (scaling * math.sqrt(rank) * std_a)
            a = torch.randn(rank, in_features, generator=gen, dtype=torch.float32) * std_a
            b = torch.randn(out_features, rank, generator=gen, dtype=torch.float32) * std_b
            tensors[lora_tensor_name(layer, module, "A")] = a.contiguous()
            tensors[lora_tensor_name(layer, module, "B")] = b.contiguous()
    return tensors


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt"})


def generate_adapter(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    base_name: str | None = None,
) -> Path:
    """Write a random LoRA adapter for the ``size`` models into ``out_dir``; return ``out_dir``.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT layout). The adapter
    fits every generated model of ``size``, whatever the model's seed. ``base_name`` is the
    config's ``base_model_name_or_path`` (default :func:`default_base_name`). Raises
    ValueError for an unknown size or module, or a rank the layers cannot hold.
    """
    config = adapter_config(size, rank, alpha, target_modules, base_name)
    tensors = adapter_tensors(size, seed, rank, alpha, target_modules)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "adapter_config.json", config)
    _save_tensors(out / "adapter_model.safetensors", tensors)
    for name in ADAPTER_FILES:  # safetensors writes 0600; make the files readable
        os.chmod(out / name, 0o644)
    return out


def _cache_name(
    size: str,
    seed: int,
    rank: int,
    alpha: float,
    modules: list[str],
    base_name: str | None,
) -> str:
    name = (
        f"{size}-lora-s{seed}-r{rank}-a{alpha:g}-{'+'.join(modules)}"
        f"-v{GENERATOR_VERSION}.{ADAPTER_GENERATOR_VERSION}"
    )
    if base_name is not None:
        name += "-b" + hashlib.sha256(base_name.encode()).hexdigest()[:12]
    return name


def _is_complete(adapter_dir: Path) -> bool:
    return all((adapter_dir / name).is_file() for name in ADAPTER_FILES)


def cached_adapter_dir(
    size: str = "tiny",
    seed: int = 0,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    base_name: str | None = None,
    cache_root: str | Path | None = None,
) -> Path:
    """Directory holding this adapter, generated on first use; treat it as read-only.

    Same cache root as :func:`raydock.modelgen.cached_model_dir` (``cache_root``, else
    ``$RAYDOCK_MODEL_CACHE``, else ``~/.cache/raydock/models``), in
    ``<size>-lora-s<seed>-r<rank>-a<alpha>-<modules joined by +>-v<GENERATOR_VERSION>.
    <ADAPTER_GENERATOR_VERSION>`` (plus ``-b<hash>`` with a ``base_name``). Written to a
    temporary directory and renamed into place, so no process sees a half-written adapter.
    """
    modules = _check_params(size, rank, alpha, target_modules)
    root = Path(cache_root).expanduser() if cache_root is not None else _default_cache_root()
    final = root / _cache_name(size, seed, rank, alpha, modules, base_name)
    if _is_complete(final):
        return final
    with _cache_lock:
        if _is_complete(final):
            return final
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():  # incomplete leftover: move it out of the way
            stale = root / f".{final.name}.stale-{uuid.uuid4().hex}"
            with contextlib.suppress(OSError):
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            generate_adapter(tmp, size, seed, rank, alpha, modules, base_name)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final):  # another process was first; theirs is identical
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _apply_overrides(source: Path, overrides: Mapping[str, Any]) -> dict[str, bytes]:
    """The adapter files ``overrides`` changes, as bytes."""
    unknown = set(overrides) - {"config", "tensors"}
    if unknown:
        raise ValueError(f"overrides takes the keys 'config' and 'tensors', not {sorted(unknown)}")
    files: dict[str, bytes] = {}
    if overrides.get("config"):
        config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
        for key, value in overrides["config"].items():
            if value is DROP:
                config.pop(key, None)
            else:
                config[key] = value
        files["adapter_config.json"] = (
            json.dumps(config, indent=2, sort_keys=True) + "\n"
        ).encode()
    if overrides.get("tensors"):
        import numpy as np
        import torch
        from safetensors.torch import load_file, save

        tensors = load_file(str(source / "adapter_model.safetensors"))
        for name, value in overrides["tensors"].items():
            if value is None or value is DROP:
                tensors.pop(name, None)
            elif isinstance(value, np.ndarray):
                tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
            else:
                tensors[name] = value.contiguous()
        files["adapter_model.safetensors"] = save(tensors, metadata={"format": "pt"})
    return files


def build_adapter_zip(
    zip_path: str | Path,
    size: str = "tiny",
    seed: int = 0,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    base_name: str | None = None,
    extra_files: Mapping[str, bytes | None] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    top_level_dir: str | None = None,
    cache_root: str | Path | None = None,
) -> Path:
    """Write a ZIP_DEFLATED archive of the adapter from :func:`cached_adapter_dir`.

    ``overrides`` builds a broken (or unusual) adapter for tests:
    ``{"config": {key: value}}`` sets adapter_config.json keys (:data:`DROP` removes one) and
    ``{"tensors": {name: tensor}}`` adds or replaces tensors of adapter_model.safetensors
    (a torch tensor or numpy array; ``None`` or :data:`DROP` removes one). ``extra_files``
    then maps archive names to contents that are added or replace a file (``None`` leaves it
    out), as in :func:`raydock.modelgen.build_model_zip`; ``top_level_dir`` puts every entry
    under that folder. The archive is byte-identical for identical inputs.
    """
    source = cached_adapter_dir(
        size, seed, rank, alpha, target_modules, base_name, cache_root=cache_root
    )
    entries: dict[str, Path | bytes] = {name: source / name for name in ADAPTER_FILES}
    entries.update(_apply_overrides(source, overrides or {}))
    for name, data in (extra_files or {}).items():
        if data is None:
            entries.pop(name, None)
        else:
            entries[name] = bytes(data)
    return write_zip(zip_path, entries, top_level_dir)
