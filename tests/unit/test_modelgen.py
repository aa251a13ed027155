"""Tests for raydock.modelgen: deterministic random-weight Llama models."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import raydock.modelgen as mg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _param_count(size: str) -> int:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(mg.llama_config(size))
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model generated twice, retraining the tokenizer for the second copy."""
    first = mg.generate_model(tmp_path_factory.mktemp("tiny_a"), size="tiny", seed=0)
    mg._trained_tokenizer_json.cache_clear()
    second = mg.generate_model(tmp_path_factory.mktemp("tiny_b") / "nested", "tiny", 0)
    return first, second


@pytest.fixture(scope="module")
def tiny_dir(tiny_pair: tuple[Path, Path]) -> Path:
    return tiny_pair[0]


def test_generated_files_exist(tiny_dir: Path) -> None:
    for name in mg.MODEL_FILES:
        assert (tiny_dir / name).is_file(), name
        assert (tiny_dir / name).stat().st_size > 0, name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 2048
    assert config["tie_word_embeddings"] is False
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 7]
    tok_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == (tiny_dir / "chat_template.jinja").read_text()
    assert tok_config["eos_token"] == "</s>"
    assert json.loads((tiny_dir / "special_tokens_map.json").read_text())["bos_token"] == "<s>"


def test_same_size_and_seed_is_byte_identical(tiny_pair: tuple[Path, Path]) -> None:
    first, second = tiny_pair
    for name in mg.MODEL_FILES:
        assert _sha256(first / name) == _sha256(second / name), name


def test_other_seed_changes_weights_not_tokenizer(tmp_path: Path, tiny_dir: Path) -> None:
    other = mg.generate_model(tmp_path, size="tiny", seed=1)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_dir / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(tiny_dir / "tokenizer.json")


@pytest.mark.parametrize("size", sorted(mg.SIZES))
def test_head_dim_is_64(size: str) -> None:
    config = mg.llama_config(size)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.head_dim == 64
    assert config.num_attention_heads % config.num_key_value_heads == 0


def test_param_counts() -> None:
    tiny, small = _param_count("tiny"), _param_count("small")
    print(f"tiny: {tiny:,} parameters, small: {small:,} parameters")
    assert 100_000 < tiny < 2_000_000
    assert 50_000_000 < small < 100_000_000


def test_small_tokenizer_fills_its_vocabulary() -> None:
    tok = mg.build_tokenizer(mg.SIZES["small"]["vocab_size"])
    assert len(tok) == 8192
    assert tok.convert_tokens_to_ids(list(mg.SPECIAL_TOKENS)) == list(range(8))


def test_unknown_size_raises() -> None:
    with pytest.raises(ValueError, match="'tiny', 'deep', 'small'"):
        mg.generate_model("/nonexistent/never-written", size="huge")
    with pytest.raises(ValueError, match="allowed sizes"):
        mg.cached_model_dir("huge")
    with pytest.raises(ValueError, match="allowed sizes"):
        mg.llama_config("medium")


def test_tokenizer_roundtrip_and_special_tokens(tiny_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == 2048
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    text = 'Zoë\'s {"naïve": [1, 2.5e-3]} \t→ 日本語 🙂\n'
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]) == [
        4,
        5,
        6,
        7,
    ]


def test_chat_template_renders(tiny_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n"
    )
    without = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    assert without == "<s><|system|>\nBe brief.<|end|>\n"
    with pytest.raises(Exception, match="Unsupported chat role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)


def test_load_and_generate(tiny_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.dtype == torch.float32
    assert list(model.generation_config.eos_token_id) == [2, 7]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about bread."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tok.bos_token_id
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    # Special and partial-byte tokens have zero output rows: greedy never emits them.
    assert len(new) == 10
    assert all(int(i) >= len(mg.SPECIAL_TOKENS) for i in new)
    text = tok.decode(new, skip_special_tokens=True)
    assert text.strip()
    assert "\ufffd" not in text
    again = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, again)


def test_cached_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYDOCK_MODEL_CACHE", str(tmp_path))
    path = mg.cached_model_dir("tiny", seed=3)
    assert path == tmp_path / f"tiny-s3-v{mg.GENERATOR_VERSION}"
    assert all((path / name).is_file() for name in mg.MODEL_FILES)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert mg.cached_model_dir("tiny", seed=3) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not regenerated
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp leftovers
    other = tmp_path / "explicit"
    assert mg.cached_model_dir("tiny", 3, cache_root=other).parent == other


def test_cached_model_dir_replaces_incomplete_dir(tmp_path: Path) -> None:
    broken = tmp_path / f"tiny-s0-v{mg.GENERATOR_VERSION}"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert mg.cached_model_dir("tiny", cache_root=tmp_path) == broken
    assert all((broken / name).is_file() for name in mg.MODEL_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [broken.name]


def test_cached_model_dir_loses_rename_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / f"tiny-s0-v{mg.GENERATOR_VERSION}"
    real_generate = mg.generate_model

    def racing_generate(out_dir: Path, size: str, seed: int) -> Path:
        real_generate(final, size, seed)  # another process finishes first
        return real_generate(out_dir, size, seed)

    monkeypatch.setattr(mg, "generate_model", racing_generate)
    assert mg.cached_model_dir("tiny", cache_root=tmp_path) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_build_model_zip(tmp_path: Path, tiny_dir: Path) -> None:
    extra = {"deployconfig.json": b'{"engine": "transformers"}', "chat_template.jinja": None}
    zip_path = mg.build_model_zip(
        tmp_path / "out" / "m.zip",
        extra_files=extra,
        top_level_dir="my-model",
        cache_root=tmp_path / "cache",
    )
    with zipfile.ZipFile(zip_path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        expected = {f"my-model/{n}" for n in mg.MODEL_FILES if n != "chat_template.jinja"}
        assert set(infos) == expected | {"my-model/deployconfig.json"}
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos.values())
        assert zf.read("my-model/deployconfig.json") == extra["deployconfig.json"]
        weights = zf.read("my-model/model.safetensors")
        assert weights == (tiny_dir / "model.safetensors").read_bytes()
    again = mg.build_model_zip(
        tmp_path / "again.zip",
        extra_files=extra,
        top_level_dir="my-model/",
        cache_root=tmp_path / "cache",
    )
    assert again.read_bytes() == zip_path.read_bytes()
    flat = mg.build_model_zip(
        tmp_path / "flat.zip",
        extra_files={"config.json": b"{}"},
        cache_root=tmp_path / "cache",
    )
    with zipfile.ZipFile(io.BytesIO(flat.read_bytes())) as zf:
        assert sorted(zf.namelist()) == sorted(mg.MODEL_FILES)
        assert zf.read("config.json") == b"{}"


def test_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from raydock.modelgen.__main__ import main

    monkeypatch.setenv("RAYDOCK_MODEL_CACHE", str(tmp_path / "cache"))
    assert (
        main(["--size", "tiny", "--out", str(tmp_path / "m"), "--zip", str(tmp_path / "m.zip")])
        == 0
    )
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert zipfile.is_zipfile(tmp_path / "m.zip")
    assert str(tmp_path / "m.zip") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--size", "huge", "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------- 4-bit checkpoints


def test_awq_and_gptq_pack_4_bit_values_in_their_formats_order():
    from raydock.modelgen import quantized

    # nibble k of an AWQ int32 holds output column (0, 2, 4, 6, 1, 3, 5, 7)[k]; GPTQ packs 8
    # input rows in order
    assert quantized._pack(np.arange(8).reshape(1, 8), axis=1, order=quantized._AWQ_ORDER)[
        0, 0
    ] == np.int32(0x75316420)
    assert quantized._pack(np.arange(8).reshape(8, 1), axis=0)[0, 0] == np.int32(0x76543210)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_4_bit_checkpoint_stands_for_the_weights_within_half_a_step(method):
    from raydock.modelgen import quantized

    w = np.random.default_rng(0).normal(0, 0.02, (96, 128)).astype(np.float32)
    packed = (quantized.quantize_awq if method == "awq" else quantized.quantize_gptq)(w, 64)
    step = packed["scales"].astype(np.float32).repeat(64, axis=0).T  # [out, in]
    error = np.abs(quantized.dequantize(packed, method, 64) - w)
    assert (error <= step * 0.5 + 1e-4).all()


def test_quantized_model_dir_declares_its_quantization(tmp_path):
    model = mg.cached_model_dir("tiny", cache_root=tmp_path, quantization="gptq")
    config = json.loads((model / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 64,
        "sym": True,
        "desc_act": False,
        "checkpoint_format": "gptq",
    }
    assert (model / "tokenizer.json").is_file() and model.name.endswith("-gptq")
    with pytest.raises(ValueError, match="awq"):
        mg.cached_model_dir("tiny", cache_root=tmp_path, quantization="int3")
