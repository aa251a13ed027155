"""CTranslate2 conversion: quantization checks, the converter, and the artifact cache key.

A converted model directory is self-contained: CTranslate2's ``model.bin``, ``config.json``
and ``vocabulary.json``, the Hugging Face tokenizer files, chat template and generation
config copied from the source model (CTranslate2's own ``config.json`` takes that name, so
the source model's config is kept as ``hf_config.json``), and ``raydock_ct2.json``, which
records how it was made. The directory is written under a temporary name beside its target
and renamed into place, so a reader never sees half a conversion.

Transformers 5 compatibility: CTranslate2 4.8.5's ``TransformersConverter`` already loads
models with ``dtype=`` and reads the RoPE base through ``config.rope_scaling`` (an alias of
transformers 5's ``rope_parameters``, which carries ``rope_theta``), so no shim is needed;
Llama, tied-embedding Llama, Mistral, Qwen2 and Qwen3 convert to logits within 5e-7 of
transformers in float32. Only the weight-loading progress bar is silenced here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydock.hf_quiet import quiet_progress_bars
from raydock.optimizers.plan import CT2_TYPES

#: What a CTranslate2 deployment may ask for; "float32" means no quantization.
COMPUTE_TYPES: tuple[str, ...] = (*CT2_TYPES, "float32")
#: Spellings of "no quantization" (the deploy API's "" / "no_quantization"): float32 weights.
NO_QUANTIZATION: tuple[str, ...] = ("", "none", "no_quantization", "float32")
#: Files copied from the source model so the converted directory serves on its own.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
MANIFEST = "raydock_ct2.json"
#: Files a complete converted directory holds.
REQUIRED_FILES: tuple[str, ...] = ("model.bin", "config.json", MANIFEST)

Progress = Callable[..., None]


class UnsupportedQuantization(ValueError):
    """Not a CTranslate2 compute type."""

    def __init__(self, message: str, quantization: str = ""):
        super().__init__(message)
        self.quantization = quantization


class ConversionError(RuntimeError):
    """The converter failed; the message carries its own reason."""


def normalize(quantization: str | None) -> str:
    """The compute type for a requested quantization ("" and "no_quantization" → float32)."""
    q = (quantization or "").strip().lower()
    if q in NO_QUANTIZATION:
        return "float32"
    if q not in COMPUTE_TYPES:
        raise UnsupportedQuantization(
            f"unknown CTranslate2 quantization {quantization!r}: expected one of "
            f"{list(COMPUTE_TYPES)} (or '' for none)",
            quantization=str(quantization),
        )
    return q


def _digest(model_checksum: str) -> str:
    digest = re.sub(r"[^0-9a-zA-Z]", "", str(model_checksum or "").split(":")[-1]).lower()
    if not digest:
        raise ValueError("a conversion's artifact key needs the model's checksum")
    return digest[:16]


def artifact_key(model_checksum: str, quantization: str) -> str:
    """Cache key of a model's conversion: stored beside the model and reused on redeploy."""
    return f"ct2-{normalize(quantization)}-{_digest(model_checksum)}"


def is_artifact_of(key: str, model_checksum: str) -> bool:
    """Whether `key` names a conversion (any quantization) of the weights with this checksum."""
    return key.startswith("ct2-") and key.endswith(f"-{_digest(model_checksum)}")


def is_complete(out_dir: str | Path) -> bool:
    out = Path(out_dir)
    return all((out / name).is_file() for name in REQUIRED_FILES)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _max_context(config: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return 2048


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConversionError(f"{model_dir / 'config.json'} is not a JSON object")
    return config


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"


def convert(
    model_dir: str | Path,
    out_dir: str | Path,
    quantization: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Convert the Hugging Face model in `model_dir` to CTranslate2 `quantization` in `out_dir`.

    Writes a temporary sibling directory and renames it to `out_dir`; on failure nothing is
    left behind and ConversionError carries the converter's reason. An `out_dir` that already
    holds a complete conversion is reused as is. `progress(fraction, message)` is told about
    each stage. Returns {"seconds", "size_bytes", "quantization", "out_dir", "reused"}.
    """
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    report = progress or (lambda *_: None)
    q = normalize(quantization)
    src, out = Path(model_dir), Path(out_dir)
    started = time.perf_counter()
    if is_complete(out):
        report(1.0, f"reusing the CTranslate2 {q} conversion")
        return {
            "seconds": 0.0,
            "size_bytes": _dir_size(out),
            "quantization": q,
            "out_dir": str(out),
            "reused": True,
        }
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} is not a Hugging Face model directory (no config.json)")
    hf_config = _read_config(src)
    if hf_config.get("is_encoder_decoder"):
        raise ConversionError(
            "raydock serves decoder-only (causal LM) models with CTranslate2; "
            f"{hf_config.get('model_type', 'this model')} is an encoder-decoder model"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    stage = tmp / "model"
    try:
        report(0.05, f"converting to CTranslate2 ({q})")
        try:
            with quiet_progress_bars():
                TransformersConverter(str(src)).convert(str(stage), quantization=q)
        except Exception as exc:
            raise ConversionError(
                f"CTranslate2 could not convert the model to {q}: {_describe(exc)}"
            ) from exc
        report(0.9, "copying the tokenizer and chat template")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, stage / name)
        shutil.copy2(src / "config.json", stage / "hf_config.json")
        seconds = time.perf_counter() - started
        manifest = {
            "format": 1,
            "quantization": q,
            "ctranslate2": ctranslate2.__version__,
            "architecture": (hf_config.get("architectures") or [None])[0],
            "maxContext": _max_context(hf_config),
            "vocabSize": hf_config.get("vocab_size"),
            "convertSeconds": round(seconds, 3),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(stage, 0o755)
        if is_complete(out):  # a concurrent conversion finished first: keep that one
            return {
                "seconds": seconds,
                "size_bytes": _dir_size(out),
                "quantization": q,
                "out_dir": str(out),
                "reused": True,
            }
        if out.exists():  # an incomplete leftover: move it aside, then drop it
            stale = out.parent / f".{out.name}.stale-{uuid.uuid4().hex}"
            with contextlib.suppress(OSError):
                os.rename(out, stale)
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(stage, out)
        except OSError:
            if not is_complete(out):  # not a concurrent conversion that won the race
                raise
        size = _dir_size(out)
        report(1.0, f"converted to CTranslate2 {q} in {seconds:.1f}s")
        return {
            "seconds": seconds,
            "size_bytes": size,
            "quantization": q,
            "out_dir": str(out),
            "reused": False,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
