"""One Serve application per deployment: autoscaled engine replicas.

`build_engine_app` maps a deployment's stored config onto Serve options (the parameter
semantics of the design live here); `EngineServer` is the replica.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application


class PromptTooLong(ValueError):
    pass


@serve.deployment(name="engine")
class EngineServer:
    def __init__(self, spec: dict[str, Any]):
        from raydock.serve_apps.engines.transformers_engine import TransformersEngine

        self.spec = spec
        self.engine = TransformersEngine(
            spec["model_dir"],
            device=spec["device"],
            num_threads=spec.get("num_threads"),
            max_batch_size=spec["max_batch_size"],
        )

    def stats(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "maxContext": self.engine.max_context,
            **self.engine.stats(),
        }

    def _prompt(self, request: dict[str, Any]) -> list[int]:
        if "messages" in request:
            ids = self.engine.chat_prompt(request["messages"])
        else:
            ids = self.engine.text_prompt(request["prompt"])
        if len(ids) >= self.engine.max_context:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; this model's context is "
                f"{self.engine.max_context} tokens"
            )
        return ids

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream step events (dicts with an `index`) for the request's `n` sequences."""
        from raydock.serve_apps.sampling import SamplingParams

        try:
            ids = self._prompt(request)
        except PromptTooLong as exc:
            yield {"error": str(exc), "param": "messages" if "messages" in request else "prompt"}
            return
        params = request["params"]
        n = request.get("n", 1)
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int) -> None:
            p = dict(params)
            if p.get("seed") is not None:
                p["seed"] = p["seed"] + index
            try:
                async for ev in self.engine.generate(ids, SamplingParams(**p)):
                    await queue.put({"index": index, **ev.to_dict()})
            finally:
                await queue.put({"index": index, "done": True})

        tasks = [asyncio.create_task(run(i)) for i in range(n)]
        try:
            remaining = n
            while remaining:
                ev = await queue.get()
                if ev.get("done"):
                    remaining -= 1
                    continue
                yield ev
            for t in tasks:
                t.result()  # surface engine errors
        finally:
            for t in tasks:  # client gone (or error): stop decoding at once
                t.cancel()


def serve_options(config: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """Serve deployment options from a deploy body and a hardware profile."""
    scaling = config["scalingParameters"]
    batch = scaling["maxBatchSize"]
    actor: dict[str, Any] = {"num_cpus": profile.get("num_cpus", 1)}
    if profile.get("num_gpus"):
        actor["num_gpus"] = profile["num_gpus"]
        if profile.get("accelerator_type"):
            actor["accelerator_type"] = profile["accelerator_type"]
    if profile.get("memory_gb"):
        actor["memory"] = int(profile["memory_gb"] * 2**30)
    return {
        "ray_actor_options": actor,
        # a replica runs at most maxBatchSize sequences; more wait in the router's queue
        "max_ongoing_requests": batch,
        # beyond this the gateway answers 429 instead of queueing without bound
        "max_queued_requests": max(8, 4 * batch * scaling["maxReplicas"]),
        "autoscaling_config": {
            "min_replicas": scaling["minReplicas"],
            "initial_replicas": scaling["minReplicas"],
            "max_replicas": scaling["maxReplicas"],
            # scale when replicas run ~3/4 full: load, not a timer, drives the replica count
            "target_ongoing_requests": max(1, math.ceil(0.75 * batch)),
            "upscale_delay_s": scaling["scaleUpDelay"],
            "downscale_delay_s": scaling["scaleDownDelay"],
            # a short window so the delays above, not the averaging, decide reaction time
            "look_back_period_s": 5,
            "metrics_interval_s": 1,
        },
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 5,
    }


def build_engine_app(
    model_dir: str, config: dict[str, Any], profile: dict[str, Any]
) -> Application:
    spec = {
        "model_dir": model_dir,
        "max_batch_size": config["scalingParameters"]["maxBatchSize"],
        "device": profile.get("device", "cpu"),
        "num_threads": int(profile.get("num_cpus", 1)) if profile.get("device") == "cpu" else None,
    }
    return EngineServer.options(**serve_options(config, profile)).bind(spec)
