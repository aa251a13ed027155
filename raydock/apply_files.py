"""Declarative deployment files (`configs/deployments/*.yaml`) on the client's side: read
them with the line of every field (so the API can say `file:line: field: ...`), hash the
zips they name, and write the live state back as such files. What the documents mean and
what changes is decided by the API (`POST /api/public/apply`, platform/apply.py)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUFFIXES = (".yaml", ".yml")


class FileError(Exception):
    """A file that cannot be read as deployment documents; the message starts `file:line:`."""


@dataclass
class Document:
    spec: dict[str, Any]
    source: str  # the file, as the user named it
    line: int  # where the document starts (1-based)
    lines: dict[str, int] = field(default_factory=dict)  # "hyperParameters.topK" -> its line
    folder: Path = Path(".")  # relative paths in the document (model.zip) start here

    def wire(self) -> dict[str, Any]:
        """The document as `POST /apply` takes it."""
        return {"spec": self.spec, "source": self.source, "line": self.line, "lines": self.lines}


def files_of(target: str | Path) -> list[Path]:
    """A file, or the *.yaml / *.yml files of a folder (not its subfolders), sorted."""
    path = Path(target)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not path.exists():
        raise FileError(f"{target}: no such file or folder")
    return [path]


def _line_map(node: yaml.Node, path: str, out: dict[str, int], source: str) -> None:
    """Every key's and list item's line under `node`, by dotted path (as pydantic's loc)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:  # PyYAML would keep the last one silently
                first = seen[key]
                raise FileError(f"{source}:{line}: {key}: duplicate key (first on line {first})")
            seen[key] = line
            sub = f"{path}.{key}" if path else key
            out[sub] = line
            _line_map(value_node, sub, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}.{i}" if path else str(i)
            out[sub] = item.start_mark.line + 1
            _line_map(item, sub, out, source)


def load_text(text: str, source: str, folder: Path = Path(".")) -> list[Document]:
    """The documents of one YAML text (`---` separates them; empty ones are skipped)."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        values = list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise FileError(f"{where}: not valid YAML: {exc.problem or exc.context}") from None
    docs = []
    for node, value in zip(nodes, values, strict=True):
        if node is None or value is None:
            continue
        line = node.start_mark.line + 1
        if not isinstance(value, dict):
            raise FileError(
                f"{source}:{line}: a document must be a mapping of fields (name, model, ...), "
                f"not a {type(value).__name__}"
            )
        lines: dict[str, int] = {}
        _line_map(node, "", lines, source)
        _json_data(value, "", lines, source)
        docs.append(Document(value, source, line, lines, folder))
    return docs


_JSON_SCALARS = (str, int, float, bool, type(None))


def _json_data(value: Any, path: str, lines: dict[str, int], source: str) -> None:
    """Refuse what YAML reads but JSON cannot carry to the API (a date, a set, a NaN), at
    its line."""
    if isinstance(value, dict):
        for key, item in value.items():
            _json_data(item, f"{path}.{key}" if path else str(key), lines, source)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _json_data(item, f"{path}.{i}" if path else str(i), lines, source)
    elif not isinstance(value, _JSON_SCALARS) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise FileError(
            f"{source}:{lines.get(path, '?')}: {path}: {value!r} is not a JSON value "
            "(text, a number, true/false, a list or a mapping); quote it to keep it as text"
        )


def load(target: str | Path) -> list[Document]:
    """Every document of a file or of a folder's YAML files."""
    docs = []
    for path in files_of(target):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FileError(f"{path}: cannot read it: {exc}") from None
        docs.extend(load_text(text, str(path), path.parent))
    return docs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_zips(docs: list[Document]) -> dict[str, Path]:
    """Fill in `model.sha256` of every zip source (its path is relative to its file); returns
    sha256 -> the zip's path, for the uploads the platform asks for."""
    zips: dict[str, Path] = {}
    for doc in docs:
        model = doc.spec.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("zip"), str):
            continue  # the API names what is wrong with it
        path = (doc.folder / model["zip"]).resolve()
        if not path.is_file():
            line = doc.lines.get("model.zip", doc.line)
            raise FileError(
                f"{doc.source}:{line}: model.zip: no such file {model['zip']} "
                f"(relative to the file: {path})"
            )
        model["sha256"] = sha256_file(path)
        zips[model["sha256"]] = path
    return zips


def dump(specs: list[dict[str, Any]]) -> str:
    """Documents as one YAML stream, the way `raydock apply` reads them back."""
    return yaml.safe_dump_all(specs, sort_keys=False, allow_unicode=True, explicit_start=True)
