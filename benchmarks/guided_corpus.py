"""Old guided path (schema_regex + outlines-core DFA index) vs the new one (guided.normalize +
llguidance), same run, on the schema corpus (tests/schemas, refused ones included):
coverage, compile p50/p99 on a 32k BPE vocabulary, mask time per token at batch 1 and 16,
peak memory (RSS growth) of the hostile constraints on the new path.

    python -m benchmarks.guided_corpus      # writes benchmarks/out/guided_corpus.{json,md}
"""

from __future__ import annotations

import json
import statistics
import time

from benchmarks.guided import FIVE_FIELDS, big_tokenizer
from benchmarks.serving import machine, save
from tests.guided_checks import HOSTILE_REGEX, HOSTILE_SCHEMAS, SCHEMAS, rss_mb

OLD_TIMEOUT_S = 30.0  # the old path's per-request compile budget (COMPILE_TIMEOUT_S)
OLD_MEMORY = 4 * 2**30  # address space of the worker compiling the old path: one schema
# took 24 GB of RAM here before the kernel killed the benchmark


def _old_worker(conn, tok, schemas: list, start: int) -> None:
    """Compile schemas[start:] on the old path, reporting each; the parent restarts a worker
    that dies (memory cap) or stalls (time cap) at the next schema."""
    import resource

    from benchmarks.old_schema_regex import UnsupportedSchema, schema_to_regex
    from benchmarks.outlines_guided import GuidedDecoder as OldDecoder

    resource.setrlimit(resource.RLIMIT_AS, (OLD_MEMORY, OLD_MEMORY))
    old = OldDecoder(tok, tok.eos_token_id, len(tok))
    for i in range(start, len(schemas)):
        t0 = time.perf_counter()
        try:
            old.index(schema_to_regex(schemas[i]))
            conn.send((i, "ok", (time.perf_counter() - t0) * 1e3))
        except (UnsupportedSchema, ValueError) as exc:
            conn.send((i, f"refused: {str(exc)[:80]}", None))
        except MemoryError:
            conn.send((i, "memory cap", None))
        old._cache.clear()


def old_path(tok, schemas: list) -> list[tuple[str, float | None]]:
    """(outcome, compile ms) per schema on the old path, each within OLD_TIMEOUT_S and
    OLD_MEMORY (a worker process per run of schemas)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out: list[tuple[str, float | None]] = []
    while len(out) < len(schemas):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_old_worker, args=(child, tok, schemas, len(out)))
        proc.start()
        child.close()
        while len(out) < len(schemas):
            if not parent.poll(OLD_TIMEOUT_S):
                out.append((f"over {OLD_TIMEOUT_S:g} s", None))
                break
            try:
                _, outcome, ms = parent.recv()
            except EOFError:  # died: the memory cap (Rust aborts on a failed allocation)
                out.append(("memory cap (killed)", None))
                break
            out.append((outcome, ms))
        proc.kill()
        proc.join()
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    from benchmarks.old_schema_regex import schema_to_regex
    from benchmarks.outlines_guided import GuidedDecoder as OldDecoder
    from raydock.serve_apps import guided

    tok = big_tokenizer()
    docs = [json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("**/*.json"))]
    old_results = old_path(tok, [d["schema"] for d in docs])
    old_ms = [ms for _, ms in old_results if ms is not None]
    old_ok = len(old_ms)
    old = OldDecoder(tok, tok.eos_token_id, len(tok))
    new = guided.GuidedDecoder(tok, {tok.eos_token_id}, len(tok))
    new_ok, new_ms, new_refused = 0, [], []
    for d in docs:
        t0 = time.perf_counter()
        try:
            g = guided.grammar_of("grammar", guided.json_grammar(d["schema"]))
            new._build(g)  # uncached
            new_ok += 1
            new_ms.append((time.perf_counter() - t0) * 1e3)
        except (guided.UnsupportedSchema, ValueError) as exc:
            new_refused.append(f"{d['name']}: {str(exc)[:100]}")

    # mask time per token along a valid output, batch 1 and 16
    text = json.dumps(
        {"name": "Ada", "age": 36, "email": "a@b.co", "status": "active", "score": 0.5},
        separators=(",", ":"),
    )
    ids = tok.encode(text, add_special_tokens=False)
    regex = schema_to_regex(FIVE_FIELDS)
    grammar = guided.grammar_of("grammar", guided.json_grammar(FIVE_FIELDS))
    import asyncio

    import torch

    mask_rows = []
    for batch in (1, 16):
        guides = [asyncio.run(old.guide(regex)) for _ in range(batch)]
        logits = torch.zeros(batch, len(tok))
        t0 = time.perf_counter()
        for t in ids:
            old.apply(logits, guides)
            for g in guides:
                g.advance(t, return_tokens=False)
        old_t = (time.perf_counter() - t0) * 1e6 / len(ids)
        ms = [asyncio.run(new.matcher(grammar)) for _ in range(batch)]
        t0 = time.perf_counter()
        for t in ids:
            new.apply(logits, ms)
            for m in ms:
                m.advance(t)
        new_t = (time.perf_counter() - t0) * 1e6 / len(ids)
        mask_rows.append({"batch": batch, "old_us_per_step": old_t, "new_us_per_step": new_t})

    hostile = []
    for schema, _ in HOSTILE_SCHEMAS:
        before, t0 = rss_mb(), time.perf_counter()
        try:
            new._build(guided.grammar_of("grammar", guided.json_grammar(schema)))
            outcome = "compiled (lazy)"
        except guided.UnsupportedSchema as exc:
            outcome = f"400: {exc}"
        hostile.append(
            [json.dumps(schema), outcome, (time.perf_counter() - t0) * 1e3, rss_mb() - before]
        )
    before, t0 = rss_mb(), time.perf_counter()
    new._build(guided.grammar_of("regex", HOSTILE_REGEX))
    hostile.append(
        [HOSTILE_REGEX, "compiled (lazy)", (time.perf_counter() - t0) * 1e3, rss_mb() - before]
    )
    result = {
        "machine": machine(),
        "vocab": len(tok),
        "schemas": len(docs),
        "coverage": {"old": old_ok, "new": new_ok},
        "compile_ms": {
            "old": {"p50": statistics.median(old_ms), "p99": _pct(old_ms, 0.99)},
            "new": {"p50": statistics.median(new_ms), "p99": _pct(new_ms, 0.99)},
        },
        "mask": mask_rows,
        "hostile": hostile,
        "old_failures": {
            d["name"]: o for d, (o, ms) in zip(docs, old_results, strict=True) if ms is None
        },
        "new_refused": new_refused,
    }
    n = len(docs)
    md = [
        f"Machine: {machine()}; vocabulary {len(tok)}; {n} schemas (tests/schemas, incl. refused)",
        "",
        "| path | coverage | compile p50 ms | compile p99 ms |",
        "|---|---|---|---|",
        f"| old (regex + outlines DFA) | {old_ok}/{n} | {statistics.median(old_ms):.1f} "
        f"| {_pct(old_ms, 0.99):.1f} |",
        f"| new (llguidance) | {new_ok}/{n} | {statistics.median(new_ms):.2f} "
        f"| {_pct(new_ms, 0.99):.2f} |",
        "",
        "| batch | old µs/step (mask+advance, all rows) | new µs/step |",
        "|---|---|---|",
        *[
            f"| {r['batch']} | {r['old_us_per_step']:.0f} | {r['new_us_per_step']:.0f} |"
            for r in mask_rows
        ],
        "",
        "| hostile (new path) | outcome | ms | RSS growth MiB |",
        "|---|---|---|---|",
        *[f"| `{h[0]}` | {h[1]} | {h[2]:.1f} | {h[3]:.0f} |" for h in hostile],
    ]
    save("guided_corpus", result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
