"""What one process counted since it last reported: counters, histograms, gauges and usage,
and the daily budget of each key it admitted.

Batches are plain data (dicts of tuples and numbers) that travel to the meter actor and add
up there: counters and histograms by summing, gauges and budgets by replacing (gauges per
reporting replica).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from raydock.metering.catalog import Metric

Series = tuple[str, tuple[str, ...]]  # (metric name, label values in the metric's order)
#: (minute as epoch seconds, deployment id, adapter id or "", key id)
UsageKey = tuple[int, str, str, str]


def _series(metric: Metric, labels: tuple[str, ...]) -> Series:
    if len(labels) != len(metric.labels):
        raise ValueError(f"{metric.name} takes labels {metric.labels}, got {labels}")
    return metric.name, labels


@dataclass
class Batch:
    counters: dict[Series, float] = field(default_factory=dict)
    # per-bucket counts (the last one: +Inf), then the sum and the count
    histograms: dict[Series, list[float]] = field(default_factory=dict)
    gauges: dict[Series, float] = field(default_factory=dict)
    # [requests, prompt tokens, completion tokens]
    usage: dict[UsageKey, list[int]] = field(default_factory=dict)
    # key id -> its tokensPerDay (None: no budget) as of the key's last admission here
    budgets: dict[str, int | None] = field(default_factory=dict)

    def inc(self, metric: Metric, labels: tuple[str, ...], value: float = 1) -> None:
        key = _series(metric, labels)
        self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, metric: Metric, labels: tuple[str, ...], value: float) -> None:
        key = _series(metric, labels)
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = [0.0] * (len(metric.buckets) + 3)
        hist[bisect.bisect_left(metric.buckets, value)] += 1
        hist[-2] += value
        hist[-1] += 1

    def set(self, metric: Metric, labels: tuple[str, ...], value: float) -> None:
        self.gauges[_series(metric, labels)] = value

    def add_usage(self, key: UsageKey, requests: int, prompt: int, completion: int) -> None:
        row = self.usage.setdefault(key, [0, 0, 0])
        row[0] += requests
        row[1] += prompt
        row[2] += completion

    def merge(self, other: Batch) -> None:
        """Add `other` into this batch (its gauges replace this one's)."""
        for key, value in other.counters.items():
            self.counters[key] = self.counters.get(key, 0) + value
        for key, hist in other.histograms.items():
            mine = self.histograms.get(key)
            if mine is None:
                self.histograms[key] = list(hist)
            else:
                for i, v in enumerate(hist):
                    mine[i] += v
        self.gauges.update(other.gauges)
        for key, row in other.usage.items():
            self.add_usage(key, *row)
        self.budgets.update(other.budgets)

    def __bool__(self) -> bool:
        return bool(self.counters or self.histograms or self.gauges or self.usage or self.budgets)
