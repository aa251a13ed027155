"""Serve submissions from the lifecycle's worker threads go one at a time.

Serve builds an app's config by registering its autoscaling policy's module for pickling by
value and unregistering it after, process-wide (`ray.serve.config.AutoscalingConfig
.serialize_policy`); two deploys submitted at once in threads could fail one with "<module …>
is not registered for pickle by value" (a deploy seen FAILED in CI). Ray's own registration is
what races; Serve's cluster side is left out (`serve.run_many` stands in for it here).
"""

from __future__ import annotations

import threading
import time

from ray import cloudpickle, serve

from raydock.platform import lifecycle


def test_concurrent_deploys_submit_one_at_a_time(monkeypatch):
    errors: list[Exception] = []

    def run_many(targets, **_):  # what Serve's config building does, with its window widened
        import ray.serve.autoscaling_policy as module

        try:
            cloudpickle.register_pickle_by_value(module)
            time.sleep(0.05)
            cloudpickle.unregister_pickle_by_value(module)
        except ValueError as exc:
            errors.append(exc)

    monkeypatch.setattr(serve, "run_many", run_many)
    threads = [threading.Thread(target=lifecycle.submit_app, args=(None,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
