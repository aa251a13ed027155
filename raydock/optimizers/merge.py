"""A LoRA adapter merged into its base model's weights, with PEFT: what a deployment of the
adapter itself serves, on every engine (CTranslate2 converts the merged model; it has no
runtime LoRA). The merged directory is a complete model: weights, config, the base's
tokenizer, chat template and generation config (the adapter's own files win where it has
them)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from raydock.hf_quiet import quiet_progress_bars
from raydock.optimizers.ctranslate2 import TOKENIZER_FILES


def merged_key(base_checksum: str, adapter_checksum: str) -> str:
    """Store key of a merge, shared by every deployment of the same adapter on the same base;
    it starts with the adapter's digest, so deleting the adapter finds its merges."""
    return f"merged/{_digest(adapter_checksum)}-{_digest(base_checksum)}"


def is_merge_of(name: str, adapter_checksum: str) -> bool:
    """Whether `name` (a key below merged/) is a merge of the adapter with this checksum."""
    return name.startswith(f"{_digest(adapter_checksum)}-")


def _digest(checksum: str) -> str:
    return hashlib.sha256(checksum.encode()).hexdigest()[:16]


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Write base + adapter, merged, into `out_dir` (float32 weights, safetensors)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet_progress_bars():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:  # the adapter's own first, else the base's
        for source in (adapter_dir, base_dir):
            if (source / name).is_file():
                shutil.copy2(source / name, out_dir / name)
                break
