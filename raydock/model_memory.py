"""How much memory a causal language model needs to serve, from its `config.json` figures.

The one place for these rules: the vLLM engine sizes its KV cache with them, and the deploy
check (`raydock.optimizers.fit`) estimates with them whether a deviceType can hold a model
before anything is downloaded or started. Plain arithmetic, no dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The longest context an engine serves per sequence (vLLM sizes its KV cache for it; the
#: transformers and CTranslate2 engines grow toward it, never past it).
MAX_SERVING_CONTEXT = 2048


def serving_context(model_limit: int) -> int:
    """The context an engine serves a model with: its own limit, at most MAX_SERVING_CONTEXT
    (what the memory check sized the replica for; a longer prompt is a 400 on every engine)."""
    return min(model_limit, MAX_SERVING_CONTEXT)


#: Extra KV slots per sequence beyond the context (vLLM's block rounding, a generation step).
KV_SLACK_TOKENS = 256
#: The config.json keys the estimate reads; kept in a model's metadata at import.
SHAPE_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "num_local_experts",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
)
#: Bytes per element of a floating-point dtype by name.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}
#: The transformers engine's weights and KV cache dtype by device.
TRANSFORMERS_DTYPE = {"cuda": "float16", "cpu": "float32"}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def shape_figures(config: dict[str, Any]) -> dict[str, Any]:
    """The figures of `config.json` that `ModelShape` reads (for a model's metadata)."""
    cfg = text_config(config)
    return {k: cfg[k] for k in SHAPE_KEYS if cfg.get(k) is not None}


def _count(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json {key!r} must be a positive integer, not {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int
    tied: bool
    context: int
    dtype: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read the figures; ValueError naming the key when one is missing or not a count."""
        cfg = text_config(config)
        hidden = _count(cfg, "hidden_size")
        heads = _count(cfg, "num_attention_heads")
        return cls(
            layers=_count(cfg, "num_hidden_layers"),
            hidden=hidden,
            heads=heads,
            kv_heads=_count(cfg, "num_key_value_heads", heads),
            head_dim=_count(cfg, "head_dim", hidden // heads or 1),
            intermediate=_count(cfg, "intermediate_size", 4 * hidden),
            vocab=_count(cfg, "vocab_size"),
            experts=_count(cfg, "num_local_experts", 1),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            context=_count(cfg, "max_position_embeddings", MAX_SERVING_CONTEXT),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    def parameters(self) -> int:
        """Weights of a decoder-only transformer: embeddings, attention (q, k, v, o), a gated
        MLP per expert (+ router), two norms per layer and a final one, the LM head unless
        tied to the embeddings. Biases and extra norms (a few per million) are left out."""
        attention = 2 * self.hidden * self.heads * self.head_dim  # q and o
        attention += 2 * self.hidden * self.kv_heads * self.head_dim  # k and v
        mlp = 3 * self.hidden * self.intermediate * self.experts
        router = self.hidden * self.experts if self.experts > 1 else 0
        per_layer = attention + mlp + router + 2 * self.hidden
        embeddings = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return embeddings + self.layers * per_layer + self.hidden + head

    def kv_bytes_per_token(self, width: int) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * width

    def serving_context(self, limit: int | None = None) -> int:
        return min(self.context, limit or MAX_SERVING_CONTEXT)


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, width: int) -> int:
    """The KV cache for `batch` sequences of `context` tokens."""
    return shape.kv_bytes_per_token(width) * (context + KV_SLACK_TOKENS) * batch
