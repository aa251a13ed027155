"""The previous guided-decoding path (outlines-core DFA index), kept only so that
benchmarks/guided.py can measure it against raydock.serve_apps.guided in one run.

regex → outlines-core Index over the deployment's own vocabulary → one Guide per sequence →
an allowed-token mask per step.

Indexes are compiled off the event loop and kept in an LRU shared by all requests of a
replica; masks for a whole batch are applied in one vectorized operation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from outlines_core import Guide, Index, Vocabulary

from raydock.serve_apps.engines.base import ConstraintError

CACHE_SIZE = 64
#: How long a request waits for its regex to compile before a 400 (see `guide`)
COMPILE_TIMEOUT_S = 30.0


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ unicode table, inverted (byte-level BPE token text → raw bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The raw bytes each non-special token stands for."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    kind = type(decoder).__name__ if decoder is not None else ""
    out: dict[int, bytes] = {}
    if "ByteLevel" in kind or "ByteLevel" in repr(decoder):
        table = _byte_level_decoder()
        for tok, i in vocab.items():
            if i not in special and all(c in table for c in tok):
                out[i] = bytes(table[c] for c in tok)
        return out
    for tok, i in vocab.items():  # SentencePiece style: ▁ is a space, <0xNN> a raw byte
        if i in special:
            continue
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out[i] = bytes([int(tok[3:5], 16)])
        else:
            out[i] = tok.replace("▁", " ").encode()
    return out


def _explain(error: str) -> str:
    if error.startswith("Failed to build DFA"):
        return (
            "the regex could not be compiled (the Rust regex dialect: no look-arounds, "
            f"backreferences or other non-regular constructs): {error}"
        )
    if len(error) > 300:  # outlines-core lists every missing character
        error = error[:300] + " …"
    return f"this model's vocabulary cannot produce what the regex asks for: {error}"


@dataclass
class _Compile:
    future: Future
    waiters: int = 0  # requests waiting for it


class GuidedDecoder:
    """Compiles and caches indexes for one tokenizer; builds per-step masks."""

    def __init__(
        self,
        tokenizer,
        eos_id: int,
        vocab_size: int,
        cache_size: int = CACHE_SIZE,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
    ):
        mapping: dict[bytes, list[int]] = {}
        for i, b in token_bytes(tokenizer).items():
            if b and i != eos_id:
                mapping.setdefault(b, []).append(i)
        self.vocabulary = Vocabulary(eos_id, mapping)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._cache: OrderedDict[str, Index] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="guided-compile")
        self._compiling: dict[str, _Compile] = {}  # regex -> its compile, queued or running
        self.compile_timeout_s = compile_timeout_s
        self._shifts = torch.arange(32, dtype=torch.int32)

    def index(self, regex: str) -> Index:
        with self._lock:
            if regex in self._cache:
                self._cache.move_to_end(regex)
                return self._cache[regex]
        try:  # outside the lock: compiles can overlap
            index = Index(regex, self.vocabulary)
        except ValueError as exc:  # outlines-core: "Failed to build DFA ...", or the vocabulary
            raise ConstraintError(_explain(str(exc))) from None
        with self._lock:
            self._cache[regex] = index
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return index

    async def guide(self, regex: str) -> Guide:
        """A fresh guide. Compiling (if not cached) runs on a worker thread, once however many
        requests wait for it, and each waits at most `compile_timeout_s`: some regexes need a
        DFA exponential in their size (`(a|b)*a(a|b){20}`: minutes), and one request must not
        hold a replica's guided requests that long. A compile nobody waits for any more is
        dropped if it has not started; a started one cannot be stopped: it goes on and is
        cached, so a later request with the same regex finds it."""
        with self._lock:
            if regex in self._cache:
                self._cache.move_to_end(regex)  # least recently used goes first
                return Guide(self._cache[regex])
            job = self._compiling.get(regex)
            if job is None:
                job = self._compiling[regex] = _Compile(self._pool.submit(self.index, regex))
                job.future.add_done_callback(lambda _: self._compiling.pop(regex, None))
            job.waiters += 1
        try:
            index = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(job.future)), self.compile_timeout_s
            )
        except TimeoutError:
            raise ConstraintError(
                f"the regex did not compile within {self.compile_timeout_s:g} s "
                "(its automaton is very large); simplify it"
            ) from None
        finally:  # answered, timed out or the client left
            with self._lock:
                job.waiters -= 1
                if job.waiters == 0:
                    job.future.cancel()  # only takes while still queued
        return Guide(index)

    def apply(self, logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
        """Set disallowed tokens to -inf for every row that has a guide ([batch, vocab])."""
        rows = [i for i, g in enumerate(guides) if g is not None]
        if not rows:
            return logits
        words = torch.zeros(len(rows), self.words, dtype=torch.int32)
        for r, i in enumerate(rows):
            guides[i].write_mask_into(words[r].data_ptr(), self.words, 4)
        bits = (words.unsqueeze(-1) >> self._shifts) & 1
        allowed = bits.reshape(len(rows), -1)[:, : logits.shape[-1]].bool()
        if allowed.shape[-1] < logits.shape[-1]:  # model rows beyond the tokenizer
            pad = logits.shape[-1] - allowed.shape[-1]
            allowed = torch.nn.functional.pad(allowed, (0, pad), value=False)
        index = torch.tensor(rows)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits
