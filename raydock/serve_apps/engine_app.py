"""One Serve application per deployment: autoscaled engine replicas.

`build_engine_app` maps a deployment's stored config onto Serve options (the parameter
semantics of the design live here); `EngineServer` is the replica.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application

from raydock import errors
from raydock.errors import ApiError
from raydock.optimizers.plan import EnginePlan
from raydock.params import MAX_ADAPTER_RANK, MAX_LOADED_ADAPTERS
from raydock.serve_apps.metering import prompt_taken

log = logging.getLogger("raydock.engine_app")

engine_http = FastAPI(title="raydock engine replica", docs_url=None, openapi_url=None)


class _Ctx:
    server: Any
    auth: Any
    meter: Any
    deployment_id: str
    stream_interval_s: float
    max_request_bytes: int


ctx = _Ctx()


errors.install(engine_http, lambda: ctx.max_request_bytes)


async def _authorize(request: Request):
    """The request's deployment access and key id; a refusal is counted, then raised."""
    try:
        return await ctx.auth.authorize(request, ctx.deployment_id)
    except ApiError as exc:
        ctx.meter.refused(ctx.deployment_id, exc.status)
        raise


async def _serve(kind: str, request: Request, body_of=None):
    from raydock.serve_apps.openai_service import complete

    dep, key_id = await _authorize(request)
    return await complete(
        kind,
        request,
        dep,
        key_id,
        ctx.server.generate,
        ctx.meter,
        stream_interval_s=ctx.stream_interval_s,
        body_of=body_of,
    )


@engine_http.post("/v2/chat/completions")
async def chat(request: Request):
    return await _serve("chat", request)


@engine_http.post("/v1/completions")
async def completions(request: Request):
    return await _serve("completion", request)


@engine_http.post("/v1/responses")
async def responses(request: Request):
    """OpenAI's Responses API, answered on the chat path (serve_apps/responses_api.py)."""
    from raydock.serve_apps import responses_api

    return await responses_api.respond(
        lambda body_of: _serve("chat", request, body_of), errors.request_id(request)
    )


@engine_http.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request):
    """Always 404 after the key is checked: raydock stores no responses to retrieve."""
    from raydock.serve_apps import responses_api

    await _authorize(request)
    raise responses_api.not_stored(response_id)


def configure(server: Any, spec: dict[str, Any]) -> None:
    from raydock.serve_apps.access import Auth
    from raydock.serve_apps.metering import ReplicaMeter

    ctx.server = server
    ctx.meter = ReplicaMeter(
        spec["meter"], server.collect_metrics, enabled=spec["meter"] is not None
    )
    ctx.deployment_id = spec["deployment_id"]
    ctx.stream_interval_s = spec["stream_interval_s"]
    ctx.max_request_bytes = spec["max_request_bytes"]
    ctx.auth = Auth(
        spec["access_hub"],
        spec["registry"],
        spec["deployment_id"],
        {spec["deployment_id"]: spec["access"]},
    )


def asgi_app() -> FastAPI:
    return engine_http


# The replica answers `/deployments/{id}/…` itself (Serve's ingress routes there directly) and
# `generate` for the gateway's DeploymentHandle. Serve pickles this class by value, so it
# calls the module-level `configure` (pickled by reference) to set up the routes' context.
@serve.deployment(name="engine")
@serve.ingress(asgi_app)
class EngineServer:
    def __init__(self, spec: dict[str, Any]):
        self.engine = load_engine(spec)
        from raydock.serve_apps.chat_render import tag_tokens, thinks, tool_call_wrapper

        tokenizer = getattr(self.engine, "tokenizer", None)
        # the tool-call format the model's chat template teaches (None: bare JSON calls only)
        self.tool_call_wrapper = tool_call_wrapper(tokenizer)
        # the vocabulary's own `<think>`, `</think>` and call tags, which the model writes
        self.tag_tokens = tag_tokens(tokenizer)
        # whether the model may think before a call "required" or named
        self.thinks = thinks(tokenizer)
        self.engine_name = spec["engine"]
        self.deployment_id = spec["deployment_id"]
        self._guided_seen = (0, 0)  # guided cache hits and misses already reported
        self.queue_limit = spec["queue_limit"]
        self.requests = 0  # in flight in this replica, decoding or waiting for a slot
        self.taken = 0  # requests this replica took, reported per replica (routing)
        self._reported = {"taken": 0, "prefix_queries": 0, "prefix_hits": 0}
        self.replica = serve.get_replica_context().replica_id.unique_id
        # one thread: tokenizers are not shared between threads, and prompts stay in order
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        from raydock.serve_apps.adapters import ReplicaAdapters

        self.adapters = ReplicaAdapters(
            self.engine,
            self.engine_name,
            spec["artifact"],
            spec["max_loaded_adapters"],
            spec["max_adapter_rank"],
            merged_serving(spec),
        )
        configure(self, spec)

    def stats(self) -> dict[str, Any]:
        return {
            "engine": self.engine_name,
            "maxContext": self.engine.max_context,
            "queueLimit": self.queue_limit,
            "requests": self.requests,
            "replica": self.replica,
            "requestsTaken": self.taken,
            "adapterLoads": self.adapters.loads,
            **self.engine.stats(),
        }

    def collect_metrics(self, batch: Any) -> None:
        """Add this replica's gauges and guided-decoding counters to its metrics report."""
        from raydock.metering import catalog as M

        dep = (self.deployment_id,)
        stats = self.engine.stats()
        batch.set(M.RUNNING, dep, stats.get("running", 0))
        batch.set(M.QUEUE_DEPTH, dep, stats.get("waiting", 0))
        totals = {
            "taken": self.taken,
            "prefix_queries": stats.get("prefixCacheQueries", 0),
            "prefix_hits": stats.get("prefixCacheHits", 0),
        }
        per_replica = (self.deployment_id, self.replica)
        for name, metric in (
            ("taken", M.REPLICA_REQUESTS),
            ("prefix_queries", M.PREFIX_CACHE_QUERIES),
            ("prefix_hits", M.PREFIX_CACHE_HITS),
        ):
            if totals[name] != self._reported[name]:
                batch.inc(metric, per_replica, totals[name] - self._reported[name])
        self._reported = totals
        guided = getattr(self.engine, "guided", None)
        if guided is None:
            return
        hits, misses = guided.cache_hits, guided.cache_misses
        batch.inc(M.GUIDED_CACHE_HITS, dep, hits - self._guided_seen[0])
        batch.inc(M.GUIDED_CACHE_MISSES, dep, misses - self._guided_seen[1])
        self._guided_seen = (hits, misses)
        while guided.compile_seconds:  # popleft: compile threads may append meanwhile
            batch.observe(M.GUIDED_COMPILE, dep, guided.compile_seconds.popleft())

    async def _prompt(self, request: dict[str, Any]) -> tuple[list[int], bool]:
        """The request's prompt ids, tokenized off the event loop (a long prompt would stall
        every stream of this replica), and whether the rendered chat ends inside a thinking
        block its template opened; one that cannot fit is refused before any work."""
        from raydock.serve_apps.chat_render import ChatTemplateError, opens_thinking

        param = "messages" if "messages" in request else "prompt"
        if "messages" in request:  # what the template renders: contents, calls and tools

            def text(value: Any) -> int:
                return len(json.dumps(value, ensure_ascii=False)) if value else 0

            messages = request["messages"]
            chars = sum(len(m["content"]) + text(m.get("tool_calls")) for m in messages)
            chars += text(request.get("tools"))
        else:
            chars = len(request["prompt"])
        context = self.engine.max_context
        if chars > context * self.engine.longest_token_chars:
            raise ApiError(
                400,
                f"the prompt has {chars} characters, more than this model's context of "
                f"{context} tokens can hold",
                param,
                "context_length_exceeded",
            )

        def work() -> tuple[list[int], bool]:
            if "messages" not in request:
                return self.engine.text_prompt(request["prompt"]), False
            text, ids = self.engine.rendered_chat(request["messages"], request.get("tools"))
            return ids, opens_thinking(text)

        try:
            ids, thinking = await asyncio.get_running_loop().run_in_executor(self.tokenizing, work)
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), "messages", "invalid_messages") from None
        if not ids:  # a tokenizer that adds no BOS token makes "" no ids: nothing to decode
            raise ApiError(400, f"the {param} is empty: there is nothing to continue", param)
        if len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {context} tokens",
                param,
                "context_length_exceeded",
            )
        return ids, thinking

    def _check_params(self, params: dict[str, Any]) -> None:
        """Refuse (400) what the request asks that this engine or model cannot do."""
        from raydock.serve_apps.sampling import DEFAULTS

        for name in sorted(self.engine.unsupported_params):
            if params.get(name, DEFAULTS[name]) != DEFAULTS[name]:
                raise ApiError(
                    400,
                    f"{name} is not supported by this deployment's {self.engine_name} engine; "
                    "deploy the model without optimization or with vLLM to use it",
                    name,
                    "unsupported_parameter",
                )
        vocab = self.engine.vocab_size
        for token, _ in params.get("logit_bias", ()):
            if token >= vocab:
                raise ApiError(
                    400,
                    f"logit_bias names token {token}; this model's token ids are 0–{vocab - 1}",
                    f"logit_bias.{token}",
                    "unsupported_parameter",
                )

    async def _check_constraint(self, request: dict[str, Any]) -> None:
        """Refuse (400) an output format the engine cannot enforce, before any token."""
        from raydock.serve_apps.engines.base import ConstraintError

        param = request.get("constraint_param")
        try:
            if request.get("grammar") is not None:  # every engine compiles with llguidance
                await self.engine.check_grammar(request["grammar"])
            elif request.get("regex") is not None:
                await self.engine.check_regex(request["regex"])
        except ConstraintError as exc:
            raise ApiError(
                400, f"{param} cannot be enforced: {exc}", param, "unsupported_schema"
            ) from None

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """Stream step events (dicts with an `index`) for the request's `n` sequences.

        Events that are ready together travel as one list: a reader that fell behind catches
        up in one message instead of one per token. Refusals come as one error event. When
        the engine admits the prompt into a batch (its prefill begins), `metering.prompt_taken`
        comes: the request's meter charges the prompt from then on, not while it waits for a
        slot, and drops that batch.
        """
        if self.requests >= self.engine.max_batch_size + self.queue_limit:
            yield [
                _error_event(
                    ApiError(
                        429,
                        "the deployment's request queue is full; retry later",
                        None,
                        "queue_full",
                    )
                )
            ]
            return
        self.requests += 1
        self.taken += 1
        try:
            async for batch in self._generate(request):
                yield batch
        finally:
            self.requests -= 1

    async def _generate(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        from raydock.serve_apps.sampling import SamplingParams
        from raydock.serve_apps.structured import IN_THINKING, THINKS

        options: dict[str, Any] = {}  # the engine's keyword arguments: grammar, adapter
        params = request["params"]
        try:
            ids, opens_thinking = await self._prompt(request)
            if request.get("native_tool_calls"):
                request = native_tool_grammar(
                    request, self.tool_call_wrapper, opens_thinking, self.tag_tokens, self.thinks
                )
            self._check_params(params)
            await self._check_constraint(request)
            engine = self.engine
            if request.get("adapter"):
                engine, adapter_options = await self.adapters.ensure(request["adapter"])
                options.update(adapter_options)
        except ApiError as exc:
            yield [_error_event(exc)]
            return
        n = request.get("n", 1)
        # an empty list from the engine: admitted into a batch, the prompt's work begins
        options["announce_admission"] = True
        if request.get("grammar"):
            options["grammar"] = request["grammar"]
        regex = request.get("regex")
        # the service reads an output that starts inside the thinking as such: under a tools
        # grammar fitted to it, or free (a grammar of another format has the answer at once)
        free = not request.get("grammar") and request.get("regex") is None
        starts_in_thinking = request.get(IN_THINKING) or (opens_thinking and free)
        mark = {IN_THINKING: True} if starts_in_thinking else {THINKS: True} if self.thinks else {}

        def sampling(index: int) -> SamplingParams:
            p = dict(params)
            if p.get("seed") is not None:
                p["seed"] = p["seed"] + index  # n choices from one seed, yet distinct
            return SamplingParams(**p)

        if n == 1:
            async for steps in engine.generate(ids, sampling(0), regex, **options):
                if not steps:
                    yield prompt_taken(len(ids))
                    continue
                yield [{"index": 0, **ev.to_dict(), **mark} for ev in steps]
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int) -> None:
            try:
                async for steps in engine.generate(ids, sampling(index), regex, **options):
                    if not steps:
                        queue.put_nowait({"index": index, "admitted": True})
                    for ev in steps:
                        queue.put_nowait({"index": index, **ev.to_dict(), **mark})
            finally:
                queue.put_nowait({"index": index, "done": True})

        tasks = [asyncio.create_task(run(i)) for i in range(n)]
        announced = False  # the prompt is charged once, at the first choice that joins a batch
        try:
            remaining = n
            while remaining:
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                if not announced and any(ev.get("admitted") for ev in ready):
                    announced = True
                    yield prompt_taken(len(ids))
                events = [ev for ev in ready if not ev.get("done") and not ev.get("admitted")]
                remaining -= sum(bool(ev.get("done")) for ev in ready)
                if events:
                    yield events
            for t in tasks:
                t.result()  # surface engine errors
        finally:
            for t in tasks:  # client gone (or error): stop decoding at once
                t.cancel()


def native_tool_grammar(
    request: dict[str, Any],
    wrapper: Any,
    opens_thinking: bool = False,
    tags: Any = None,
    thinks: bool = False,
) -> dict[str, Any]:
    """The request with its tools grammar (any tool_choice) fitted to the model: also taking up
    to `native_tool_calls` calls in the template's own `wrapper` (a `ToolCallWrapper`; None:
    bare calls only), the tags as the vocabulary's own tokens where `tags` (a `TagTokens`) has
    them, with or without a wrapper; where the model `thinks` (`chat_render.thinks`), a
    thinking block before a call "required" or named (auto's takes one on every model); and,
    where the rendered prompt `opens_thinking`, starting inside that thinking block (a call
    comes after it); such a request is marked `structured.IN_THINKING`, which its events
    carry to the service. The API replica that built the grammar does not know the model, so
    it asks for a "required" or named call at once, and every engine gets the same grammar
    from here."""
    from raydock.serve_apps.guided.grammars import (
        TagTokens,
        starting_in_thinking,
        with_native_calls,
    )
    from raydock.serve_apps.structured import IN_THINKING

    tags = tags or TagTokens()
    thinks = thinks or opens_thinking  # a block the template opened is thinking all the same
    fitted = wrapper is not None or thinks or tags != TagTokens()
    if not fitted or not request.get("grammar"):
        return request
    try:
        grammar = with_native_calls(
            request["grammar"], wrapper, request["native_tool_calls"], tags, thinks
        )
        if opens_thinking:
            grammar = starting_in_thinking(grammar)
    except ValueError as exc:  # an API replica of another version: bare calls, as it asked
        log.warning("tool grammar kept as the API replica sent it: %s", exc)
        return request
    return request | {"grammar": grammar, IN_THINKING: opens_thinking}


def _error_event(exc: ApiError) -> dict[str, Any]:
    """A refusal as the replica's stream carries it (the service turns it into HTTP)."""
    return {"error": exc.message, "status": exc.status, "param": exc.param, "code": exc.code}


def queue_limit(batch: int) -> int:
    """Requests a replica holds waiting for a batch slot before it answers 429."""
    return max(8, 4 * batch)


def serve_options(
    config: dict[str, Any], profile: dict[str, Any], engine: str = "transformers"
) -> dict[str, Any]:
    """Serve deployment options from a deploy body and a hardware profile; a replica whose
    engine spans several devices reserves them as one placement group (optimizers.parallel:
    each replica Serve adds is a whole group)."""
    from raydock.optimizers.parallel import actor_and_placement, parallelism

    scaling = config["scalingParameters"]
    batch = scaling["maxBatchSize"]
    actor, placement = actor_and_placement(profile, parallelism(engine, profile))
    return {
        "ray_actor_options": actor,
        **placement,
        # maxBatchSize sequences decode, up to queue_limit wait in the engine; the replica
        # itself refuses the next one with an OpenAI-shaped 429
        "max_ongoing_requests": batch + queue_limit(batch) + 1,
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


def prefix_routing(config: dict[str, Any], engine: str) -> dict[str, Any] | None:
    """The prefix-cache-aware router's arguments for a deployment, or None when it routes as
    Serve does: only where it can have more than one replica, and by default only for vLLM,
    the engine that caches prefixes (routingParameters.prefixCacheAffinity decides)."""
    scaling = config["scalingParameters"]
    routing = config.get("routingParameters") or {}
    on = routing.get("prefixCacheAffinity")
    if on is None:
        on = engine == "vllm"
    if not on or scaling["maxReplicas"] < 2:
        return None
    threshold = routing.get("imbalanceThreshold")
    if threshold is None:
        threshold = max(1, scaling["maxBatchSize"] // 2)
    return {"imbalance_threshold": threshold}


def loaded_adapters(config: dict[str, Any], engine: str) -> int:
    """Adapters a replica keeps loaded (adapterParameters.maxLoadedAdapters). Unset (or a
    deployment made before adapter serving): the default, except on vLLM, where LoRA support
    slows every step, adapter or not (small model, CPU: c16 out tok/s 408 with it, 588
    without; benchmarks/RESULTS.md), so it is on only when asked for."""
    value = (config.get("adapterParameters") or {}).get("maxLoadedAdapters")
    if value is None:
        return 0 if engine == "vllm" else MAX_LOADED_ADAPTERS.default
    return value


def parallel_args(engine: str, profile: dict[str, Any]) -> dict[str, Any]:
    """vLLM's tensor/pipeline parallel arguments for the profile's devices ({}: one)."""
    from raydock.optimizers.parallel import engine_args, parallelism

    return engine_args(parallelism(engine, profile), profile.get("device", "cpu"))


def engine_threads(engine: str, profile: dict[str, Any]) -> int | None:
    """CPU threads an engine computes with on a replica of `profile` (None: GPU, its own).

    CTranslate2 gets half the replica's CPUs: its per-token callback and the replica's event
    loop run beside its OpenMP threads, and on a 2-core machine one intra-op thread beat two
    at batch 1 and 16 (raw generate_batch, int8: 145 vs 115 and 710 vs 611 tokens/s).
    torch and vLLM use every CPU (2 threads: +43 % at batch 16 for torch).
    """
    if profile.get("device", "cpu") != "cpu":
        return None
    cpus = max(1, int(profile.get("num_cpus", 1)))
    return max(1, cpus // 2) if engine == "ctranslate2" else cpus


def fetch_model(artifact: dict[str, Any]) -> str:
    """The model's directory on this replica's node: fetched from the artifact store into the
    node's cache (once per node), its checksum verified. A missing or corrupted artifact
    raises ArtifactError, which fails the deploy with that reason."""
    from raydock.artifacts import ArtifactError, fetch_cached

    try:
        return str(fetch_cached(artifact, hold=True))  # not evicted while this replica lives
    except ArtifactError as exc:  # the deploy's failure reason: the last "…Error: …" line
        raise ArtifactError(f"the model artifact cannot be used: {exc}") from exc


def _common(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": spec["device"],
        "num_threads": spec.get("num_threads"),
        "max_batch_size": spec["max_batch_size"],
    }


def _ctranslate2_engine(spec: dict[str, Any], model_dir: str):
    from raydock.serve_apps.engines.ctranslate2_engine import CTranslate2Engine

    # no quantization ("") runs float32: the engine's own rule
    return CTranslate2Engine(model_dir, compute_type=spec["quantization"], **_common(spec))


def merged_serving(spec: dict[str, Any]):
    """How a CTranslate2 replica serves its base's adapters (no runtime LoRA there): each
    merged into the base and converted on first use; None for the other engines."""
    if spec["engine"] != "ctranslate2" or not spec.get("source_artifact"):
        return None
    from raydock.optimizers import ctranslate2 as ct2
    from raydock.serve_apps.adapters import MergedServing

    quantization = spec["quantization"]
    return MergedServing(
        base=spec["source_artifact"],
        label=f"ct2-{ct2.normalize(quantization)}",
        convert=lambda merged, out: ct2.convert(merged, out, quantization),
        make_engine=functools.partial(_ctranslate2_engine, spec),
    )


def load_engine(spec: dict[str, Any]):
    """The engine a replica serves with: transformers, CTranslate2 or vLLM."""
    model_dir = fetch_model(spec["artifact"])
    common = _common(spec)
    if spec["engine"] == "ctranslate2":
        return _ctranslate2_engine(spec, model_dir)
    if spec["engine"] == "vllm":
        from raydock.serve_apps.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_dir,
            quantization=spec["quantization"] or None,
            max_loaded_adapters=spec["max_loaded_adapters"],
            max_adapter_rank=spec["max_adapter_rank"],
            parallel=spec.get("parallel") or {},
            **common,
        )
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir, **common)


def build_engine_app(
    deployment_id: str,
    access: dict[str, Any],
    control_plane: dict[str, tuple[str, str]],
    artifact: dict[str, Any],
    engine: EnginePlan,
    config: dict[str, Any],
    profile: dict[str, Any],
    stream_interval_s: float = 0.0,
    max_request_bytes: int | None = None,
    source: dict[str, Any] | None = None,
) -> Application:
    """`artifact` is what the engine loads; `source`, the model's own weights when that is a
    conversion of them (adapters of the base are merged into these)."""
    batch = config["scalingParameters"]["maxBatchSize"]
    adapters = config.get("adapterParameters") or {}
    spec = {
        "deployment_id": deployment_id,
        # the deployment's access snapshot when it was deployed; the hub pushes changes
        "access": access,
        "access_hub": control_plane["access_hub"],
        "registry": control_plane["registry"],
        "meter": control_plane["meter"],
        "artifact": artifact,  # where the model is and how to fetch it (Settings.artifact_access)
        "source_artifact": source,
        "engine": engine.engine,
        "quantization": engine.quantization,
        "max_batch_size": batch,
        "queue_limit": queue_limit(batch),
        "stream_interval_s": stream_interval_s,
        "max_request_bytes": max_request_bytes,
        "device": profile.get("device", "cpu"),
        "num_threads": engine_threads(engine.engine, profile),
        "parallel": parallel_args(engine.engine, profile),
        "max_loaded_adapters": loaded_adapters(config, engine.engine),
        "max_adapter_rank": adapters.get("maxAdapterRank", MAX_ADAPTER_RANK.default),
    }
    options = serve_options(config, profile, engine.engine)
    routing = prefix_routing(config, engine.engine)
    if routing is None:
        return versioned(EngineServer.options(**options), spec).bind(spec)
    from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY
    from ray.serve.config import RequestRouterConfig

    from raydock.serve_apps.prefix_router import PrefixRouteServer

    options["request_router_config"] = RequestRouterConfig(
        request_router_class="raydock.serve_apps.prefix_router.PrefixAffinityRouter",
        request_router_kwargs=routing,
    )
    app = versioned(EngineServer.options(**options), spec).bind(spec)
    if not RAY_SERVE_ENABLE_HA_PROXY:
        # Serve's Python proxy hands the router an HTTP request, not its body: only the
        # gateway's /v1 path routes on the prefix there
        return app
    # HAProxy sends /deployments/<id>/… straight to a replica: it asks the route server which
    router = versioned(PrefixRouteServer, {"deployment_id": spec["deployment_id"]})
    return app._with_ingress_request_router(router.bind(app))


def versioned(deployment: serve.Deployment, spec: dict[str, Any]) -> serve.Deployment:
    """`deployment` with a version that keeps its running replicas across a redeploy that
    does not change what they are built from. Serve replaces replicas when the version changes,
    and gives an app submitted from Python a random one each time (ray.serve's client), so
    every redeploy restarted every replica (minutes for vLLM) even for a scaling or routing
    change, which Serve applies to running replicas. The version is raydock's code and the
    replica's spec, less its access snapshot: the access hub keeps running replicas current."""
    built_from = {k: v for k, v in spec.items() if k != "access"}
    digest = hashlib.sha256(_code_digest().encode())
    digest.update(json.dumps(built_from, sort_keys=True, default=str).encode())
    # Serve's public options() refuses `version`; its internal callers may set one (apart
    # from the other options, which Serve records as the user's)
    return deployment.options(version=digest.hexdigest()[:16], _internal=True)


@functools.cache
def _code_digest() -> str:
    """raydock's source files, read once per process: new code, new replicas."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
