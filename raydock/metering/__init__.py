"""Metering: what raydock measures (metrics, usage per key) and limits (rate limits, budgets).

Replicas count what they serve into a `Batch` and send it to the meter actor twice a second
(`serve_apps/metering.py`); the meter (`platform/meter.py`) sums the batches of every replica
on every node, so `/metrics` shows one correct total per series, persists usage through the
registry, and decides rate limits for the whole deployment.
"""
