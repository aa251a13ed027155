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
from benchmarks.serving import OUT, machine
from tests.guided_checks import HOSTILE_REGEX, HOSTILE_SCHEMAS, SCHEMAS, rss_mb


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    from benchmarks.old_schema_regex import UnsupportedSchema, schema_to_regex
    from benchmarks.outlines_guided import GuidedDecoder as OldDecoder
    from raydock.serve_apps import guided

    tok = big_tokenizer()
    docs = [json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("**/*.json"))]
    old, new = OldDecoder(tok, tok.eos_token_id, len(tok)), None
    new = guided.GuidedDecoder(tok, {tok.eos_token_id}, len(tok))
    old_ok, new_ok, old_ms, new_ms = 0, 0, [], []
    for d in docs:
        t0 = time.perf_counter()
        try:
            old.index(schema_to_regex(d["schema"]))
            old_ok += 1
            old_ms.append((time.perf_counter() - t0) * 1e3)
        except (UnsupportedSchema, ValueError):
            pass
        t0 = time.perf_counter()
        try:
            g = guided.grammar_of("grammar", guided.json_grammar(d["schema"]))
            new._build(g)  # uncached
            new_ok += 1
            new_ms.append((time.perf_counter() - t0) * 1e3)
        except (guided.UnsupportedSchema, ValueError):
            pass

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
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "guided_corpus.json").write_text(json.dumps(result, indent=2))
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
    text = "\n".join(md) + "\n"
    (OUT / "guided_corpus.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
