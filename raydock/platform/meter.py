"""The meter: one actor that adds up what every serving process measured.

Replicas and gateways report a `Batch` twice a second (serve_apps/metering.py); the meter
keeps the running totals that `/metrics` renders, writes usage to the database through the
registry every few seconds (a restart loses at most that much), and decides every key's rate
limits and daily budget for all replicas and nodes at once (metering/limits.py). A key that
crosses 80 % or 100 % of its budget notifies its owner once a day.

Like the other platform actors it keeps nothing that matters only in memory for long: a new
meter (the supervisor starts one) reloads today's token counts from the stored usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import ray

from raydock import names
from raydock.metering import catalog as M
from raydock.metering.batch import Batch, Series
from raydock.metering.exposition import render
from raydock.metering.history import History
from raydock.metering.limits import DAY_S, Limiter, budget_reached, day_of
from raydock.platform import notify

log = logging.getLogger("raydock.meter")

#: usage reaches the database this often
USAGE_FLUSH_S = 2.0
#: a process's gauges count this long after its last report (then it is gone)
GAUGE_TTL_S = 5.0
#: how long /metrics waits for Serve's replica counts
SERVE_DETAILS_TIMEOUT_S = 5.0
#: a scrape within this long of the last one gets its text: every scrape asked Serve's
#: controller and rendered every series on the loop that also answers the replicas' admits
EXPOSITION_TTL_S = 0.5
#: how long a replica's own series outlive it (a scrape or two sees its last counts)
REPLICA_SERIES_GRACE_S = 300.0


class Meter:
    def __init__(self) -> None:
        self.totals = Batch()  # counters and histograms since this meter started
        self.gauges: dict[str, tuple[float, dict[Series, float]]] = {}  # source -> (at, values)
        self.unsaved = Batch()  # usage not yet in the database
        self.limiter = Limiter()
        self.budgets: dict[str, int] = {}  # key -> tokensPerDay, as the replicas last admitted
        self.keys_deployment: dict[str, str] = {}
        self.changed_budgets: set[str] = set()  # keys whose budget a report changed
        self.notified: set[tuple] = set()  # (key, day, "warning"|"exhausted", budget)
        self.history = History()  # the last hour, for the dashboard's Metrics tab
        self._started: asyncio.Task | None = None
        # set once today's stored usage is in the limiter: what is saved before would count twice
        self._day_loaded = asyncio.Event()
        self._exposition: tuple[float, bytes] = (-1e9, b"")  # (when, text) of the last one
        self._exposing = asyncio.Lock()  # scrapes at once share one rendering
        self._replicas_seen: dict[str, float] = {}  # replica id -> when Serve last listed it

    def _registry(self):
        return ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)

    def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        await self._load_today()
        asyncio.get_running_loop().create_task(self._record_history())
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)
            await self.flush_usage()

    async def _load_today(self) -> None:
        """Today's stored usage into the limiter, added to what was charged since the start."""
        now = time.time()
        try:
            start = datetime.fromtimestamp(day_of(now) * DAY_S, UTC).replace(tzinfo=None)
            used = await self._registry().tokens_since.remote(start)
            for key, tokens in used.items():
                self.limiter.load_day(key, day_of(now), tokens)
        except Exception as exc:  # no registry yet: budgets count from now
            log.warning("today's usage not loaded: %r", exc)
        self._day_loaded.set()

    async def _record_history(self) -> None:
        while True:
            try:
                counts, live = await _replicas()
                self._forget_gone_replicas(live)
                self.history.record(time.time(), self.totals, counts)
            except Exception as exc:  # never let one bad snapshot end the hour's record
                log.warning("metrics history: %r", exc)
            await asyncio.sleep(self.history.interval_s)

    async def series(self, deployment: str) -> dict:
        """The last hour of one deployment's figures (metering/history.py)."""
        self._start()
        return {
            "intervalSeconds": self.history.interval_s,
            "points": self.history.series(deployment, time.time(), self.totals),
        }

    async def ping(self) -> bool:
        self._start()
        return True

    # ------------------------------------------------------------ reports

    async def report(self, source: str, batch: Batch) -> None:
        self._start()
        self.totals.merge(Batch(counters=batch.counters, histograms=batch.histograms))
        if batch.gauges:
            self.gauges[source] = (time.monotonic(), batch.gauges)
        for key, budget in batch.budgets.items():  # before the charges: a removed budget
            if key in self.budgets and self.budgets[key] != budget:  # notifies no more, a
                self.changed_budgets.add(key)  # changed one tells where usage stands now
            if budget:
                self.budgets[key] = budget
            else:
                self.budgets.pop(key, None)
        if batch.usage:
            self.unsaved.merge(Batch(usage=batch.usage))
            for (_, dep, _, key), (_, prompt, completion) in batch.usage.items():
                self._charge(key, dep, prompt + completion)

    def _charge(self, key: str, deployment: str, tokens: int) -> None:
        before, after = self.limiter.charge(key, tokens)
        budget = self.budgets.get(key)
        reached = budget_reached(after, budget)
        # a threshold this charge crossed; after a budget change, one it stands past (a
        # restarted meter, which forgot what it told, only tells what is crossed anew)
        changed = key in self.changed_budgets
        self.changed_budgets.discard(key)
        if not changed and budget_reached(before, budget) == reached:
            return
        told = (key, day_of(time.time()), reached, budget)
        if reached is None or told in self.notified:
            return
        self.notified = {t for t in self.notified if t[1] == told[1]} | {told}  # today's
        notify.emit(
            "key.budget_warning" if reached == "warning" else "key.budget_exhausted",
            None,
            keyId=key,
            deploymentId=deployment,
            limit=budget,
            used=after,
        )

    async def jobs_ended(self, ended: list[tuple[str, str, float]]) -> None:
        for action, status, seconds in ended:
            self.totals.inc(M.JOBS, (action, status))
            self.totals.observe(M.JOB_DURATION, (action, status), seconds)

    # ------------------------------------------------------------ limits

    async def admit(self, key: str, deployment: str, limits: dict[str, int]) -> dict | None:
        """None (the request is counted), or the refusal: {limit, message, retryAfter}."""
        self._start()
        self.keys_deployment[key] = deployment
        refusal = self.limiter.admit(key, limits)
        if refusal is None:
            return None
        return {
            "limit": refusal.limit,
            "message": refusal.message,
            "retryAfter": refusal.retry_after_s,
        }

    # ------------------------------------------------------------ outputs

    async def flush_usage(self) -> None:
        if not self.unsaved.usage:
            return
        await self._day_loaded.wait()
        batch, self.unsaved = self.unsaved, Batch()
        rows = [(*key, *row) for key, row in sorted(batch.usage.items())]
        try:
            await self._registry().record_usage.remote(rows)
        except Exception as exc:  # the registry restarting: with the next flush
            log.warning("usage not saved yet: %r", exc)
            batch.merge(self.unsaved)
            self.unsaved = batch

    async def exposition(self) -> bytes:
        """Everything in Prometheus' text format (the same text for EXPOSITION_TTL_S)."""
        self._start()
        async with self._exposing:
            at, text = self._exposition
            if time.monotonic() - at >= EXPOSITION_TTL_S:
                view = await self._view()
                # rendered off the loop: admits go on meanwhile (the view is a copy)
                text = await asyncio.to_thread(render, view)
                self._exposition = (time.monotonic(), text)
            return text

    async def _view(self) -> Batch:
        counts, live = await _replicas()
        self._forget_gone_replicas(live)
        # copies: reports merge into the totals while the view renders in a thread
        histograms = {series: list(h) for series, h in self.totals.histograms.items()}
        view = Batch(counters=dict(self.totals.counters), histograms=histograms)
        now = time.monotonic()
        for source, (at, values) in list(self.gauges.items()):
            if now - at > GAUGE_TTL_S:
                del self.gauges[source]
                continue
            for series, value in values.items():
                view.gauges[series] = view.gauges.get(series, 0) + value
        for deployment, figures in counts.items():
            view.set(M.REPLICAS, (deployment,), figures["current"])
            view.set(M.REPLICAS_TARGET, (deployment,), figures["target"])
        return view

    def _forget_gone_replicas(self, live: set[str] | None) -> None:
        """Drop the per-replica series of replicas Serve has not listed for
        REPLICA_SERIES_GRACE_S: every replica an autoscaled deployment ever ran kept series of
        its own, exported for ever (`live` None: Serve did not answer, nothing is dropped)."""
        if live is None:
            return
        now = time.monotonic()
        self._replicas_seen.update(dict.fromkeys(live, now))
        for series in [s for s in self.totals.counters if s[0] in _REPLICA_LABEL]:
            replica = series[1][_REPLICA_LABEL[series[0]]]
            if now - self._replicas_seen.setdefault(replica, now) > REPLICA_SERIES_GRACE_S:
                del self.totals.counters[series]
        self._replicas_seen = {
            r: at for r, at in self._replicas_seen.items() if now - at <= REPLICA_SERIES_GRACE_S
        }


#: the counters labelled by replica, and where the replica is among their labels
_REPLICA_LABEL = {m.name: m.labels.index("replica") for m in M.ALL if "replica" in m.labels}


async def _replicas() -> tuple[dict[str, dict[str, int]], set[str] | None]:
    """Each deployment's running and target replicas, and the ids of every replica Serve
    lists (None, with no figures, when its controller does not answer)."""
    from raydock.platform.lifecycle import replica_view, serve_details

    try:
        details = await asyncio.wait_for(serve_details(), SERVE_DETAILS_TIMEOUT_S)
    except Exception as exc:  # Serve's controller restarting: no replica figures this time
        log.warning("replica counts unavailable: %r", exc)
        return {}, None
    apps = details.get("applications") or {}
    counts = {
        name: replica_view(app)
        for name, app in apps.items()
        if name not in (names.API_APP, names.GATEWAY_APP)
    }
    live = {
        replica["replica_id"]
        for app in apps.values()
        for deployment in (app.get("deployments") or {}).values()
        for replica in deployment.get("replicas", [])
    }
    return counts, live
