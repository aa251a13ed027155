"""The last hour of each deployment's figures, for the dashboard's Metrics tab.

The meter records a snapshot of its running totals every `INTERVAL_S` into a bounded ring (one
hour); a deployment's series are the differences between consecutive snapshots: the requests
counted in each interval, requests, errors and tokens per second, TTFT p50/p95 of the
requests that arrived in between (from the histogram's buckets, as Prometheus'
`histogram_quantile` computes them), and the replica counts Serve reported. Nothing here is
stored: a new meter starts an empty hour.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from raydock.metering import catalog as M
from raydock.metering.batch import Batch

#: seconds between snapshots
INTERVAL_S = 10.0
#: how far back the series go
WINDOW_S = 3600.0


@dataclass
class Snapshot:
    """One deployment's cumulative figures at one moment."""

    requests: float = 0.0
    errors: float = 0.0  # answers with a 4xx/5xx status (429s included)
    tokens: float = 0.0
    ttft: list[float] = field(default_factory=list)  # per-bucket counts, last one +Inf
    replicas: int | None = None
    target: int | None = None


def _collect(totals: Batch, replicas: dict[str, dict[str, int]]) -> dict[str, Snapshot]:
    snaps: dict[str, Snapshot] = collections.defaultdict(Snapshot)
    for (name, labels), value in totals.counters.items():
        if name == M.REQUESTS.name:
            snap = snaps[labels[0]]
            snap.requests += value
            if labels[-1][:1] in ("4", "5"):
                snap.errors += value
        elif name in (M.PROMPT_TOKENS.name, M.COMPLETION_TOKENS.name):
            snaps[labels[0]].tokens += value
    for (name, labels), hist in totals.histograms.items():
        if name == M.TTFT.name:
            snap = snaps[labels[0]]
            counts = hist[:-2]  # an adapter's series adds to its deployment's
            if snap.ttft:
                snap.ttft = [a + b for a, b in zip(snap.ttft, counts, strict=True)]
            else:
                snap.ttft = list(counts)
    for deployment, counts in replicas.items():
        snaps[deployment].replicas = counts.get("current")
        snaps[deployment].target = counts.get("target")
    return dict(snaps)


def quantile(q: float, counts: list[float], bounds: tuple[float, ...]) -> float | None:
    """Prometheus' histogram_quantile over per-bucket (not cumulative) counts; None when the
    buckets are empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    lower = 0.0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        if seen + count >= rank and count > 0:
            if bound == float("inf"):
                return lower  # beyond the last finite bound
            return lower + (bound - lower) * ((rank - seen) / count)
        seen += count
        lower = bound
    return lower


class History:
    """A ring of (time, {deployment: Snapshot}), one hour long."""

    def __init__(self, interval_s: float = INTERVAL_S, window_s: float = WINDOW_S) -> None:
        self.interval_s = interval_s
        self.ring: collections.deque[tuple[float, dict[str, Snapshot]]] = collections.deque(
            maxlen=int(window_s / interval_s) + 1
        )

    def record(self, at: float, totals: Batch, replicas: dict[str, dict[str, int]]) -> None:
        self.ring.append((at, _collect(totals, replicas)))

    def series(
        self, deployment: str, now: float | None = None, totals: Batch | None = None
    ) -> list[dict[str, Any]]:
        """One point per interval: the requests counted in it (their sum is the window's
        requests, exactly), rates over it, TTFT quantiles of the requests in it (None without
        any), replica counts at its end (None when Serve had no app). With `now` and
        `totals`, a last point runs from the latest snapshot to now (the chart stays live
        between snapshots; its replica counts are the snapshot's)."""
        ring = list(self.ring)
        if now is not None and totals is not None and ring and now - ring[-1][0] >= 1.0:
            snaps = _collect(totals, {})
            for name, snap in ring[-1][1].items():
                snaps.setdefault(name, Snapshot()).replicas = snap.replicas
                snaps[name].target = snap.target
            ring.append((now, snaps))
        points = []
        for (t0, before), (t1, after) in zip(ring, ring[1:], strict=False):
            a, b = before.get(deployment, Snapshot()), after.get(deployment, Snapshot())
            dt = max(t1 - t0, 1e-9)
            requests = max(0.0, b.requests - a.requests)
            old = a.ttft or [0.0] * len(b.ttft)
            ttft = [max(0.0, x - y) for x, y in zip(b.ttft, old, strict=True)]
            points.append(
                {
                    "t": t1,
                    "requests": requests,
                    "requestsPerSecond": requests / dt,
                    "errorsPerSecond": max(0.0, b.errors - a.errors) / dt,
                    "tokensPerSecond": max(0.0, b.tokens - a.tokens) / dt,
                    "ttftP50": quantile(0.5, ttft, M.TTFT.buckets) if ttft else None,
                    "ttftP95": quantile(0.95, ttft, M.TTFT.buckets) if ttft else None,
                    "replicas": b.replicas,
                    "replicasTarget": b.target,
                }
            )
        return points
