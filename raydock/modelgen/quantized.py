"""Pre-quantized (AWQ / GPTQ, 4-bit) checkpoints of the generated models, for vLLM tests.

Nothing can be downloaded here, so the project writes such checkpoints itself: each linear
layer of a decoder block is quantized round-to-nearest in groups of `group_size` input rows
and packed the way AutoAWQ ("gemm") and AutoGPTQ (v1, symmetric, no act-order) store it.
Embeddings, norms and lm_head stay float16. The result loads like any published checkpoint of
that format: `config.json` declares `quantization_config`, the weights are in
`model.safetensors`, the tokenizer files are the source model's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

METHODS = ("awq", "gptq")
# AutoAWQ packs 8 output columns into an int32 in this order (nibble k holds column ORDER[k])
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_IN_ORDER = tuple(range(8))  # AutoGPTQ: nibble k holds element k
_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pack(values: np.ndarray, axis: int, order: tuple[int, ...] = _IN_ORDER) -> np.ndarray:
    """Pack 4-bit values 8 to an int32 along `axis` (nibble k holds element order[k])."""
    v = np.moveaxis(values.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    packed = np.zeros(v.shape[:-1], dtype=np.uint32)
    for k, col in enumerate(order):
        packed |= v[..., col] << np.uint32(4 * k)
    return np.moveaxis(packed.view(np.int32), -1, axis)


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """[in, out] -> [in / group_size, group_size, out]"""
    return w.reshape(w.shape[0] // group_size, group_size, w.shape[1])


def quantize_awq(weight: np.ndarray, group_size: int) -> dict[str, np.ndarray]:
    """Asymmetric 4-bit RTN of a torch Linear weight [out, in], in AutoAWQ gemm layout."""
    g = _groups(weight.T.astype(np.float32), group_size)
    lo, hi = g.min(axis=1), g.max(axis=1)  # [groups, out]
    scale = np.maximum(hi - lo, 1e-8) / 15
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(g / scale[:, None]) + zero[:, None], 0, 15).reshape(weight.T.shape)
    return {
        "qweight": _pack(q, axis=1, order=_AWQ_ORDER),
        "qzeros": _pack(zero, axis=1, order=_AWQ_ORDER),
        "scales": scale.astype(np.float16),
    }


def quantize_gptq(weight: np.ndarray, group_size: int) -> dict[str, np.ndarray]:
    """Symmetric 4-bit RTN of a torch Linear weight [out, in], in AutoGPTQ v1 layout."""
    g = _groups(weight.T.astype(np.float32), group_size)
    scale = np.maximum(np.abs(g).max(axis=1), 1e-8) / 7  # [groups, out]
    q = np.clip(np.round(g / scale[:, None]) + 8, 0, 15).reshape(weight.T.shape)
    n_in = weight.shape[1]
    return {
        "qweight": _pack(q, axis=0),
        # v1 stores zero - 1; symmetric means zero 8 everywhere
        "qzeros": _pack(np.full(scale.shape, 7), axis=1),
        "scales": scale.astype(np.float16),
        "g_idx": (np.arange(n_in) // group_size).astype(np.int32),
    }


def dequantize(tensors: dict[str, np.ndarray], method: str, group_size: int) -> np.ndarray:
    """The float weight [out, in] a checkpoint's tensors stand for (what the kernels compute)."""

    def unpack(packed: np.ndarray, axis: int, order: tuple[int, ...]) -> np.ndarray:
        p = np.moveaxis(packed.view(np.uint32), axis, -1)
        nibbles = np.stack([(p >> np.uint32(4 * k)) & 0xF for k in range(8)], axis=-1)
        out = np.empty_like(nibbles)
        out[..., list(order)] = nibbles
        return np.moveaxis(out.reshape(*p.shape[:-1], -1), -1, axis).astype(np.float32)

    scales = tensors["scales"].astype(np.float32)
    if method == "awq":
        q = unpack(tensors["qweight"], 1, _AWQ_ORDER)
        zeros = unpack(tensors["qzeros"], 1, _AWQ_ORDER)
    else:
        q = unpack(tensors["qweight"], 0, _IN_ORDER)
        zeros = unpack(tensors["qzeros"], 1, _IN_ORDER) + 1
    rows = np.arange(q.shape[0]) // group_size
    return ((q - zeros[rows]) * scales[rows]).T


def quantize_model(
    src_dir: str | Path, out_dir: str | Path, method: str, group_size: int = 64
) -> Path:
    """Write a `method` (awq | gptq) 4-bit copy of the Hugging Face model in `src_dir`."""
    from safetensors.numpy import load_file, save_file

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, not {method!r}")
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quantize = quantize_awq if method == "awq" else quantize_gptq
    tensors: dict[str, np.ndarray] = {}
    for name, value in load_file(src / "model.safetensors").items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rsplit(".", 1)[-1] in _QUANTIZED:
            if value.shape[1] % group_size:
                raise ValueError(
                    f"{name}: {value.shape[1]} inputs are not a multiple of {group_size}"
                )
            tensors |= {f"{module}.{k}": v for k, v in quantize(value, group_size).items()}
        else:
            tensors[name] = value.astype(np.float16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": method,
        "bits": 4,
        "group_size": group_size,
        **(
            {"zero_point": True, "version": "gemm"}
            if method == "awq"
            else {"sym": True, "desc_act": False, "checkpoint_format": "gptq"}
        ),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in src.iterdir():
        if path.name not in ("config.json", "model.safetensors") and path.is_file():
            shutil.copy(path, out / path.name)
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600
    return out
