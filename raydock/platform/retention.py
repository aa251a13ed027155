"""Retention: usage minutes, finished notification deliveries and finished dock-status jobs
older than the settings allow (`usage_retention_days`, `delivery_retention_days`,
`job_retention_days`; 0 keeps them) are deleted hourly, and with an export job the zip it
made (a full copy of the model's weights that its download link no longer reaches); and every
round, the files of models that are gone (a delete whose store call failed left them).

The API replica runs `keep_pruning`; deleting is idempotent, so two replicas doing it is
harmless, and a round that fails (the registry restarting) is simply the next one's work.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from raydock.config import Settings
from raydock.platform import db
from raydock.platform.api_deps import ctx
from raydock.platform.jobs import exports_key, model_key

log = logging.getLogger("raydock.retention")

RETENTION_INTERVAL_S = 3600.0
RETRY_S = 60.0  # after a round that failed
#: a model's delete whose files the store could not delete says so
FILES_LEFT = (
    "the store could not delete the model's files now: retention deletes its files and exports "
    "within the hour (conversions and merges made from it stay)"
)


def cutoffs(settings: Settings, now: datetime) -> dict[str, datetime | None]:
    """What is older than these goes, per kind of record (None keeps them all)."""

    def before(days: int) -> datetime | None:
        return now - timedelta(days=days) if days else None

    return {
        "usage": before(settings.usage_retention_days),
        "deliveries": before(settings.delivery_retention_days),
        "jobs": before(settings.job_retention_days),
    }


async def prune_once() -> dict[str, int]:
    """One round: deletes what the settings no longer keep; how many of each went."""
    before = cutoffs(ctx.settings, db.utcnow())
    gone = dict.fromkeys(before, 0)
    if any(before.values()):
        gone = await ctx.registry.prune_history.remote(before)
        gone["exports"] = await _sweep_exports()
    gone["deleted models' files"] = await _sweep_deleted_models()
    if any(gone.values()):
        log.info(
            "retention: deleted %s",
            ", ".join(
                f"{n} {kind}" + (f" before {before[kind]}" if kind in before else " of those jobs")
                for kind, n in gone.items()
                if n
            ),
        )
    return gone


async def _sweep_exports() -> int:
    """Delete the export zips (`exports/<model>/<job>/<file>`) whose job is gone."""
    store = ctx.settings.store()
    folders = {
        "/".join(parts[:3])
        for parts in (k.split("/") for k in await asyncio.to_thread(store.list, "exports"))
        if len(parts) > 3
    }
    kept = set(await ctx.registry.existing_jobs.remote([f.split("/")[2] for f in folders]))
    gone = [f for f in folders if f.split("/")[2] not in kept]
    for folder in gone:
        await asyncio.to_thread(store.delete, folder)
    return len(gone)


async def _sweep_deleted_models() -> int:
    """Delete what the store still holds (`models/<id>`, `exports/<id>`) of models that are
    gone: a model's delete removes its row first, and its files only after (a store that
    failed then left them for this)."""
    store = ctx.settings.store()
    ids: set[str] = set()
    for area in ("models", "exports"):
        keys = await asyncio.to_thread(store.list, area)
        ids |= {parts[1] for parts in (k.split("/") for k in keys) if len(parts) > 2}
    if not ids:
        return 0
    kept = set(await ctx.registry.existing_models.remote(sorted(ids)))
    gone = sorted(ids - kept)
    for model_id in gone:
        for key in (model_key(model_id), exports_key(model_id)):
            await asyncio.to_thread(store.delete, key)
    return len(gone)


async def keep_pruning() -> None:
    while True:
        try:
            await prune_once()
            wait = RETENTION_INTERVAL_S
        except Exception as exc:  # the registry restarting: try again soon
            log.warning("pruning old usage and deliveries failed: %r", exc)
            wait = RETRY_S
        await asyncio.sleep(wait)
