"""Artifact storage: where imported models live (a local directory by default).

Imports extract into a staging directory next to the final one and rename it into place only
when validation passed, so a failed import never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class ArtifactStore:
    def __init__(self, root: str):
        if root.startswith("s3://"):
            raise ValueError("s3:// artifact roots are not supported yet; use a local directory")
        self.root = Path(root).expanduser().resolve()
        (self.root / "models").mkdir(parents=True, exist_ok=True)

    def model_dir(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def staging_dir(self, model_id: str) -> Path:
        return self.root / "models" / f".staging-{model_id}"

    def commit(self, model_id: str) -> str:
        final = self.model_dir(model_id)
        os.replace(self.staging_dir(model_id), final)
        return str(final)

    def discard(self, model_id: str) -> None:
        for path in (self.staging_dir(model_id), self.model_dir(model_id)):
            shutil.rmtree(path, ignore_errors=True)

    def optimized_dir(self, key: str) -> Path:
        """Where an engine-specific conversion of a model lives (keyed by checksum + type)."""
        return self.root / "optimized" / key

    def optimized_keys(self) -> list[str]:
        root = self.root / "optimized"
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    def discard_optimized(self, key: str) -> None:
        shutil.rmtree(self.optimized_dir(key), ignore_errors=True)

    def entries(self) -> list[str]:
        """Everything stored (tests use this to prove failed imports left nothing behind)."""
        return sorted(p.name for p in (self.root / "models").iterdir())
