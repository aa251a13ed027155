"""Tests for raydock.platform.model_archive (no Ray, no network, tiny files)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from raydock import modelgen
from raydock.modelgen import build_model_zip, cached_model_dir
from raydock.platform import model_archive
from raydock.platform.model_archive import (
    ArchiveError,
    ArchiveLimits,
    extract_model_archive,
    inspect_model_dir,
    sha256_file,
)

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors a Llama checkpoint of `config` holds (written out here, not by transformers)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (q, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


EXPECTED_PARAMS = sum(math.prod(shape) for shape in llama_shapes(LLAMA_CONFIG).values())


def llama_tensors(config: dict = LLAMA_CONFIG) -> dict[str, np.ndarray]:
    # Only the embeddings are random: the rest compresses well, as the ratio tests assume.
    rng = np.random.default_rng(0)
    return {
        name: rng.standard_normal(shape, dtype=np.float32)
        if name == "model.embed_tokens.weight"
        else np.zeros(shape, np.float32)
        for name, shape in llama_shapes(config).items()
    }


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_weights(path: Path, tensors: dict[str, np.ndarray] | None = None) -> None:
    save_file(llama_tensors() if tensors is None else tensors, str(path))


def write_tokenizer(folder: Path) -> None:
    words = ["<unk>", "<s>", "</s>", "hello", "world", "model", "hub"]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE},
    )


def raw_safetensors(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    write_json(folder / "config.json", LLAMA_CONFIG)
    write_weights(folder / "model.safetensors")
    write_tokenizer(folder)
    return folder


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter_src"
    folder.mkdir()
    write_json(
        folder / "adapter_config.json",
        {"base_model_name_or_path": "org/tiny-llama", "peft_type": "LORA", "r": 4},
    )
    write_weights(
        folder / "adapter_model.safetensors",
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": np.zeros((4, 64), np.float32),
            "base_model.model.layers.0.q_proj.lora_B.weight": np.zeros((64, 4), np.float32),
        },
    )
    return folder


def zip_dir(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "model"


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists() or not any(dest.iterdir())
    if dest.parent.exists():  # no staging folder left next to it either
        assert [p.name for p in dest.parent.iterdir() if p.name != dest.name] == []


def expect_failure(zip_path: Path, dest: Path, match: str, **kwargs) -> ArchiveError:
    with pytest.raises(ArchiveError, match=match) as info:
        extract_model_archive(zip_path, dest, **kwargs)
    assert_nothing_left(dest)
    return info.value


# --------------------------------------------------------------------------- valid archives


def test_valid_archive_extracts_and_describes_model(model_dir, tmp_path, dest):
    calls: list[tuple[float, str]] = []
    write_json(model_dir / "deployconfig.json", {"max_replicas": 2})
    meta = extract_model_archive(
        zip_dir(model_dir, tmp_path / "m.zip"), dest, progress=lambda f, s: calls.append((f, s))
    )
    assert meta.kind == "base"
    assert meta.architecture == "LlamaForCausalLM"
    assert meta.model_type == "llama"
    assert meta.parameters == EXPECTED_PARAMS
    assert meta.context_length == 256
    assert meta.has_chat_template is True
    assert meta.weight_format == "safetensors"
    assert meta.deployconfig == {"max_replicas": 2}
    assert meta.files == [
        "config.json",
        "deployconfig.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert meta.total_bytes == sum((model_dir / f).stat().st_size for f in meta.files)
    for name in meta.files:
        assert (dest / name).read_bytes() == (model_dir / name).read_bytes()
    assert json.loads(json.dumps(meta.to_dict()))["parameters"] == EXPECTED_PARAMS
    # progress: starts with checking, ends with done, never goes backwards
    assert calls[0] == (0.0, "checking") and calls[-1] == (1.0, "done")
    assert {s for _, s in calls} == {"checking", "extracting", "validating", "done"}
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # staging folder renamed


def test_single_top_level_folder_is_stripped_and_mac_junk_ignored(model_dir, tmp_path, dest):
    zip_path = zip_dir(model_dir, tmp_path / "m.zip", prefix="mymodel/")
    with zipfile.ZipFile(zip_path, "a") as zf:
        zf.writestr("__MACOSX/mymodel/._config.json", b"junk")
        zf.writestr("mymodel/.DS_Store", b"junk")
    meta = extract_model_archive(zip_path, dest)
    assert "config.json" in meta.files and (dest / "config.json").is_file()
    assert not (dest / "mymodel").exists() and not (dest / "__MACOSX").exists()
    assert ".DS_Store" not in meta.files


def test_existing_empty_dest_is_used(model_dir, tmp_path, dest):
    dest.mkdir(parents=True)
    extract_model_archive(zip_dir(model_dir, tmp_path / "m.zip"), dest)
    assert (dest / "config.json").is_file()


def test_non_empty_dest_is_refused(model_dir, tmp_path, dest):
    dest.mkdir(parents=True)
    (dest / "old").write_text("x")
    with pytest.raises(FileExistsError):
        extract_model_archive(zip_dir(model_dir, tmp_path / "m.zip"), dest)
    assert (dest / "old").read_text() == "x"


def test_sharded_safetensors_with_index(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").unlink()
    tensors = llama_tensors()
    first = {name: t for name, t in tensors.items() if name.startswith("model.layers.")}
    shards = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if n not in first},
    }
    for shard, shard_tensors in shards.items():
        write_weights(model_dir / shard, shard_tensors)
    write_json(
        model_dir / "model.safetensors.index.json",
        {
            "metadata": {},
            "weight_map": {name: shard for shard, ts in shards.items() for name in ts},
        },
    )
    meta = extract_model_archive(zip_dir(model_dir, tmp_path / "m.zip"), dest)
    assert meta.parameters == EXPECTED_PARAMS


def test_chat_template_jinja_file_and_no_template(model_dir):
    write_json(model_dir / "tokenizer_config.json", {})
    assert inspect_model_dir(model_dir).has_chat_template is False
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert inspect_model_dir(model_dir).has_chat_template is True


def test_vocab_merges_tokenizer_is_accepted(model_dir):
    (model_dir / "tokenizer.json").unlink()
    write_json(model_dir / "vocab.json", {"a": 0})
    (model_dir / "merges.txt").write_text("#version: 0.2\n")
    # the tokenizer class that reads these files (its chat template is rendered on import)
    write_json(
        model_dir / "tokenizer_config.json",
        {"tokenizer_class": "GPT2Tokenizer", "chat_template": CHAT_TEMPLATE},
    )
    assert inspect_model_dir(model_dir).architecture == "LlamaForCausalLM"


def test_valid_adapter(adapter_dir, tmp_path, dest):
    meta = extract_model_archive(zip_dir(adapter_dir, tmp_path / "a.zip"), dest, kind="adapter")
    assert meta.kind == "adapter"
    assert meta.architecture is None
    assert meta.parameters == 2 * 4 * 64
    assert meta.weight_format == "safetensors"
    assert meta.files == ["adapter_config.json", "adapter_model.safetensors"]


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_unknown_kind_is_a_programming_error(model_dir):
    with pytest.raises(ValueError, match="kind"):
        inspect_model_dir(model_dir, kind="lora")


# --------------------------------------------------------------------------- archive-level failures


def test_not_a_zip(tmp_path, dest):
    path = tmp_path / "model.zip"
    path.write_bytes(b"this is not a zip file at all")
    expect_failure(path, dest, r"model\.zip is not a valid \.zip archive")


def test_errors_name_the_users_file_not_the_staged_copy(tmp_path, dest):
    staged = tmp_path / "ds-71b73e0c.zip"  # how the server keeps an upload
    staged.write_bytes(b"hello")
    err = expect_failure(staged, dest, r"^notzip\.zip is not a valid", archive_name="notzip.zip")
    assert "ds-71b73e0c" not in str(err)


def test_truncated_zip(model_dir, tmp_path, dest):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    path.write_bytes(path.read_bytes()[:-100])
    expect_failure(path, dest, r"is not a valid \.zip archive")


def test_corrupted_entry_data_cleans_up_partial_extraction(model_dir, tmp_path, dest):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name in ["config.json", "model.safetensors", "tokenizer.json"]:
            zf.write(model_dir / name, name)
        zf.writestr("zz_notes.txt", b"UNIQUE-MARKER-CONTENT")
    path.write_bytes(path.read_bytes().replace(b"MARKER-CONTENT", b"MARKER-CONTENX"))
    expect_failure(path, dest, r"not a valid \.zip archive: entry 'zz_notes.txt' is corrupted")


@pytest.mark.parametrize("name", ["../evil", "mymodel/../../evil", "..\\evil"])
def test_parent_directory_entry(model_dir, tmp_path, dest, name):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(name, b"pwned")
    expect_failure(path, dest, r"contains a '\.\.' path component")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()


@pytest.mark.parametrize("name", ["/etc/evil", "\\evil", "C:/evil", "c:evil"])
def test_absolute_path_entry(model_dir, tmp_path, dest, name):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(name, b"pwned")
    err = expect_failure(path, dest, "has an absolute path")
    assert repr(name) in str(err)


def test_symlink_entry(model_dir, tmp_path, dest):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    link = zipfile.ZipInfo("passwd")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    expect_failure(path, dest, r"entry 'passwd' is a symbolic link")


def test_too_many_entries(model_dir, tmp_path, dest):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    expect_failure(
        path, dest, r"archive has 4 entries, over the 3 limit", limits=ArchiveLimits(max_entries=3)
    )


def test_over_total_size_limit(model_dir, tmp_path, dest):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    expect_failure(
        path,
        dest,
        r"archive expands to \d+\.\d KiB, over the 1000 bytes limit",
        limits=ArchiveLimits(max_total_bytes=1000),
    )


def test_size_limit_message_uses_gib():
    info = zipfile.ZipInfo("x")
    info.file_size = 25 * 2**30
    with pytest.raises(
        ArchiveError, match=r"archive expands to 25\.0 GiB, over the 20\.0 GiB limit"
    ):
        model_archive._check_total_size([info], ArchiveLimits())


def test_actual_bytes_written_are_limited_even_if_headers_lie(
    model_dir, tmp_path, dest, monkeypatch
):
    # Pretend the declared sizes passed the check: the streaming counter must still stop it.
    monkeypatch.setattr(model_archive, "_check_total_size", lambda infos, limits: None)
    path = zip_dir(model_dir, tmp_path / "m.zip")
    expect_failure(
        path,
        dest,
        r"expands beyond the 1000 bytes limit while extracting",
        limits=ArchiveLimits(max_total_bytes=1000),
    )


def test_high_compression_ratio_entry(model_dir, tmp_path, dest):
    (model_dir / "zeros.bin").write_bytes(bytes(2 * 2**20))
    path = zip_dir(model_dir, tmp_path / "m.zip")
    expect_failure(
        path, dest, r"entry 'zeros.bin' has a compression ratio of \d+:1 .* over the 200:1 limit"
    )


def test_high_overall_compression_ratio(model_dir, tmp_path, dest):
    # Many files just under the per-entry threshold: only the overall ratio catches them.
    for i in range(16):
        (model_dir / f"pad{i}.txt").write_bytes(bytes(2**20 - 1))
    path = zip_dir(model_dir, tmp_path / "m.zip")
    expect_failure(path, dest, r"overall compression ratio of \d+:1, over the 200:1 limit")


def test_small_compressible_files_are_fine(model_dir, tmp_path, dest):
    (model_dir / "README.md").write_bytes(b"a" * 100_000)  # ratio ~ 500:1 but tiny
    assert "README.md" in extract_model_archive(zip_dir(model_dir, tmp_path / "m.zip"), dest).files


def test_duplicate_entries(model_dir, tmp_path, dest):
    path = zip_dir(model_dir, tmp_path / "m.zip")
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning):
        zf.writestr("config.json", b"{}")
    expect_failure(path, dest, r"contains 'config.json' more than once")


def test_progress_callback_can_cancel(model_dir, tmp_path, dest):
    def progress(fraction, stage):
        if stage == "validating":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_model_archive(zip_dir(model_dir, tmp_path / "m.zip"), dest, progress=progress)
    assert_nothing_left(dest)


# --------------------------------------------------------------------------- model-level failures


def test_missing_config(model_dir, tmp_path, dest):
    (model_dir / "config.json").unlink()
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"config\.json is missing: a model archive needs config\.json at its root",
    )


def test_config_not_json(model_dir, tmp_path, dest):
    (model_dir / "config.json").write_text("{not json")
    expect_failure(zip_dir(model_dir, tmp_path / "m.zip"), dest, r"config\.json is not valid JSON")


def test_no_weights(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").unlink()
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"no model weights found \(expected \*\.safetensors",
    )


def test_unknown_architecture(model_dir, tmp_path, dest):
    write_json(
        model_dir / "config.json",
        {**LLAMA_CONFIG, "architectures": ["FooBarForCausalLM"], "model_type": "foobar"},
    )
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"architecture FooBarForCausalLM \(model_type foobar\) cannot be loaded by the "
        r"installed transformers [\d.]+\w*: .*foobar",
    )


def test_architecture_class_not_in_transformers(model_dir):
    write_json(model_dir / "config.json", {**LLAMA_CONFIG, "architectures": ["LlamaForMagic"]})
    with pytest.raises(
        ArchiveError, match=r"LlamaForMagic .* is not a model class of the installed"
    ):
        inspect_model_dir(model_dir)


def test_not_a_causal_lm(model_dir):
    write_json(
        model_dir / "config.json",
        {**LLAMA_CONFIG, "architectures": ["LlamaForSequenceClassification"]},
    )
    with pytest.raises(ArchiveError, match=r"is not a causal language model"):
        inspect_model_dir(model_dir)


def test_model_type_only_config_gets_architecture(model_dir):
    write_json(
        model_dir / "config.json", {k: v for k, v in LLAMA_CONFIG.items() if k != "architectures"}
    )
    assert inspect_model_dir(model_dir).architecture == "LlamaForCausalLM"


def test_truncated_safetensors(model_dir, tmp_path, dest):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"model\.safetensors is corrupted: the file is truncated",
    )


def test_garbage_safetensors_header_length(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"model\.safetensors is corrupted: header length \d+ is not plausible",
    )


def test_garbage_safetensors_header_json(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"garbage!" + bytes(16))
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"model\.safetensors is corrupted: the header is not valid JSON",
    )


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        (
            {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
            bytes(8),
            "unknown dtype 'Q7'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            bytes(8),
            "should take 12 bytes",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            bytes(12),
            "data section has 12 bytes",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "invalid shape"),
    ],
)
def test_inconsistent_safetensors_header(model_dir, header, data, reason):
    (model_dir / "model.safetensors").write_bytes(raw_safetensors(header, data))
    with pytest.raises(ArchiveError, match="model.safetensors is corrupted: .*" + reason):
        inspect_model_dir(model_dir)


def test_a_header_of_huge_dimensions_is_refused_at_once(model_dir):
    """A shape of 2,000 dimensions of 4,000 digits each (an 8 MB header, inside the 100 MB
    limit) took minutes in math.prod, and one dimension of 400 digits came back as "import
    failed: integer division result too large for a float"."""
    import time

    huge = int("9" * 4000)
    cases = [
        ({"w": {"dtype": "F32", "shape": [huge] * 2000, "data_offsets": [0, 8]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [2**63] * 3, "data_offsets": [0, 8]}}, "any file"),
    ]
    for header, reason in cases:
        (model_dir / "model.safetensors").write_bytes(raw_safetensors(header, bytes(8)))
        start = time.monotonic()
        with pytest.raises(ArchiveError, match="corrupted: .*" + reason) as refused:
            inspect_model_dir(model_dir)
        assert time.monotonic() - start < 5 and len(str(refused.value)) < 400


def test_sharded_index_references_missing_shard(model_dir, tmp_path, dest):
    write_json(
        model_dir / "model.safetensors.index.json",
        {
            "weight_map": {
                "model.embed_tokens.weight": "model.safetensors",
                "lm_head.weight": "model-00002-of-00002.safetensors",
            }
        },
    )
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"lists the weight shard 'model-00002-of-00002\.safetensors', but it is missing",
    )


def test_sharded_index_tensor_not_in_shard(model_dir):
    write_json(
        model_dir / "model.safetensors.index.json",
        {"weight_map": {"model.layers.9.mlp.up_proj.weight": "model.safetensors"}},
    )
    with pytest.raises(
        ArchiveError, match=r"maps tensor 'model\.layers\.9\.mlp\.up_proj\.weight' to 'model\."
    ):
        inspect_model_dir(model_dir)


def test_pickle_only_weights_refused(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    err = expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"only in pickle format \(pytorch_model\.bin\)",
    )
    assert "arbitrary code" in str(err) and "allow_pickle" in str(err)


def test_pickle_only_weights_accepted_with_allow_pickle(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    meta = extract_model_archive(
        zip_dir(model_dir, tmp_path / "m.zip"), dest, limits=ArchiveLimits(allow_pickle=True)
    )
    assert meta.weight_format == "pickle"
    assert meta.parameters is None
    assert (dest / "pytorch_model.bin").is_file()


def test_training_args_pickle_is_not_weights(model_dir, tmp_path, dest):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "training_args.bin").write_bytes(b"\x80\x04pickle")
    expect_failure(zip_dir(model_dir, tmp_path / "m.zip"), dest, r"no model weights found")


def test_missing_tokenizer(model_dir, tmp_path, dest):
    (model_dir / "tokenizer.json").unlink()
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"no tokenizer found: a base model needs tokenizer\.json, tokenizer\.model, or "
        r"vocab\.json \+ merges\.txt",
    )


def test_invalid_deployconfig(model_dir, tmp_path, dest):
    (model_dir / "deployconfig.json").write_text("{'single': 'quotes'}")
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"), dest, r"deployconfig\.json is not valid JSON: "
    )


def test_deployconfig_must_be_object(model_dir, tmp_path, dest):
    write_json(model_dir / "deployconfig.json", [1, 2])
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"deployconfig\.json must contain a JSON object",
    )


# --------------------------------------------------------------------------- adapters


def test_adapter_missing_weights(adapter_dir, tmp_path, dest):
    (adapter_dir / "adapter_model.safetensors").unlink()
    expect_failure(
        zip_dir(adapter_dir, tmp_path / "a.zip"),
        dest,
        r"adapter_model\.safetensors is missing",
        kind="adapter",
    )


def test_adapter_missing_adapter_config(adapter_dir, tmp_path, dest):
    (adapter_dir / "adapter_config.json").unlink()
    expect_failure(
        zip_dir(adapter_dir, tmp_path / "a.zip"),
        dest,
        r"adapter_config\.json is missing",
        kind="adapter",
    )


def test_adapter_config_without_peft_type(adapter_dir, tmp_path, dest):
    write_json(adapter_dir / "adapter_config.json", {"base_model_name_or_path": "org/tiny-llama"})
    expect_failure(
        zip_dir(adapter_dir, tmp_path / "a.zip"),
        dest,
        r"adapter_config\.json has no 'peft_type'",
        kind="adapter",
    )


def test_adapter_corrupted_weights(adapter_dir, tmp_path, dest):
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    expect_failure(
        zip_dir(adapter_dir, tmp_path / "a.zip"),
        dest,
        r"adapter_model\.safetensors is corrupted: the file is truncated",
        kind="adapter",
    )


def test_base_model_archive_is_not_an_adapter(model_dir, tmp_path, dest):
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"adapter_config\.json is missing",
        kind="adapter",
    )


# --------------------------------------------------------------------------- can it serve


def test_generated_tiny_model_imports(tmp_path, dest):
    # its template refuses the tool role: tool conversations are rendered in the fallback
    assert "tool_calls" not in modelgen.CHAT_TEMPLATE
    meta = extract_model_archive(build_model_zip(tmp_path / "tiny.zip", "tiny"), dest)
    assert meta.architecture == "LlamaForCausalLM" and meta.has_chat_template is True
    assert meta.parameters == sum(
        math.prod(entry["shape"])
        for entry in model_archive.read_safetensors_header(dest / "model.safetensors").values()
    )


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_quantized_model_skips_the_shape_check(method):
    # qweight/qzeros/scales are not the float modules' tensors, but the model serves
    model = cached_model_dir("tiny", quantization=method)
    assert "model.layers.0.mlp.up_proj.qweight" in model_archive.read_safetensors_header(
        model / "model.safetensors"
    )
    assert inspect_model_dir(model).weight_format == "safetensors"


@pytest.mark.parametrize(
    ("template", "which", "reason"),
    [
        ("{{ raise_exception('this template is broken') }}", "system+user", "is broken"),
        ("{% for m in messages %}{{ m['content'] }}", "system+user", "Unexpected end"),
        (
            "{% for m in messages %}{% if m['role'] == 'assistant' %}"
            "{{ raise_exception('no assistant turns') }}{% endif %}{{ m['content'] }}{% endfor %}",
            "user/assistant/user",
            "no assistant turns",
        ),
    ],
)
def test_chat_template_that_cannot_render_is_refused(
    model_dir, tmp_path, dest, template, which, reason
):
    write_json(
        model_dir / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template},
    )
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        rf"chat template cannot render a {re.escape(which)} conversation: .*{reason}",
    )


def test_tool_aware_template_failing_on_tool_results_serves_through_the_fallback(model_dir):
    # it reads tool_calls, so it first gets tool conversations as they are and fails on them;
    # the fallback conversation (system, user and assistant turns only) renders
    template = (
        "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}"
        "{% elif m['role'] == 'tool' %}{{ m.content.no.such.attribute }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    write_json(
        model_dir / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template},
    )
    assert inspect_model_dir(model_dir).has_chat_template


def test_chat_template_file_that_cannot_render_is_refused(model_dir):
    write_json(model_dir / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    (model_dir / "chat_template.jinja").write_text("{{ raise_exception('broken file') }}")
    with pytest.raises(ArchiveError, match=r"cannot render a system\+user .*broken file"):
        inspect_model_dir(model_dir)


def test_tokenizer_that_cannot_load_is_refused(model_dir):
    write_json(model_dir / "tokenizer.json", {"model": {"type": "NoSuchModel"}})
    with pytest.raises(ArchiveError, match=r"the tokenizer cannot be loaded by the installed"):
        inspect_model_dir(model_dir)


def test_weight_shape_that_config_does_not_imply_is_refused(model_dir, tmp_path, dest):
    write_json(model_dir / "config.json", {**LLAMA_CONFIG, "intermediate_size": 256})
    err = expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"the weights do not match config\.json: model\.layers\.0\.mlp\.down_proj\.weight has "
        r"shape \[64, 128\] but config\.json implies \[64, 256\]",
    )
    assert "gate_proj.weight has shape [128, 64] but config.json implies [256, 64]" in str(err)


@pytest.mark.parametrize(
    ("config", "drop", "missing"),
    [
        ({}, "model.layers.0.self_attn.k_proj.weight", r"1 .*: model\.layers\.0\.self_attn\.k"),
        ({}, "lm_head.weight", r"1 .*: lm_head\.weight"),  # not tied in this config
        ({"num_hidden_layers": 2}, None, r"9 .*: model\.layers\.1\..* \(and 6 more\)"),
    ],
)
def test_missing_weights_are_refused(model_dir, tmp_path, dest, config, drop, missing):
    write_json(model_dir / "config.json", {**LLAMA_CONFIG, **config})
    tensors = llama_tensors()
    tensors.pop(drop, None)
    write_weights(model_dir / "model.safetensors", tensors)
    path = zip_dir(model_dir, tmp_path / "m.zip")
    err = expect_failure(path, dest, "the weights lack " + missing)
    assert "tensor(s) that config.json's model (LlamaForCausalLM) needs: " in str(err)


def test_unexpected_weights_are_refused(model_dir, tmp_path, dest):
    tensors = {**llama_tensors(), "model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2))}
    write_weights(model_dir / "model.safetensors", tensors)
    expect_failure(
        zip_dir(model_dir, tmp_path / "m.zip"),
        dest,
        r"the weights hold 1 tensor\(s\) that config\.json's model \(LlamaForCausalLM\) does "
        r"not have: model\.layers\.0\.mlp\.extra_proj\.weight",
    )


def test_tied_lm_head_may_be_left_out(model_dir):
    config = {**LLAMA_CONFIG, "tie_word_embeddings": True}
    write_json(model_dir / "config.json", config)
    write_weights(model_dir / "model.safetensors", llama_tensors(config))
    assert "lm_head.weight" not in llama_tensors(config)
    assert inspect_model_dir(model_dir).architecture == "LlamaForCausalLM"


def test_weights_that_transformers_also_loads_are_accepted(model_dir):
    # saved from the bare LlamaModel (no "model." prefix), with an old per-layer rotary buffer
    tensors = {name.removeprefix("model."): t for name, t in llama_tensors().items()}
    tensors["layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(32, np.float32)
    write_weights(model_dir / "model.safetensors", tensors)
    assert inspect_model_dir(model_dir).parameters == EXPECTED_PARAMS + 32


def test_config_transformers_cannot_build_is_refused(model_dir, monkeypatch):
    def from_config(config):
        raise RuntimeError("no such layer type")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    with pytest.raises(
        ArchiveError,
        match=r"transformers [\d.]+\w* cannot build the model config\.json describes: "
        r"RuntimeError: no such layer type",
    ):
        inspect_model_dir(model_dir)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"description": "' + b"x" * (2 * 2**20) + b'"}', r"deployconfig\.json holds \d+ bytes"),
        (b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nests deeper"),
    ],
    ids=["2 MiB", "deep"],
)
def test_an_oversized_or_deep_settings_file_is_refused(model_dir, content, reason):
    """deployconfig.json is kept in the model's row and returned by every models list: one of
    100 MB made each list page carry it; one nested 200,000 deep was 'import failed:
    maximum recursion depth exceeded'."""
    (model_dir / "deployconfig.json").write_bytes(content)
    with pytest.raises(ArchiveError, match=reason):
        inspect_model_dir(model_dir)
