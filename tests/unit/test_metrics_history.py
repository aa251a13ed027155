"""The meter's last hour (metering/history.py): rates per interval, TTFT quantiles of the
requests in each interval as Prometheus computes them, replica counts, a bounded ring."""

from __future__ import annotations

import pytest

from raydock.metering import catalog as M
from raydock.metering.batch import Batch
from raydock.metering.history import History


def test_rates_quantiles_and_replicas_per_interval():
    totals = Batch()
    history = History(interval_s=10, window_s=3600)
    history.record(1000.0, totals, {"d1": {"current": 1, "target": 1}})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "200"), 18)
    totals.inc(M.REQUESTS, ("d1", "", "k1", "429"), 2)  # errors count as requests too
    totals.inc(M.REQUESTS, ("d2", "", "k9", "200"), 50)  # another deployment's
    totals.inc(M.COMPLETION_TOKENS, ("d1", "", "k1"), 300)
    totals.inc(M.PROMPT_TOKENS, ("d1", "", "k1"), 100)
    for value in [0.03] * 4 + [0.2] * 6:  # 4 in (0.025, 0.05], 6 in (0.1, 0.25]
        totals.observe(M.TTFT, ("d1", ""), value)
    history.record(1010.0, totals, {"d1": {"current": 2, "target": 3}})
    history.record(1020.0, totals, {"d1": {"current": 2, "target": 2}})

    first, second = history.series("d1")
    assert first["t"] == 1010.0
    assert first["requestsPerSecond"] == pytest.approx(2.0)
    assert first["errorsPerSecond"] == pytest.approx(0.2)
    assert first["tokensPerSecond"] == pytest.approx(40.0)
    assert first["ttftP50"] == pytest.approx(0.1 + 0.15 * (1 / 6))  # histogram_quantile
    assert first["ttftP95"] == pytest.approx(0.1 + 0.15 * (5.5 / 6))
    assert (first["replicas"], first["replicasTarget"]) == (2, 3)
    # nothing arrived in the second interval: zero rates, no TTFT (not 0)
    assert second["requestsPerSecond"] == 0 and second["ttftP50"] is None
    assert history.series("nobody")[0]["replicas"] is None


def test_a_live_last_point_and_an_hour_at_most():
    totals = Batch()
    history = History(interval_s=10, window_s=60)
    for i in range(20):
        history.record(i * 10.0, totals, {})
    assert len(history.series("d1")) == 6  # 7 snapshots: one hour's worth (here 60 s)
    totals.inc(M.REQUESTS, ("d1", "", "k", "200"), 5)
    points = history.series("d1", now=195.0, totals=totals)
    assert points[-1]["t"] == 195.0
    assert points[-1]["requestsPerSecond"] == pytest.approx(1.0)  # 5 in the last 5 s


def test_each_point_counts_its_requests_and_they_sum_to_the_window():
    """The dashboard's "Requests (last hour)" sums these counts: a rate times an assumed 10 s
    undercounted when the first interval was longer (27 shown for 28 served)."""
    totals = Batch()
    history = History(interval_s=10, window_s=3600)
    history.record(1000.0, totals, {})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "200"), 3)  # the first interval: 12.25 s
    history.record(1012.25, totals, {})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "200"), 24)
    totals.inc(M.REQUESTS, ("d1", "", "k1", "500"), 1)
    history.record(1022.25, totals, {})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "200"), 1)  # after the latest snapshot
    points = history.series("d1", now=1025.0, totals=totals)
    assert [p["requests"] for p in points] == [3, 25, 1]
    assert sum(p["requests"] for p in points) == 29
    assert points[0]["requestsPerSecond"] == pytest.approx(3 / 12.25)
