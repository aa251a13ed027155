"""Totals as Prometheus' text format (prometheus-client renders it)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from raydock.metering import catalog
from raydock.metering.batch import Batch

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Totals:
    def __init__(self, totals: Batch):
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        # each metric's series, sorted once (a pass over every series per metric cost a
        # scrape 100 ms at a few thousand series)
        by_metric: dict[str, list] = {}
        for kind in (self.totals.counters, self.totals.gauges, self.totals.histograms):
            for (name, labels), value in sorted(kind.items()):
                by_metric.setdefault(name, []).append((labels, value))
        for metric in catalog.ALL:
            series = by_metric.get(metric.name, [])
            if metric.kind == "counter":
                family = CounterMetricFamily(
                    metric.name.removesuffix("_total"), metric.help, labels=metric.labels
                )
                for labels, value in series:
                    family.add_metric(labels, value)
            elif metric.kind == "gauge":
                family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
                for labels, value in series:
                    family.add_metric(labels, value)
            else:
                family = HistogramMetricFamily(metric.name, metric.help, labels=metric.labels)
                for labels, hist in series:
                    family.add_metric(labels, _cumulative(metric, hist), hist[-2])
            yield family


def _cumulative(metric: catalog.Metric, hist: list[float]) -> list[tuple[str, float]]:
    out, running = [], 0.0
    for bound, count in zip((*metric.buckets, float("inf")), hist[:-2], strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


def render(totals: Batch) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Totals(totals))
    return generate_latest(registry)
