"""Guided decoding for the engines that sample themselves (transformers, CTranslate2), on
llguidance: a grammar → one `Matcher` per sequence → allowed-token masks, forced tokens.

llguidance builds its lexer and parser lazily, so a compile costs about a millisecond and no
automaton is built up front. What it may build is bounded by `Limits` (llguidance's parser
limits plus a wall-clock bound): a grammar over a bound is refused with a 400 that names it,
and a sequence whose step runs over one ends with finish_reason "length", never "stop".
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

from raydock.serve_apps.engines.base import ConstraintError

CACHE_SIZE = 64


@dataclass(frozen=True)
class Limits:
    """Per-request bounds on grammar compile and mask computation (llguidance's limits; its
    lexer states cost about 1-2 kB each, so max_lexer_states bounds a request's memory)."""

    compile_timeout_s: float = 10.0
    max_grammar_size: int = 200_000  # symbols in the grammar's productions
    max_lexer_states: int = 50_000  # ~100 MB at most
    initial_lexer_fuel: int = 1_000_000  # ~20 ms of regex analysis at compile
    step_lexer_fuel: int = 200_000  # ~15 ms per mask
    step_max_items: int = 50_000  # Earley items per mask
    max_items_in_row: int = 2_000

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults, overridden by RAYDOCK_GUIDED_LIMITS (a JSON object of fields)."""
        return cls(**json.loads(os.environ.get("RAYDOCK_GUIDED_LIMITS") or "{}"))

    def parser_limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row,
            initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states,
            max_grammar_size=self.max_grammar_size,
            verbose_errors=False,  # errors go to clients: no grammar dumps
        )


# llguidance's wording of a limit → the Limits field that sets it
_LIMIT_NAMES = {
    "grammar size": "max_grammar_size",
    "lexer configuration": "initial_lexer_fuel",
    "lexer states": "max_lexer_states",
    "fuel": "initial_lexer_fuel / step_lexer_fuel",
    "items": "step_max_items / max_items_in_row",
}


def _explain(kind: str, error: str) -> str:
    error = " ".join(error.split()) or "unknown error"
    if len(error) > 300:
        error = error[:300] + " …"
    for words, name in _LIMIT_NAMES.items():
        if words in error.lower() and ("limit" in error.lower() or "too" in error.lower()):
            return f"the {kind} exceeds the guided-decoding bound {name}: {error}"
    if "regex parse error" in error or "invalid regex" in error:
        return (
            f"a regex in the {kind} could not be compiled (the Rust regex dialect: no "
            f"look-arounds, backreferences or other non-regular constructs): {error}"
        )
    return f"the {kind} could not be compiled: {error}"


def grammar_of(kind: str, text: str) -> str:
    """llguidance's serialized grammar for a `regex` or a Lark/GBNF `grammar`."""
    try:
        return llguidance.grammar_from("regex" if kind == "regex" else "grammar", text)
    except ValueError as exc:  # GBNF that does not convert
        raise ConstraintError(f"the {kind} could not be compiled: {exc}") from None


class Matcher:
    """One sequence's position in its grammar."""

    __slots__ = ("m", "failed")

    def __init__(self, m: llguidance.LLMatcher):
        self.m = m
        self.failed = False  # a per-step bound was hit: the sequence ends with "length"

    def allows(self, token: int) -> bool:
        return not self.failed and self.m.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        if not self.failed and not self.m.consume_token(token):
            self.failed = True

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (appended without a model call)."""
        return [] if self.failed else self.m.compute_ff_tokens()

    def is_finished(self) -> bool:
        return self.failed or self.m.is_stopped()

    @property
    def error(self) -> str:
        return self.m.get_error()


class GuidedDecoder:
    """Compiles grammars for one tokenizer (cached), makes matchers, applies batch masks."""

    def __init__(
        self,
        tokenizer,
        eos_ids: set[int] | int,
        vocab_size: int,
        limits: Limits | None = None,
        cache_size: int = CACHE_SIZE,
    ):
        eos = sorted(eos_ids) if isinstance(eos_ids, set) else [eos_ids]
        n_vocab = max(vocab_size, len(tokenizer))
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
        self.eos = set(eos)
        self.vocab_size = vocab_size
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self.limits = limits if limits is not None else Limits.from_env()
        self._parser_limits = self.limits.parser_limits()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # compiles are bounded by the limits; two threads keep one slow one from queuing all
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="guided-compile")
        self._shifts = torch.arange(32, dtype=torch.int32)
        # for the replica's metrics: a request's check found its grammar compiled, or not;
        # compile durations not yet reported (the replica takes them)
        self.cache_hits = self.cache_misses = 0
        # compile times the meter has not taken yet (bounded: with metering off nobody does)
        self.compile_seconds: collections.deque[float] = collections.deque(maxlen=1000)

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        started = time.perf_counter()
        try:
            m = llguidance.LLMatcher(
                self.tokenizer, grammar, log_level=0, limits=self._parser_limits
            )
        except BaseException as exc:  # noqa: BLE001 - pyo3 panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise ConstraintError(_explain("grammar", str(exc))) from None
        if m.is_error():
            raise ConstraintError(_explain("grammar", m.get_error()))
        self.compile_seconds.append(time.perf_counter() - started)
        return m

    def compile_sync(self, grammar: str) -> llguidance.LLMatcher:
        """The grammar's start state (cached); raises ConstraintError."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
        m = self._build(grammar)
        with self._lock:
            self._cache[grammar] = m
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return m

    async def matcher(self, grammar: str) -> Matcher:
        """A fresh matcher; compiles (off the event loop) within `limits.compile_timeout_s`.
        llguidance's fuel and size limits end a compile long before that; the timeout is the
        last resort, and the thread's work is bounded by the same limits."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)  # least recently used goes first
        if cached is None:
            future = self._pool.submit(self.compile_sync, grammar)
            try:
                cached = await asyncio.wait_for(
                    asyncio.wrap_future(future), self.limits.compile_timeout_s
                )
            except TimeoutError:
                raise ConstraintError(
                    "the grammar exceeds the guided-decoding bound compile_timeout_s "
                    f"({self.limits.compile_timeout_s:g} s)"
                ) from None
        return Matcher(cached.deep_copy())

    async def check(self, grammar: str) -> None:
        """Compile `grammar` (each request is checked once, before `matcher`)."""
        with self._lock:
            hit = grammar in self._cache
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        await self.matcher(grammar)

    def masks(self, matchers: list[Matcher]) -> torch.Tensor:
        """Allowed-token bits ([len(matchers), vocab] bool). A matcher whose step fails
        (a per-step bound) is marked failed and allows only its end tokens."""
        words = torch.zeros(len(matchers), self.words, dtype=torch.int32)
        for r, mt in enumerate(matchers):
            if not mt.failed:
                # ~5-10 µs a row here; llguidance's parallel executor measured no faster
                mt.m.unsafe_compute_mask_ptr(words[r].data_ptr(), self.words * 4)
                if mt.m.is_error():
                    mt.failed = True
        bits = (words.unsqueeze(-1) >> self._shifts) & 1
        allowed = bits.reshape(len(matchers), -1).bool()
        for r, mt in enumerate(matchers):
            if mt.failed:
                allowed[r] = False
                allowed[r, sorted(self.eos)] = True
        return allowed

    def apply(self, logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
        """Set disallowed tokens to -inf for every row that has a matcher ([batch, vocab])."""
        rows = [i for i, g in enumerate(matchers) if g is not None]
        if not rows:
            return logits
        allowed = self.masks([matchers[i] for i in rows])
        width = logits.shape[-1]
        if allowed.shape[-1] < width:  # model rows beyond the tokenizer
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[-1]))
        allowed = allowed[:, :width]
        if len(rows) == logits.shape[0]:  # every row guided: in place, no gather/scatter
            return logits.masked_fill_(~allowed, float("-inf"))
        index = torch.tensor(rows)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits

    def only_end(self, mt: Matcher) -> bool:
        """True when the grammar can only end here (its only allowed tokens are end tokens)."""
        if mt.failed or mt.m.is_stopped():
            return True
        if not mt.m.is_accepting():
            return False
        allowed = self.masks([mt])[0]
        return int(allowed.sum()) == sum(1 for e in self.eos if e < allowed.shape[0])


class GuidedChecks:
    """What the transformers and CTranslate2 engines share of guided decoding: the checks
    before the first token and a request's matcher, from their `guided` decoder."""

    guided: GuidedDecoder

    async def check_regex(self, regex: str) -> None:
        await self.guided.check(grammar_of("regex", regex))  # cached for `generate`

    async def check_grammar(self, grammar: str) -> None:
        await self.guided.check(grammar_of("grammar", grammar))

    async def _matcher(self, regex: str | None, grammar: str | None) -> Matcher | None:
        if regex is not None:
            return await self.guided.matcher(grammar_of("regex", regex))
        if grammar is not None:
            return await self.guided.matcher(grammar_of("grammar", grammar))
        return None
