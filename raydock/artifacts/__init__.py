"""Artifacts (model directories, uploaded and exported zips) in a local or S3 store, and the
node-local cache replicas load models from. Needs no Ray."""

from .cache import NodeCache, fetch_cached
from .store import (
    MANIFEST_NAME,
    ArtifactCorrupt,
    ArtifactError,
    ArtifactMissing,
    ArtifactStore,
    LocalStore,
    Manifest,
    ManifestFile,
    Progress,
    S3Store,
    open_store,
)

__all__ = [
    "MANIFEST_NAME",
    "ArtifactCorrupt",
    "ArtifactError",
    "ArtifactMissing",
    "ArtifactStore",
    "LocalStore",
    "Manifest",
    "ManifestFile",
    "NodeCache",
    "Progress",
    "S3Store",
    "fetch_cached",
    "open_store",
]
