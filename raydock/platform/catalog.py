"""The platform-hosted catalog (`configs/catalog.yaml`): open models offered for one-step
deploys, each with its published config figures, so the platform says which deviceTypes an
entry fits before anything is downloaded."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import yaml

from raydock.config import CONFIG_DIR
from raydock.errors import ApiError, NotFound
from raydock.platform.schemas import ScalingParameters

_REQUIRED = ("id", "name", "family", "repo", "parameters", "context_length", "license", "config")
#: The least a catalog repo's weights take per parameter. The catalog records no file sizes;
#: its checkpoints are 16-bit or wider (each config's torch_dtype), none quantized.
MIN_BYTES_PER_PARAMETER = 2


@lru_cache
def entries() -> tuple[dict[str, Any], ...]:
    """Every catalog entry, checked once: required fields present, ids and repos unique."""
    path = CONFIG_DIR / "catalog.yaml"
    models = (yaml.safe_load(path.read_text()) or {}).get("models") or []
    seen: set[str] = set()
    for i, entry in enumerate(models):
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {missing}")
        for key in (entry["id"], entry["repo"]):
            if key in seen:
                raise ValueError(f"{path}: {key!r} appears twice")
            seen.add(key)
    return tuple(models)


def get(entry_id: str) -> dict[str, Any]:
    for entry in entries():
        if entry["id"] == entry_id:
            return entry
    raise NotFound(f"catalog entry {entry_id!r} not found; GET /api/public/catalog lists them")


def as_model(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry in the shape of an imported model, for the deploy checks."""
    return {
        "metadata": {
            "config_figures": entry["config"],
            "parameters": entry["parameters"],
            "origin": origin(entry),
        }
    }


def origin(entry: dict[str, Any]) -> dict[str, Any]:
    """What a model imported from an entry records about where it came from."""
    return {
        "catalogId": entry["id"],
        "repoId": entry["repo"],
        "optimizations": list(entry.get("optimizations") or []),
    }


def import_refusal(entry: dict[str, Any], max_archive_bytes: int) -> str | None:
    """Why the entry's model files cannot be imported on this platform (None: they can):
    its weights alone, at 2 bytes per parameter, are over the import limit."""
    weights = entry["parameters"] * MIN_BYTES_PER_PARAMETER
    if weights <= max_archive_bytes:
        return None
    return (
        f"{entry['name']} cannot be imported here: its weights take at least "
        f"{weights / 2**30:.1f} GiB ({entry['parameters']:,} parameters at "
        f"{MIN_BYTES_PER_PARAMETER} bytes), over the import limit (max_archive_bytes "
        f"{max_archive_bytes})"
    )


def check_import(
    entry: dict[str, Any], connection_id: str | None, param: str = "connectionId"
) -> None:
    """Refuse, before an import starts, one that can only fail: a gated repo without a
    connection (the Hub refuses anonymous downloads). The files' size is the import's first
    check, on the Hub's own listing (`importRefusal` is the catalog's lower bound of it)."""
    if entry.get("gated") and not connection_id:
        raise ApiError(
            400,
            f"{entry['repo']} is a gated repository: give {param}, a connection whose "
            "Hugging Face account has accepted its licence",
            param,
            "connection_required",
        )


def check_optimization(
    model: dict[str, Any],
    optimization: dict[str, Any],
    param: str = "optimizationInfo.optimizationType",
) -> None:
    """A catalog model runs the optimizations its entry lists (its architecture's);
    `param`: where the request gave optimizationType."""
    allowed = ((model.get("metadata") or {}).get("origin") or {}).get("optimizations")
    kind = optimization.get("optimizationType") or ""
    if kind and allowed is not None and kind not in allowed:
        raise ApiError(
            400,
            f"optimizationType {kind!r} is not an engine this model's architecture supports; "
            f"choose one of {['', *allowed]}",
            param,
            "invalid_optimization",
        )


def listing(
    max_archive_bytes: int, name: str | None = None, family: str | None = None
) -> list[dict[str, Any]]:
    """Entries matching a name (substring of id, name or repo) and a family, each with the
    deviceTypes it fits unoptimized at the default batch size and the smallest of them, and
    why it cannot be imported here (`importRefusal`, null when it can)."""
    from raydock.platform.deploy_checks import fit_report

    batch = ScalingParameters().maxBatchSize
    found = []
    for entry in entries():
        text = f"{entry['id']} {entry['name']} {entry['repo']}".lower()
        if name and name.lower() not in text:
            continue
        if family and family.lower() != entry["family"]:
            continue
        report = fit_report(as_model(entry), {}, batch)
        fits = [d for d, e in report["deviceTypes"].items() if e["fits"]]
        found.append(
            {
                **{k: v for k, v in entry.items() if k != "config"},
                "config": entry["config"],
                "deviceTypes": fits,
                "suggestedDeviceType": report["suggestedDeviceType"],
                "importRefusal": import_refusal(entry, max_archive_bytes),
            }
        )
    return found
