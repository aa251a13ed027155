"""Guided decoding benchmark: schema compile time and the per-token cost of a schema.

    python -m benchmarks.guided

1. Compile a typical 5-field schema (guided.json_grammar + llguidance matcher) over the tiny
   (2k), small (8k) and a 32k-entry tokenizer: first compile, then a cached lookup.
   (benchmarks/guided_corpus.py compares the old regex/outlines path on the whole corpus.)
2. Time per output token on the small model at batch 1 and 16, with and without a schema
   (a free-text field longer than max_tokens: guided and unguided sequences run equally long).
Writes benchmarks/out/guided.{json,md}.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from benchmarks.serving import machine, save

FIVE_FIELDS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"},
        "status": {"enum": ["active", "inactive", "pending"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "email", "status", "score"],
    "additionalProperties": False,
}
# Far more characters than max_tokens can write: every guided sequence runs exactly as many
# steps as an unguided one, so the two times per token compare like with like.
LONG_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 1000}},
    "required": ["text"],
}


def big_tokenizer(vocab_size: int = 32768):
    """A byte-level BPE tokenizer of `vocab_size` entries, trained here (nothing downloaded):
    the shipped corpus plus seeded pseudo-words, so BPE has enough merges to learn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from raydock.modelgen import corpus_text

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiouy")
    words = [
        "".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(150_000)
    ]
    lines = corpus_text().splitlines() + [
        " ".join(words[i : i + 12]) for i in range(0, len(words), 12)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def compile_times(tokenizer, label: str, repeats: int = 20) -> dict:
    from raydock.serve_apps.guided import GuidedDecoder, grammar_of, json_grammar

    t0 = time.perf_counter()
    grammar = grammar_of("grammar", json_grammar(FIVE_FIELDS))
    grammar_ms = (time.perf_counter() - t0) * 1e3
    decoder = GuidedDecoder(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))
    firsts, cached = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoder._build(grammar)  # uncached
        firsts.append((time.perf_counter() - t0) * 1e3)
    for _ in range(20):
        t0 = time.perf_counter()
        asyncio.run(decoder.matcher(grammar))
        cached.append((time.perf_counter() - t0) * 1e3)
    return {
        "tokenizer": label,
        "vocab": len(tokenizer),
        "schema_to_grammar_ms": grammar_ms,
        "first_compile_ms_p50": statistics.median(firsts),
        "cached_ms_p50": statistics.median(cached),
    }


def per_token(
    engine, batch: int, grammar: str | None, max_tokens: int = 48, repeats: int = 5
) -> float:
    """Median time per output token of one sequence, `batch` sequences decoding together."""
    from raydock.serve_apps.sampling import SamplingParams

    ids = engine.chat_prompt([{"role": "user", "content": "Write a long note."}])

    async def one(seed: int) -> int:
        n = 0
        params = SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=grammar is None)
        async for steps in engine.generate(ids, params, None, grammar=grammar):
            n = steps[-1].completion_tokens
        return n

    async def run() -> float:
        await one(0)  # warm-up (and compile, for the guided run)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = await asyncio.gather(*(one(i) for i in range(batch)))
            assert set(tokens) == {max_tokens}, f"sequences ended early: {tokens}"
            times.append((time.perf_counter() - t0) * 1e3 / max_tokens)
        return statistics.median(times)

    return asyncio.run(run())


def main() -> None:
    from raydock.modelgen import build_tokenizer, cached_model_dir
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine
    from raydock.serve_apps.guided import json_grammar

    compile_rows = [
        compile_times(build_tokenizer(2048), "tiny (modelgen)"),
        compile_times(build_tokenizer(8192), "small (modelgen)"),
        compile_times(big_tokenizer(), "32k (BPE trained here)"),
    ]
    engine = TransformersEngine(str(cached_model_dir("small")), num_threads=2, max_batch_size=16)
    grammar = json_grammar(LONG_TEXT)
    token_rows = []
    for batch in (1, 16):
        # alternate the two (ABAB...): drift and other load on the host hit both alike
        plains, guideds = [], []
        for _ in range(7):
            plains.append(per_token(engine, batch, None, repeats=1))
            guideds.append(per_token(engine, batch, grammar, repeats=1))
        plain, guided = statistics.median(plains), statistics.median(guideds)
        token_rows.append(
            {
                "batch": batch,
                "unguided_ms_per_token": plain,
                "guided_ms_per_token": guided,
                "ratio": guided / plain,
            }
        )
    md = [
        f"Machine: {machine()}",
        "",
        "| tokenizer | vocab | schema→grammar ms | first compile ms (p50) | cached ms (p50) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['tokenizer']} | {r['vocab']} | {r['schema_to_grammar_ms']:.2f} "
        f"| {r['first_compile_ms_p50']:.1f} | {r['cached_ms_p50']:.3f} |"
        for r in compile_rows
    ]
    md += [
        "",
        "| batch | unguided ms/token | guided ms/token | guided / unguided |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['batch']} | {r['unguided_ms_per_token']:.2f} | {r['guided_ms_per_token']:.2f} "
        f"| {r['ratio']:.3f} |"
        for r in token_rows
    ]
    record = {"machine": machine(), "compile": compile_rows, "per_token": token_rows}
    save("guided", record, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
