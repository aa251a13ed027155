"""Deterministic generator of small random-weight Llama models for tests, demos and benchmarks.

The same ``(size, seed)`` always gives byte-identical ``model.safetensors`` and
``tokenizer.json``. The tokenizer is a byte-level BPE (every string is encodable) trained on the
bundled ``corpus.txt``; the weights are random, so the models produce random word pieces.

Usage::

    from raydock.modelgen import cached_model_dir, generate_model, build_model_zip

    model_dir = cached_model_dir("tiny")  # generated once, then reused from the cache
    generate_model("/tmp/tiny", size="tiny", seed=0)
    build_model_zip("/tmp/tiny.zip", extra_files={"deployconfig.json": b"{}"})

or ``python -m raydock.modelgen --size tiny --out DIR [--zip FILE]``.

torch and transformers are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import unicodedata
import uuid
import zipfile
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydock.hf_quiet import quiet_progress_bars

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "GENERATOR_VERSION",
    "MODEL_FILES",
    "SIZES",
    "SPECIAL_TOKENS",
    "build_model_zip",
    "build_tokenizer",
    "cached_model_dir",
    "generate_model",
    "llama_config",
]

#: Bump whenever the output of :func:`generate_model` changes for some ``(size, seed)``;
#: it is part of the cache directory name, so stale cached models are never reused.
GENERATOR_VERSION = 1

#: Architecture of each size. ``hidden_size / num_attention_heads`` is 64 everywhere.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 2048,
    },
    # the tiny model with many layers: as small an archive, but each token takes several
    # times longer, so tests can hold a replica busy past a 30 s timeout
    "deep": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 16,
        "intermediate_size": 256,
        "max_position_embeddings": 2048,
    },
    "small": {
        "vocab_size": 8192,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "num_hidden_layers": 8,
        "intermediate_size": 2048,
        "max_position_embeddings": 2048,
    },
}

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
#: Special tokens in id order: they get ids 0..7 in every generated tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

#: Files every generated model directory holds (``chat_template.jinja`` duplicates the
#: ``chat_template`` entry of ``tokenizer_config.json``, for transformers 5 and for 4.x).
MODEL_FILES: tuple[str, ...] = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

#: ``<s><|system|>\n...<|end|>\n<|user|>\n...<|end|>\n<|assistant|>\n``. Content may be a
#: string, None or a list of OpenAI-style parts (only ``text`` parts are kept); the
#: ``developer`` role is rendered as ``system``; other roles raise an error.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- set role = 'system' if message['role'] == 'developer' else message['role'] %}\n"
    "    {%- if role not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception('Unsupported chat role ' ~ message['role'] ~ "
    "': expected system, user or assistant') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['content'] is string %}\n"
    "        {%- set content = message['content'] %}\n"
    "    {%- elif message['content'] is none %}\n"
    "        {%- set content = '' %}\n"
    "    {%- else %}\n"
    "        {%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}\n"
    "    {%- endif %}\n"
    "    {{- '<|' ~ role ~ '|>\\n' ~ content ~ '<|end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|assistant|>\\n' }}\n"
    "{%- endif %}\n"
)

_CORPUS_FILE = "corpus.txt"
# Training text = corpus x _CORPUS_WEIGHT + the corpus upper-cased once. The upper-cased copy
# gives the trainer enough distinct words to fill an 8192-entry vocabulary; the weight keeps
# ordinary-case merges first.
_CORPUS_WEIGHT = 4
_FIXED_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
_cache_lock = threading.Lock()


def _check_size(size: str) -> dict[str, int]:
    if size not in SIZES:
        allowed = ", ".join(repr(s) for s in SIZES)
        raise ValueError(f"unknown model size {size!r}: allowed sizes are {allowed}")
    return SIZES[size]


# --------------------------------------------------------------------------------- tokenizer


def corpus_text() -> str:
    return resources.files(__name__).joinpath(_CORPUS_FILE).read_text(encoding="utf-8")


@functools.cache
def _trained_tokenizer_json(corpus_sha256: str, vocab_size: int) -> str:
    """Serialized trained tokenizer; trained once per process per (corpus, vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = corpus_text()
    if hashlib.sha256(text.encode()).hexdigest() != corpus_sha256:  # pragma: no cover
        raise RuntimeError("modelgen corpus changed while the process was running")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(
        lines * _CORPUS_WEIGHT + text.upper().splitlines(keepends=True), trainer=trainer
    )
    if tok.get_vocab_size() != vocab_size:  # pragma: no cover - guards corpus edits
        raise RuntimeError(
            f"BPE training gave {tok.get_vocab_size()} tokens instead of {vocab_size}; "
            f"the corpus {_CORPUS_FILE} is too small for this vocabulary size"
        )
    for token, token_id in _IDS.items():
        if tok.token_to_id(token) != token_id:  # pragma: no cover
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}")
    # Like Llama: plain tokenizer(text) calls prepend <s>; chat templates write it themselves.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, _IDS[BOS])]
            ),
        ]
    )
    return tok.to_str()


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer (trained on the bundled corpus) with its chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    corpus_sha = hashlib.sha256(corpus_text().encode()).hexdigest()
    backend = Tokenizer.from_str(_trained_tokenizer_json(corpus_sha, vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max(s["max_position_embeddings"] for s in SIZES.values()),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    # Written by hand rather than taken from save_pretrained: transformers 5 writes
    # tokenizer_class "TokenizersBackend" and a list under extra_special_tokens, which
    # transformers 4.x cannot load; this form loads in both.
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
    }


def _save_tokenizer(out: Path, tokenizer: PreTrainedTokenizerFast, spec: Mapping[str, int]) -> None:
    tokenizer.save_pretrained(str(out))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(spec["max_position_embeddings"]))
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
        },
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table that byte-level BPE token strings use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _suppressed_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Special tokens plus tokens whose bytes are not valid UTF-8 or hold control characters."""
    decoder = _byte_decoder()
    ids = set(range(len(SPECIAL_TOKENS)))
    for token, token_id in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        try:
            text = bytes(decoder[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            ids.add(token_id)
            continue
        if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in text):
            ids.add(token_id)
    return sorted(ids)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------- model


def llama_config(size: str = "tiny") -> LlamaConfig:
    """The ``LlamaConfig`` of ``size`` (float32, untied embeddings, head_dim 64)."""
    from transformers import LlamaConfig

    spec = _check_size(size)
    return LlamaConfig(
        **spec,
        head_dim=spec["hidden_size"] // spec["num_attention_heads"],
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=_IDS[BOS],
        eos_token_id=_IDS[EOS],
        pad_token_id=_IDS[PAD],
        dtype="float32",
        use_cache=True,
    )


def _save_model(out: Path, size: str, seed: int, suppressed_ids: list[int]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = llama_config(size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Re-initialise every parameter ourselves, in name order from a private generator, so the
    # bytes do not depend on how a given transformers version initialises weights.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dim() >= 2:
                param.normal_(0.0, std, generator=gen)
            else:  # pragma: no cover - Llama has no biases; keep any future ones at zero
                param.zero_()
        # Special tokens and byte tokens that are not whole printable characters get all-zero
        # output rows: their logit is exactly 0 while the other logits spread around 0, so
        # greedy decoding never picks them: random greedy generations run to max_new_tokens
        # and decode to clean text. (Sampling still picks them now and then.)
        model.lm_head.weight[suppressed_ids] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=_IDS[BOS],
        eos_token_id=[_IDS[EOS], _IDS[END]],  # </s> and the end-of-turn token <|end|>
        pad_token_id=_IDS[PAD],
    )
    with quiet_progress_bars():
        model.save_pretrained(str(out), safe_serialization=True)


# ---------------------------------------------------------------------------------- public


def generate_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Llama model of ``size`` in Hugging Face layout into ``out_dir``.

    Writes config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and chat_template.jinja (existing files of
    those names are overwritten) and returns ``out_dir``. Raises ValueError for an unknown size.
    """
    spec = _check_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec["vocab_size"])
    _save_tokenizer(out, tokenizer, spec)
    _save_model(out, size, seed, _suppressed_token_ids(tokenizer))
    missing = [name for name in MODEL_FILES if not (out / name).is_file()]
    if missing:  # pragma: no cover - would mean transformers changed its file names
        raise RuntimeError(f"generated model in {out} lacks {missing}")
    for name in MODEL_FILES:  # safetensors writes 0600; make the files readable like the rest
        os.chmod(out / name, 0o644)
    return out


def _default_cache_root() -> Path:
    env = os.environ.get("RAYDOCK_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "raydock" / "models"


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in MODEL_FILES)


def cached_model_dir(
    size: str = "tiny",
    seed: int = 0,
    cache_root: str | Path | None = None,
    quantization: str | None = None,
) -> Path:
    """Directory holding the ``(size, seed)`` model, generated on first use.

    The cache root is ``cache_root``, else ``$RAYDOCK_MODEL_CACHE``, else
    ``~/.cache/raydock/models``; the model lives in ``<root>/<size>-s<seed>-v<GENERATOR_VERSION>``.
    With ``quantization`` ("awq" or "gptq") it is that 4-bit checkpoint of the model
    (:mod:`raydock.modelgen.quantized`), in the same directory name plus ``-<quantization>``.
    The model is written to a temporary directory and renamed into place, so concurrent
    processes never see a half-written model. Treat the returned directory as read-only.
    """
    _check_size(size)
    root = Path(cache_root).expanduser() if cache_root is not None else _default_cache_root()
    final = root / f"{size}-s{seed}-v{GENERATOR_VERSION}"
    if quantization:
        from raydock.modelgen.quantized import quantize_model  # checks the method

        source = cached_model_dir(size, seed, root)
        return _cached(
            root / f"{final.name}-{quantization}",
            lambda tmp: quantize_model(source, tmp, quantization),
        )
    return _cached(final, lambda tmp: generate_model(tmp, size=size, seed=seed))


def _cached(final: Path, write: Callable[[Path], Any]) -> Path:
    """`final`, written by `write(tmp)` into a temporary directory renamed into place."""
    root = final.parent
    if _is_complete(final):
        return final
    with _cache_lock:
        if _is_complete(final):
            return final
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():  # incomplete leftover (not written by us): move it out of the way
            stale = root / f".{final.name}.stale-{uuid.uuid4().hex}"
            with contextlib.suppress(OSError):
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            write(tmp)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process renamed its copy into place first; theirs is identical.
                if not _is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_model_zip(
    zip_path: str | Path,
    size: str = "tiny",
    seed: int = 0,
    extra_files: Mapping[str, bytes | None] | None = None,
    top_level_dir: str | None = None,
    *,
    cache_root: str | Path | None = None,
    quantization: str | None = None,
) -> Path:
    """Write a ZIP_DEFLATED archive of the ``(size, seed)`` model files to ``zip_path``.

    ``extra_files`` maps archive names (relative to the model root, e.g. ``deployconfig.json``)
    to contents that are added or replace a model file; a value of ``None`` leaves that model
    file out. With ``top_level_dir`` every entry sits under that single folder. The model comes
    from :func:`cached_model_dir` (``cache_root`` and ``quantization`` are passed on). Entries
    are sorted and carry a fixed timestamp, so the archive is byte-identical for identical
    inputs.
    """
    source = cached_model_dir(size, seed, cache_root, quantization)
    entries: dict[str, Path | bytes] = {name: source / name for name in MODEL_FILES}
    for name, data in (extra_files or {}).items():
        if data is None:
            entries.pop(name, None)
        else:
            entries[name] = bytes(data)
    return write_zip(zip_path, entries, top_level_dir)


def write_zip(
    zip_path: str | Path, entries: Mapping[str, Path | bytes], top_level_dir: str | None = None
) -> Path:
    """Write `entries` (archive name -> a file or its bytes) as a ZIP_DEFLATED archive, sorted,
    with a fixed timestamp (byte-identical for identical inputs), under `top_level_dir` if
    given; written to a temporary name and renamed, so no reader sees half an archive."""
    prefix = f"{top_level_dir.strip('/')}/" if top_level_dir else ""
    target = Path(zip_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp_name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(entries):
                info = zipfile.ZipInfo(prefix + name, date_time=_FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                content = entries[name]
                if isinstance(content, bytes):
                    zf.writestr(info, content)
                else:
                    info.file_size = content.stat().st_size
                    with content.open("rb") as src, zf.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return target
