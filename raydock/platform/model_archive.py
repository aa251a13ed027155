"""Safe inspection and extraction of uploaded model archives (Hugging Face layout).

A user uploads a ``.zip`` holding ``config.json``, ``*.safetensors`` weights, tokenizer files
and optionally ``deployconfig.json``. :func:`extract_model_archive` checks every entry of the
archive before writing anything, streams the files into a hidden staging folder next to
``dest_dir`` under a byte budget, validates the result with :func:`inspect_model_dir` and only
then renames the staging folder to ``dest_dir``. Any failure removes everything written and
raises :class:`ArchiveError`, whose message is meant for the user: it says what is wrong and
how to fix it.

Nothing here loads tensors or unpickles anything. Safetensors files are checked from their
headers only; ``transformers`` is imported lazily (it is slow) for the architecture check.
:mod:`raydock.platform.serving_checks` then checks that a base model can serve: its weights
match ``config.json`` and its chat template renders.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from raydock.model_memory import shape_figures

KiB = 2**10
MiB = 2**20
GiB = 2**30

#: Entries at or below this uncompressed size are exempt from the compression-ratio rule
#: (small JSON and text files compress far better than weights and are harmless).
RATIO_CHECK_MIN_BYTES = 1 * MiB
#: Same limit the safetensors library applies to its JSON header.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
_CHUNK = 1 * MiB

ProgressCallback = Callable[[float, str], None]

CONFIG_MISSING = (
    "config.json is missing: a model archive needs config.json at its root (Hugging Face layout)"
)
ADAPTER_CONFIG_MISSING = (
    "adapter_config.json is missing: an adapter archive needs adapter_config.json at its root "
    "(save the adapter with peft's model.save_pretrained(dir))"
)
NO_WEIGHTS = (
    "no model weights found (expected *.safetensors at the archive root); "
    "save the model with model.save_pretrained(dir, safe_serialization=True)"
)
NO_TOKENIZER = (
    "no tokenizer found: a base model needs tokenizer.json, tokenizer.model, or "
    "vocab.json + merges.txt at its root; add them with tokenizer.save_pretrained(dir)"
)

_IGNORED_DIRS = frozenset({"__MACOSX"})
_IGNORED_FILES = frozenset({".DS_Store"})
_SUPPORTED_COMPRESSION = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles that trainers leave next to the weights; they are not weights themselves.
_NON_WEIGHT_PICKLES = re.compile(
    r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$"
)
_TOKENIZER_FILE_SETS = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)
_CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "n_ctx",
)
# Bits per element of every dtype the safetensors format defines.
_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


class ArchiveError(Exception):
    """The archive or model folder is unusable; the message is user-facing."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 20 * GiB  # uncompressed total
    max_entries: int = 10_000
    max_compression_ratio: float = 200.0  # per entry and overall, uncompressed/compressed
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.max_total_bytes <= 0 or self.max_entries <= 0 or self.max_compression_ratio <= 0:
            raise ValueError(f"archive limits must be positive: {self}")

    @classmethod
    def from_settings(cls, settings: Any) -> ArchiveLimits:
        """Limits from :class:`raydock.config.Settings` (or anything with the same fields)."""
        return cls(
            max_total_bytes=settings.max_archive_bytes,
            max_entries=settings.max_archive_entries,
            max_compression_ratio=settings.max_compression_ratio,
            allow_pickle=settings.allow_pickle_weights,
        )


@dataclass
class ModelMetadata:
    kind: str  # "base" or "adapter"
    architecture: str | None  # e.g. "LlamaForCausalLM"
    model_type: str | None  # config.json model_type
    parameters: int | None  # counted from safetensors headers
    context_length: int | None  # max_position_embeddings or similar
    has_chat_template: bool
    weight_format: str  # "safetensors" or "pickle"
    files: list[str]
    total_bytes: int
    deployconfig: dict | None  # parsed deployconfig.json if present
    # config.json's quantization_config: which pre-quantized engines can serve it
    quantization_config: dict | None = None
    # the config.json figures the hardware-fit estimate reads (raydock.model_memory)
    config_figures: dict | None = None
    # adapters checked against their base (check_adapter_against_base): rank, alpha, target
    # modules and the rest of what serving the adapter needs
    adapter: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- public API


def extract_model_archive(
    zip_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    limits: ArchiveLimits = ArchiveLimits(),
    kind: str = "base",
    progress: ProgressCallback | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    base_name: str | None = None,
    archive_name: str | None = None,
) -> ModelMetadata:
    """Check, extract and validate a model archive into ``dest_dir``; errors name it
    ``archive_name`` (the user's file name, not the server's staged copy), else its name.

    ``dest_dir`` must not exist or be an empty folder (else :class:`FileExistsError`). On any
    failure nothing is left under ``dest_dir``; an exception raised by ``progress`` aborts the
    extraction the same way (and propagates unchanged). ``progress(fraction, stage)`` is called
    with stages ``checking``, ``extracting``, ``validating`` and ``done``.

    For an adapter, ``base_dir`` (the base model's folder) adds the second stage,
    ``adapter_check.check_adapter_against_base`` (``base_name``: the base's name in the hub,
    for its name hint), whose facts become ``metadata.adapter``.
    """
    _check_kind(kind)
    if base_dir is not None and kind != "adapter":
        raise ValueError("base_dir is only for kind='adapter'")
    dest = Path(dest_dir)
    _check_dest_dir(dest)
    report = _ProgressReporter(progress)
    report(0.0, "checking")
    archive_name = archive_name or Path(zip_path).name
    with _open_zip(zip_path, archive_name) as zf:
        plan = _plan_extraction(zf, limits)
        check_layout([target for _, target in plan], kind, limits.allow_pickle)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _check_disk_space(dest.parent, plan)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        )
        try:
            staging.chmod(0o755)
            _extract_entries(zf, archive_name, plan, staging, limits, report)
            report(0.9, "validating")
            metadata = inspect_model_dir(staging, kind=kind, allow_pickle=limits.allow_pickle)
            if base_dir is not None:
                from raydock.platform.adapter_check import check_adapter_against_base

                metadata.adapter = check_adapter_against_base(staging, base_dir, base_name)
            _move_into_place(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    report(1.0, "done")
    return metadata


def inspect_model_dir(
    model_dir: str | os.PathLike[str], kind: str = "base", allow_pickle: bool = False
) -> ModelMetadata:
    """Validate an already-extracted (or downloaded) model folder and describe it."""
    _check_kind(kind)
    root = Path(model_dir)
    if not root.is_dir():
        raise ArchiveError(f"model folder {root} does not exist")
    files = _list_files(root)
    check_layout(files, kind, allow_pickle)
    deployconfig = _read_deployconfig(root, files)
    if kind == "adapter":
        return _inspect_adapter(root, files, allow_pickle, deployconfig)
    return _inspect_base(root, files, allow_pickle, deployconfig)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- helpers


def _check_kind(kind: str) -> None:
    if kind not in ("base", "adapter"):
        raise ValueError(f"kind must be 'base' or 'adapter', not {kind!r}")


def _fmt_size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


class _ProgressReporter:
    """Forwards monotonic progress to the callback, at most once per percent per stage."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._last: tuple[float, str] | None = None

    def __call__(self, fraction: float, stage: str) -> None:
        if self._callback is None:
            return
        last_fraction, last_stage = self._last or (0.0, "")
        fraction = min(1.0, max(fraction, last_fraction))
        if stage == last_stage and fraction - last_fraction < 0.01 and fraction < 1.0:
            return
        self._last = (fraction, stage)
        self._callback(fraction, stage)


# --------------------------------------------------------------------------- archive checks


def _open_zip(zip_path: str | os.PathLike[str], name: str) -> zipfile.ZipFile:
    path = Path(zip_path)
    if not path.is_file():
        raise ArchiveError(f"{name} does not exist or is not a file; upload a .zip archive")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise ArchiveError(
            f"{name} is not a valid .zip archive ({e}); "
            "create one with e.g. `zip -r model.zip model_folder`"
        ) from None


def _plan_extraction(
    zf: zipfile.ZipFile, limits: ArchiveLimits
) -> list[tuple[zipfile.ZipInfo, str]]:
    """Check every entry; return (entry, target path relative to the model root) for each file."""
    infos = zf.infolist()
    _check_entry_count(infos, limits)
    kept: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    for info in infos:
        parts = _entry_parts(info)
        _check_not_symlink(info)
        _check_not_encrypted(info)
        _check_compression_method(info)
        _check_entry_ratio(info, limits)
        if parts and not _is_dir(info) and not _is_ignored(parts):
            kept.append((info, parts))
    _check_total_size(infos, limits)
    _check_overall_ratio(infos, limits)
    if not kept:
        raise ArchiveError("the archive contains no files; put the model files in the .zip")
    plan = [(info, "/".join(parts)) for info, parts in _strip_common_folder(kept)]
    _check_unique_targets([target for _, target in plan])
    return plan


def _check_entry_count(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    if len(infos) > limits.max_entries:
        raise ArchiveError(
            f"archive has {len(infos)} entries, over the {limits.max_entries} limit; "
            "remove files the model does not need"
        )


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """Path components of an entry; refuses absolute paths and `..` (both separators count)."""
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(
            f"archive entry {name!r} has an absolute path; entries must be relative to the "
            "archive root (re-create the archive from inside the model folder)"
        )
    parts = tuple(p for p in re.split(r"[/\\]+", name) if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(
            f"archive entry {name!r} contains a '..' path component, which would write outside "
            "the model folder; re-create the archive without it"
        )
    return parts


def _check_not_symlink(info: zipfile.ZipInfo) -> None:
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ArchiveError(
            f"archive entry {info.filename!r} is a symbolic link, which is not allowed; "
            "re-create the archive with the real files (e.g. `zip -r` without `--symlinks`)"
        )


def _check_not_encrypted(info: zipfile.ZipInfo) -> None:
    if info.flag_bits & 0x1:
        raise ArchiveError(
            f"archive entry {info.filename!r} is password-protected; upload an unencrypted archive"
        )


def _check_compression_method(info: zipfile.ZipInfo) -> None:
    if info.compress_type not in _SUPPORTED_COMPRESSION:
        raise ArchiveError(
            f"archive entry {info.filename!r} uses an unsupported compression method "
            f"({info.compress_type}); re-create the archive with standard (deflate) compression"
        )


def _check_entry_ratio(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    if info.file_size <= RATIO_CHECK_MIN_BYTES:
        return
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_compression_ratio:
        raise ArchiveError(
            f"archive entry {info.filename!r} has a compression ratio of {ratio:.0f}:1 "
            f"({_fmt_size(info.file_size)} from {_fmt_size(info.compress_size)}), over the "
            f"{limits.max_compression_ratio:.0f}:1 limit; this looks like a zip bomb, so the "
            "archive is refused (model weights do not compress that well)"
        )


def _check_total_size(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    total = sum(info.file_size for info in infos)
    if total > limits.max_total_bytes:
        raise ArchiveError(
            f"archive expands to {_fmt_size(total)}, over the "
            f"{_fmt_size(limits.max_total_bytes)} limit; upload a smaller model or ask an "
            "administrator to raise the limit"
        )


def _check_overall_ratio(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    total = sum(info.file_size for info in infos)
    if total <= RATIO_CHECK_MIN_BYTES:
        return
    ratio = total / max(sum(info.compress_size for info in infos), 1)
    if ratio > limits.max_compression_ratio:
        raise ArchiveError(
            f"archive has an overall compression ratio of {ratio:.0f}:1, over the "
            f"{limits.max_compression_ratio:.0f}:1 limit; this looks like a zip bomb, so the "
            "archive is refused"
        )


def _is_dir(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or stat.S_ISDIR(info.external_attr >> 16)


def _is_ignored(parts: tuple[str, ...]) -> bool:
    return parts[0] in _IGNORED_DIRS or parts[-1] in _IGNORED_FILES


def _strip_common_folder(
    entries: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Drop a single top-level folder holding every file (``mymodel/config.json``)."""
    tops = {parts[0] for _, parts in entries}
    if len(tops) == 1 and all(len(parts) > 1 for _, parts in entries):
        return [(info, parts[1:]) for info, parts in entries]
    return entries


def _check_unique_targets(targets: list[str]) -> None:
    seen: set[str] = set()
    for target in targets:
        if target in seen:
            raise ArchiveError(f"the archive contains {target!r} more than once; keep one copy")
        seen.add(target)
    for target in targets:
        for parent in PurePosixPath(target).parents:
            if str(parent) in seen:
                raise ArchiveError(
                    f"{str(parent)!r} is both a file and a folder in the archive; rename one"
                )


def _check_disk_space(folder: Path, plan: list[tuple[zipfile.ZipInfo, str]]) -> None:
    needed = sum(info.file_size for info, _ in plan)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ArchiveError(
            f"not enough disk space: the model needs {_fmt_size(needed)} but only "
            f"{_fmt_size(free)} is free; try again later or ask an administrator"
        )


def _check_dest_dir(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise FileExistsError(f"destination {dest} already exists and is not an empty folder")


# --------------------------------------------------------------------------- extraction


class _ByteBudget:
    """Counts bytes actually written; the zip headers may understate them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def consume(self, n: int, entry: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise ArchiveError(
                f"archive expands beyond the {_fmt_size(self.limit)} limit while extracting "
                f"{entry!r} (its headers understate the real size); the archive is refused"
            )


def _extract_entries(
    zf: zipfile.ZipFile,
    archive_name: str,
    plan: list[tuple[zipfile.ZipInfo, str]],
    root: Path,
    limits: ArchiveLimits,
    report: _ProgressReporter,
) -> None:
    budget = _ByteBudget(limits.max_total_bytes)
    declared = max(sum(info.file_size for info, _ in plan), 1)

    def on_bytes() -> None:
        report(0.05 + 0.85 * min(budget.used / declared, 1.0), "extracting")

    for info, target in plan:
        try:
            _copy_entry(zf, info, _safe_join(root, target), budget, on_bytes)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
            raise ArchiveError(
                f"{archive_name} is not a valid .zip archive: entry {info.filename!r} is corrupted "
                f"({e}); re-create the archive and upload it again"
            ) from None
        except OSError as e:
            raise ArchiveError(
                f"could not extract {info.filename!r}: {e.strerror or e}; check the file name "
                "and the free disk space"
            ) from None


def _safe_join(root: Path, target: str) -> Path:
    path = root.joinpath(*PurePosixPath(target).parts)
    if not path.resolve().is_relative_to(root.resolve()):  # defence in depth
        raise ArchiveError(f"archive entry {target!r} would be written outside the model folder")
    return path


def _copy_entry(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    path: Path,
    budget: _ByteBudget,
    on_bytes: Callable[[], None],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # "xb": never overwrite or follow anything that already exists at the path.
    with zf.open(info) as src, open(path, "xb") as dst:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise ArchiveError(
                    f"archive entry {info.filename!r} is larger than its header declares; "
                    "the archive is corrupted or malicious"
                )
            budget.consume(len(chunk), info.filename)
            dst.write(chunk)
            on_bytes()


def _move_into_place(staging: Path, dest: Path) -> None:
    if dest.is_dir():
        dest.rmdir()  # empty, checked before extraction; fails loudly if something appeared
    os.rename(staging, dest)


# --------------------------------------------------------------------------- layout (names only)


def check_layout(files: Iterable[str], kind: str, allow_pickle: bool) -> str:
    """Rules that only need file names (run before extraction too); returns the weight format."""
    names = set(files)
    if kind == "adapter":
        if "adapter_config.json" not in names:
            raise ArchiveError(ADAPTER_CONFIG_MISSING)
        return _adapter_weight_format(names, allow_pickle)
    if "config.json" not in names:
        raise ArchiveError(CONFIG_MISSING)
    weight_format = _base_weight_format(names, allow_pickle)
    _check_tokenizer_present(names)
    return weight_format


def _root_files(names: set[str]) -> set[str]:
    return {name for name in names if "/" not in name}


def _base_weight_format(names: set[str], allow_pickle: bool) -> str:
    root = _root_files(names)
    if any(name.endswith(".safetensors") for name in root):
        return "safetensors"
    pickles = sorted(
        name
        for name in root
        if name.endswith(_PICKLE_SUFFIXES) and not _NON_WEIGHT_PICKLES.match(name)
    )
    if pickles:
        return _allow_pickle_or_raise(pickles, allow_pickle)
    raise ArchiveError(NO_WEIGHTS)


def _adapter_weight_format(names: set[str], allow_pickle: bool) -> str:
    if "adapter_model.safetensors" in names:
        return "safetensors"
    if "adapter_model.bin" in names:
        return _allow_pickle_or_raise(["adapter_model.bin"], allow_pickle)
    raise ArchiveError(
        "adapter_model.safetensors is missing: an adapter archive needs its weights in "
        "adapter_model.safetensors (peft saves them there by default)"
    )


def _allow_pickle_or_raise(pickles: list[str], allow_pickle: bool) -> str:
    if allow_pickle:
        return "pickle"
    raise ArchiveError(
        f"the model weights are only in pickle format ({', '.join(pickles[:3])}); loading "
        "pickle files can run arbitrary code, so they are refused. Convert the weights to "
        "safetensors (model.save_pretrained(dir, safe_serialization=True)) or ask an "
        "administrator to enable allow_pickle"
    )


def _check_tokenizer_present(names: set[str]) -> None:
    if not any(all(f in names for f in file_set) for file_set in _TOKENIZER_FILE_SETS):
        raise ArchiveError(NO_TOKENIZER)


# --------------------------------------------------------------------------- folder inspection


def _list_files(root: Path) -> list[str]:
    files = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(folder).relative_to(root)
        files.extend((rel / name).as_posix() for name in filenames)
    return sorted(files)


def _total_bytes(root: Path, files: list[str]) -> int:
    total = 0
    for name in files:
        try:
            total += (root / name).stat().st_size
        except OSError as e:
            raise ArchiveError(f"cannot read {name}: {e.strerror or e}") from None
    return total


#: the largest JSON file an archive may hold (a tokenizer.json takes tens of MB), and the
#: settings files a model row keeps and every models list returns (deployconfig.json went
#: into each list page whole: 100 MB of it made every list carry 100 MB)
JSON_MAX_BYTES = 64 * MiB
SETTINGS_JSON_MAX_BYTES = {"config.json": MiB, "deployconfig.json": MiB, "adapter_config.json": MiB}


def _read_json_object(root: Path, name: str) -> dict:
    limit = SETTINGS_JSON_MAX_BYTES.get(name, JSON_MAX_BYTES)
    try:
        if (size := (root / name).stat().st_size) > limit:
            raise ArchiveError(
                f"{name} holds {size} bytes; at most {limit} (a real one is far smaller)"
            )
        data = json.loads((root / name).read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ArchiveError(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise ArchiveError(f"{name} nests deeper than JSON settings ever do") from None
    except OSError as e:
        raise ArchiveError(f"cannot read {name}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ArchiveError(
            f"{name} must contain a JSON object ({{...}}), not a {type(data).__name__}"
        )
    return data


def _read_optional_json(root: Path, files: list[str], name: str) -> dict | None:
    return _read_json_object(root, name) if name in files else None


def _read_deployconfig(root: Path, files: list[str]) -> dict | None:
    return _read_optional_json(root, files, "deployconfig.json")


def _inspect_base(
    root: Path, files: list[str], allow_pickle: bool, deployconfig: dict | None
) -> ModelMetadata:
    # Imported here: serving_checks imports this module (for ArchiveError).
    from raydock.platform import serving_checks

    config = _read_json_object(root, "config.json")
    weight_format, weight_headers = _inspect_base_weights(root, files, allow_pickle)
    tokenizer_config = _check_tokenizer_files(root, files)
    architecture, model_type = _check_architecture(root, config)
    serving_checks.check_weights_match_config(root, config, weight_headers)
    has_chat_template = _has_chat_template(root, files, tokenizer_config)
    if has_chat_template:  # without one the model serves completions only
        serving_checks.check_chat_template(root)
    parameters = None
    if weight_headers is not None:
        parameters = sum(_count_parameters(header) for header in weight_headers.values())
    return ModelMetadata(
        kind="base",
        architecture=architecture,
        model_type=model_type,
        parameters=parameters,
        context_length=_context_length(config),
        has_chat_template=has_chat_template,
        weight_format=weight_format,
        files=files,
        total_bytes=_total_bytes(root, files),
        deployconfig=deployconfig,
        quantization_config=config.get("quantization_config"),
        config_figures=shape_figures(config),
    )


def _inspect_adapter(
    root: Path, files: list[str], allow_pickle: bool, deployconfig: dict | None
) -> ModelMetadata:
    _check_adapter_config(_read_json_object(root, "adapter_config.json"))
    weight_format = _adapter_weight_format(set(files), allow_pickle)
    headers = _validate_all_safetensors(root, files)
    parameters = None
    if weight_format == "safetensors":
        parameters = _count_parameters(headers["adapter_model.safetensors"])
    tokenizer_config = _read_optional_json(root, files, "tokenizer_config.json")
    return ModelMetadata(
        kind="adapter",
        architecture=None,
        model_type=None,
        parameters=parameters,
        context_length=None,
        has_chat_template=_has_chat_template(root, files, tokenizer_config),
        weight_format=weight_format,
        files=files,
        total_bytes=_total_bytes(root, files),
        deployconfig=deployconfig,
    )


def _check_adapter_config(adapter_config: dict) -> None:
    for key in ("base_model_name_or_path", "peft_type"):
        value = adapter_config.get(key)
        if not isinstance(value, str) or not value:
            raise ArchiveError(
                f"adapter_config.json has no {key!r}; it must name the base model and the "
                "adapter type (save the adapter with peft's model.save_pretrained(dir))"
            )


def _inspect_base_weights(
    root: Path, files: list[str], allow_pickle: bool
) -> tuple[str, dict[str, dict] | None]:
    """The weight format and the headers of the weight files (None for pickle weights)."""
    weight_format = _base_weight_format(set(files), allow_pickle)
    headers = _validate_all_safetensors(root, files)
    if weight_format == "pickle":
        _check_shard_index(root, files, "pytorch_model.bin.index.json", None)
        return weight_format, None
    shards = _check_shard_index(root, files, "model.safetensors.index.json", headers)
    if not shards:
        root_weights = sorted(name for name in headers if "/" not in name)
        shards = ["model.safetensors"] if "model.safetensors" in headers else root_weights
    return weight_format, {name: headers[name] for name in shards}


def _check_shard_index(
    root: Path, files: list[str], index_name: str, headers: dict[str, dict] | None
) -> list[str]:
    """Check that every shard the index lists exists (and holds its tensors); return them."""
    if index_name not in files:
        return []
    weight_map = _read_json_object(root, index_name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ArchiveError(f"{index_name} has no 'weight_map'; re-save the model")
    shards = sorted({str(shard) for shard in weight_map.values()})
    for shard in shards:
        if shard not in files:
            raise ArchiveError(
                f"{index_name} lists the weight shard {shard!r}, but it is missing from the "
                "archive; include every shard"
            )
    if headers is not None:
        for shard in shards:
            if shard not in headers:
                raise ArchiveError(
                    f"{index_name} lists {shard!r} as a weight shard, but it is not a "
                    ".safetensors file; re-save the model"
                )
        for tensor, shard in weight_map.items():
            if tensor not in headers[str(shard)]:
                raise ArchiveError(
                    f"{index_name} maps tensor {tensor!r} to {shard!r}, but that shard does "
                    "not contain it; the index does not match the shards"
                )
    return shards


def _validate_all_safetensors(root: Path, files: list[str]) -> dict[str, dict]:
    return {
        name: read_safetensors_header(root / name, name)
        for name in files
        if name.endswith(".safetensors")
    }


def read_safetensors_header(path: str | os.PathLike[str], name: str | None = None) -> dict:
    """Parse and check a safetensors header without reading tensor data.

    Returns ``{tensor_name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` dropped).
    """
    name = name or Path(path).name

    def corrupted(reason: str) -> ArchiveError:
        return ArchiveError(f"{name} is corrupted: {reason}; re-save or re-upload the file")

    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupted(f"the file is only {file_size} bytes long")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > SAFETENSORS_MAX_HEADER_BYTES:
            raise corrupted(f"header length {header_len} is not plausible")
        if 8 + header_len > file_size:
            raise corrupted(
                f"the file is truncated (header needs {header_len} bytes, file has {file_size})"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise corrupted(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupted("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_len
    spans = [
        _check_tensor_entry(tensor, entry, data_size, corrupted) for tensor, entry in header.items()
    ]
    _check_spans(spans, data_size, corrupted)
    return header


def _check_tensor_entry(
    tensor: str, entry: Any, data_size: int, corrupted: Callable[[str], ArchiveError]
) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise corrupted(f"tensor {tensor!r} has no dtype/shape/data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _SAFETENSORS_DTYPE_BITS:
        raise corrupted(f"tensor {tensor!r} has unknown dtype {dtype!r}")
    shown = _clip(json.dumps(shape))
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise corrupted(f"tensor {tensor!r} has an invalid shape {shown}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise corrupted(f"tensor {tensor!r} has invalid data_offsets {_clip(json.dumps(offsets))}")
    start, end = offsets
    if end > data_size:
        raise corrupted(
            f"the file is truncated (tensor {tensor!r} ends at byte {end} of the data section, "
            f"which has only {data_size} bytes)"
        )
    # the size in bits, capped far past any file's: a header's shape of thousands of huge
    # dimensions made a product that took minutes (and overflowed the float of /8)
    cap = 2**80
    bits = _SAFETENSORS_DTYPE_BITS[dtype]
    for dim in shape:
        bits = min(bits * dim, cap)
    if end < start or (end - start) * 8 != bits:
        size = "more bytes than any file has" if bits >= cap else f"{bits / 8:g} bytes"
        raise corrupted(
            f"tensor {tensor!r} ({dtype} {shown}) should take {size} but its data_offsets "
            f"span {end - start}"
        )
    return start, end, tensor


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _check_spans(
    spans: list[tuple[int, int, str]], data_size: int, corrupted: Callable[[str], ArchiveError]
) -> None:
    previous_end, previous = 0, None
    for start, end, tensor in sorted(spans):
        if start < previous_end:
            raise corrupted(f"tensors {previous!r} and {tensor!r} overlap")
        previous_end, previous = end, tensor
    if previous_end != data_size:
        raise corrupted(
            f"the data section has {data_size} bytes but the tensors end at byte {previous_end}"
        )


def _count_parameters(header: dict) -> int:
    return sum(math.prod(entry["shape"]) for entry in header.values())


def _check_tokenizer_files(root: Path, files: list[str]) -> dict | None:
    """Tokenizer JSON files must parse; returns tokenizer_config.json (if any)."""
    _check_tokenizer_present(set(files))
    if "tokenizer.json" in files:
        _read_json_object(root, "tokenizer.json")
    return _read_optional_json(root, files, "tokenizer_config.json")


def _has_chat_template(root: Path, files: list[str], tokenizer_config: dict | None) -> bool:
    if tokenizer_config and tokenizer_config.get("chat_template"):
        return True
    if "chat_template.jinja" in files or any(
        name.startswith("additional_chat_templates/") and name.endswith(".jinja") for name in files
    ):
        return True
    chat_template_json = _read_optional_json(root, files, "chat_template.json")
    return bool(chat_template_json and chat_template_json.get("chat_template"))


def _context_length(config: dict) -> int | None:
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in _CONTEXT_LENGTH_KEYS:
            value = section.get(key)
            if _is_count(value) and value > 0:
                return value
    return None


# --------------------------------------------------------------------------- architecture


def _check_architecture(root: Path, config: dict) -> tuple[str, str | None]:
    """The installed transformers must load the config and have a causal-LM class for it."""
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) and a for a in architectures)
    ):
        raise ArchiveError("config.json 'architectures' must be a list of class names")
    if model_type is not None and not isinstance(model_type, str):
        raise ArchiveError("config.json 'model_type' must be a string")
    if not architectures and not model_type:
        raise ArchiveError(
            "config.json has neither 'architectures' nor 'model_type', so the model class "
            "is unknown; save the config with transformers (config.save_pretrained(dir))"
        )

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_classes = _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architecture = architectures[0] if architectures else None
    if architecture is None:
        mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        architecture = next(iter(_class_names([mapped])), None) if mapped else None
    version = transformers.__version__
    label = f"architecture {architecture or '(none)'} (model_type {model_type or '(none)'})"
    _check_autoconfig_loads(root, label, version)
    if architecture is None:
        raise ArchiveError(
            f"model_type {model_type} has no causal language model class in the installed "
            f"transformers {version}; set 'architectures' in config.json"
        )
    if not hasattr(transformers, architecture):
        raise ArchiveError(
            f"{label} is not a model class of the installed transformers {version}; the model "
            "needs a newer transformers or custom code (trust_remote_code is not supported)"
        )
    if architecture not in causal_classes:
        raise ArchiveError(
            f"{label} is not a causal language model (text generation) architecture; only "
            "models with a *ForCausalLM class can be served"
        )
    return architecture, model_type


def _class_names(values: Iterable[str | tuple[str, ...] | list[str]]) -> set[str]:
    names: set[str] = set()
    for value in values:
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_autoconfig_loads(root: Path, label: str, version: str) -> None:
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())
        if len(reason) > 400:
            reason = reason[:400] + "..."
        raise ArchiveError(
            f"{label} cannot be loaded by the installed transformers {version}: {reason}"
        ) from None
