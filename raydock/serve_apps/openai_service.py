"""The OpenAI request pipeline shared by every inference entry point.

The engine replicas' own HTTP routes (`/deployments/{id}/…`, one network hop) and the gateway
(`/v1/*`, which calls engines through a DeploymentHandle) both authenticate with
`access.Auth`, then hand `complete` a runner that streams engine events. Validation, defaults,
the timeout, structured output, tool calls and the OpenAI shapes all live here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from raydock import errors
from raydock import params as P
from raydock.errors import ApiError, error_body
from raydock.serve_apps import protocol, structured
from raydock.serve_apps.access import DeploymentAccess
from raydock.serve_apps.metering import Call, ReplicaMeter
from raydock.serve_apps.reasoning import REASONING, reasoning_tokens, split_reasoning

log = logging.getLogger("raydock.inference")

# (engine request payload) -> batches of engine events
Runner = Callable[[dict[str, Any]], AsyncIterator[list[dict[str, Any]]]]


def engine_request(
    kind: Literal["chat", "completion"], req: protocol._Request, dep: DeploymentAccess
) -> dict[str, Any]:
    hp = dep.defaults
    default_max = hp.get("maxTokens") or P.MAX_TOKENS.default
    newer = req.max_completion_tokens if kind == "chat" else None  # chat's newer name
    max_tokens = newer or req.max_tokens or default_max
    stops = req.stop_list() or hp.get("stopSequence", [])
    logprobs = bool(req.logprobs) if kind == "chat" else req.logprobs is not None
    top = (req.top_logprobs or 0) if kind == "chat" else (req.logprobs or 0)
    temperature = req.temperature
    if temperature is None:
        temperature = hp.get("temperature", P.TEMPERATURE.default)
    top_p = req.top_p if req.top_p is not None else hp.get("topP", P.TOP_P.default)
    if top_p == 0:  # a nucleus of no mass holds just the likeliest token: greedy, on every engine
        temperature, top_p = 0.0, 1.0
    params = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": req.top_k if req.top_k is not None else hp.get("topK", P.TOP_K.default),
        "seed": req.seed,
        "stop": tuple(stops),
        "logprobs": logprobs,
        "top_logprobs": top,
        "ignore_eos": req.ignore_eos,
    }
    # penalties the request leaves out keep SamplingParams' neutral defaults
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (value := getattr(req, name)) is not None:
            params[name] = value
    if req.logit_bias:
        params["logit_bias"] = tuple(sorted(req.logit_bias.items()))
    out: dict[str, Any] = {"params": params, "n": req.n}
    if kind == "chat":
        out["messages"] = [m.for_template() for m in req.messages]
        if req.tools:  # the chat template shows them, with tool_choice "none" too (as vLLM)
            out["tools"] = req.tools
    else:
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt lists must hold exactly one prompt", "prompt")
            out["prompt"] = req.prompt[0]
        else:
            out["prompt"] = req.prompt
        if req.echo and req.logprobs is not None:
            raise ApiError(
                400,
                "echo with logprobs is not supported: the engines do not score the prompt",
                "echo",
                "unsupported_parameter",
            )
    return out


async def _constraint_of(kind: str, req: protocol._Request) -> structured.Constraint:
    """The request's output constraint. Compiling a schema or tool list is pure Python that
    grows with its size: bounded, run off the event loop (every stream of the replica shares
    it), and kept for the requests that ask for the same format again."""
    asked = {f: v for f in structured.FORMAT_FIELDS if (v := getattr(req, f, None)) is not None}
    if not asked:
        return _constraint(kind, req)
    if kind == "chat" and req.tool_choice is not None:
        asked["tool_choice"] = req.tool_choice
    try:
        for field, value in asked.items():
            structured.check_format_size(field, value)
    except structured.StructuredError as exc:
        raise ApiError(400, str(exc), exc.param, "unsupported_schema") from None
    text = kind + json.dumps(asked, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()
    found = _compiled.get(key)
    if found is None:
        found = await asyncio.to_thread(_constraint, kind, req)
        if len(text) <= _KEPT_FORMAT_CHARS:  # a large one would hold its size in memory
            _compiled[key] = found
            if len(_compiled) > _COMPILED_KEPT:
                _compiled.pop(next(iter(_compiled)))
    return found


#: output constraints compiled lately (hash of the request's format -> constraint), oldest
#: first: at most this many, of formats up to this size (a grammar embeds its strings)
_compiled: dict[str, structured.Constraint] = {}
_COMPILED_KEPT = 256
_KEPT_FORMAT_CHARS = 64 * 1024


def _constraint(kind: str, req: protocol._Request) -> structured.Constraint:
    # legacy completions take response_format as vLLM's server does; tools are chat-only
    tools, tool_choice = (req.tools, req.tool_choice) if kind == "chat" else (None, None)
    try:
        openai_style = structured.constraint_for(req.response_format, tools, tool_choice)
        vllm_style = _vllm_structured(req)
        if vllm_style is None or openai_style.mode == "tools":  # tools take precedence
            return openai_style
        if openai_style.mode != "text":
            raise structured.StructuredError(
                vllm_style[2], f"{vllm_style[2]} and response_format both set the output format"
            )
        return structured.vllm_constraint(*vllm_style)
    except structured.StructuredError as exc:
        raise ApiError(400, str(exc), exc.param, "unsupported_schema") from None


#: vLLM's structured output formats; its other `structured_outputs` keys are options
_VLLM_FORMATS = ("json", "choice", "regex", "grammar", "json_object", "structural_tag")


def _vllm_structured(req: protocol._Request) -> tuple[str, Any, str] | None:
    """(kind, value, parameter name) of the vLLM-style structured output a request asks for.
    None and False mean "not asked", as in vLLM (`{"json_object": false}`)."""
    asked = []
    for k, v in (req.structured_outputs or {}).items():
        if v is None or v is False:
            continue
        if k not in _VLLM_FORMATS:
            raise structured.StructuredError(
                f"structured_outputs.{k}", f"structured_outputs.{k} is not supported by raydock"
            )
        asked.append((k, v, f"structured_outputs.{k}"))
    for k in ("json", "choice", "regex", "grammar"):
        if (v := getattr(req, f"guided_{k}")) is not None:
            asked.append((k, v, f"guided_{k}"))
    if len(asked) > 1:
        raise structured.StructuredError(
            asked[1][2], f"{asked[0][2]} and {asked[1][2]}: ask for one output format"
        )
    return asked[0] if asked else None


def native_tool_calls(constraint: structured.Constraint, req: protocol._Request) -> int:
    """How many calls in its chat template's own wrapper the engine replica may accept
    (any `tool_choice`; 0: none): one when the request turns parallel calls off."""
    if constraint.native_calls and getattr(req, "parallel_tool_calls", None) is False:
        return 1
    return constraint.native_calls


async def _as_tool_calls(
    batches: AsyncIterator[list[dict]], finish: str, tools: list[dict] | None = None
) -> AsyncIterator[list[dict]]:
    """Each choice's events as OpenAI answers under tools (`_ToolReply`, one per choice):
    calls become tool-call events (the last ends with `finish`), text streams as it comes.
    The thinking a reply opens with (`reasoning.split_reasoning`'s events) goes before it."""
    replies: dict[int, _ToolReply] = {}
    try:
        async for batch in batches:
            out = []
            for ev in batch:
                if REASONING in ev:
                    out.append(ev)
                    continue
                if (reply := replies.get(ev["index"])) is None:
                    reply = replies[ev["index"]] = _ToolReply(finish, tools)
                out.extend(reply.take(ev))
            if out:
                yield out
    finally:
        await batches.aclose()


def chat_events(
    events: AsyncIterator[list[dict]],
    tools_finish: str | None,
    include_reasoning: bool = True,
    tools: list[dict] | None = None,
) -> AsyncIterator[list[dict]]:
    """A chat reply's engine events as the client gets them: the thinking each choice opens
    with (or starts in) apart as reasoning, then under tools (`tools_finish`: the
    finish_reason of calls the model made) the reply after it as tool calls."""
    events = split_reasoning(events, include_reasoning, any_model=tools_finish is not None)
    return events if tools_finish is None else _as_tool_calls(events, tools_finish, tools)


class _ToolReply:
    """One choice's reply under tools, after any thinking (`reasoning.split_reasoning`). It is
    held while it may still be a tool call (it starts, after whitespace, with `{` or a native
    wrapper's opening tag such as `<tool_call>`, or with the start of one), then emitted as
    its tool calls, one event each (as OpenAI streams them, each with its `index`), or as the
    events themselves: text that cannot be a call (`tool_choice: auto`) streams as soon as its
    first characters say so, with its logprobs. No chunk ever shows a wrapper tag."""

    def __init__(self, finish: str, tools: list[dict] | None = None) -> None:
        self.finish = finish  # of a reply of calls that ended by itself
        self.tools = tools  # the request's: their schemas read an XML call's values
        self.text = ""
        self.held: list[dict] = []
        self.plain = False  # the reply is text: passed through

    def take(self, ev: dict) -> list[dict]:
        """The events to send now for `ev`, in order."""
        if self.plain:
            return [ev]
        self.text += ev["text"]
        self.held.append(ev)
        if self.text and not structured.may_be_tool_call(self.text):
            self.plain = True
            return self._release()
        if ev["finish_reason"] == "stop":
            calls = structured.as_tool_calls(self.text, self.tools)
            return self._as_calls(calls, self.finish) if calls else self._release()
        if ev["finish_reason"] == "length":  # cut short: the calls as far as written
            cut = structured.as_cut_tool_calls(self.text, self.tools)
            return self._as_calls(cut, "length")
        return self._release() if ev["finish_reason"] else []

    def _release(self) -> list[dict]:
        out, self.held = self.held, []
        return out

    def _as_calls(self, calls: list[dict], finish: str) -> list[dict]:
        """The held reply as tool-call events, then an empty event that ends the choice (as
        OpenAI streams them: openai-python's stream helper ends a call, with its parsed
        arguments, when a later chunk starts the next call or finishes the choice). The last
        call carries the logprobs of every held event, in order (the calls' tokens are not
        told apart)."""
        held, self.held = self.held, []
        logprobs = [entry for ev in held for entry in ev["logprobs"]]
        last = len(calls) - 1
        # what else the engine's last event says (its token counts) belongs to the end
        unfinished = held[-1] | {"finish_reason": None}
        events = [
            unfinished
            | {
                "text": "",
                "logprobs": logprobs if k == last else [],
                "tool_calls": [{"index": k, **call}],
            }
            for k, call in enumerate(calls)
        ]
        end = {"text": "", "logprobs": [] if calls else logprobs, "finish_reason": finish}
        return events + [held[-1] | end]


async def _bounded(
    events: AsyncIterator[list[dict]], deadline: float, timeout_s: int
) -> AsyncIterator[list[dict]]:
    """Engine events under the deployment's timeout; error events become HTTP errors."""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                batch = await asyncio.wait_for(events.__anext__(), remaining)
            except StopAsyncIteration:
                return
            if "error" in batch[0]:
                err = batch[0]
                raise ApiError(
                    err.get("status", 400), err["error"], err.get("param"), err.get("code")
                )
            yield batch
    except TimeoutError:
        raise ApiError(
            504,
            f"the request did not complete within the deployment's {timeout_s} s timeout",
            None,
            "timeout",
            # OpenAI's clients retry a 5xx twice unless told not to: each retry would run
            # the same work into the same timeout
            headers={"x-should-retry": "false"},
        ) from None
    finally:  # timeout, error or client gone: the engine stops this request at once
        await events.aclose()


def _ends_a_choice(item: Any) -> bool:
    """A batch that finishes a choice (or the stream's end, or an error) is not held back:
    clients see the end at once, and a load test's next wave starts together, which lets
    the engine prefill it in one pass."""
    return not isinstance(item, list) or any(ev.get("finish_reason") for ev in item)


async def _paced(events: AsyncIterator[list[dict]], interval_s: float) -> AsyncIterator[list[dict]]:
    """Send at most one batch per `interval_s`, merging what arrives in between.

    Every message of a stream is its own write through the ingress (and its own Ray object
    on the gateway's DeploymentHandle path); one per token per sequence is most of the serving
    layer's cost (Ray Serve LLM batches its streams the same way). The first batch goes at
    once, so time to first token is not delayed, and so does a batch that finishes a choice.
    """
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for batch in events:
                queue.put_nowait(batch)
        except Exception as exc:  # an ApiError (timeout, engine refusal): raised in order
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(end)

    task = asyncio.create_task(pump())
    sent = -float("inf")
    try:
        while True:
            items = [await queue.get()]
            # gather until the interval is over, or at once when a choice finishes
            while not _ends_a_choice(items[-1]):
                wait = sent + interval_s - time.monotonic()
                if wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        items.append(await queue.get())
                except TimeoutError:
                    break
            while not queue.empty():
                items.append(queue.get_nowait())
            merged = [ev for item in items if isinstance(item, list) for ev in item]
            if merged:
                sent = time.monotonic()
                yield merged
            for item in items:
                if isinstance(item, Exception):
                    raise item
            if items[-1] is end:
                return
    finally:  # client gone: stop pumping, which closes the engine stream
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await events.aclose()


async def complete(
    kind: Literal["chat", "completion"],
    request: Request,
    dep: DeploymentAccess,
    key_id: str,
    run: Runner,
    meter: ReplicaMeter,
    by_model: bool = False,
    stream_interval_s: float = 0.0,
    body_of: Callable[[bytes], Any] | None = None,
):
    """Answer one OpenAI request for `dep` (already authorized for key `key_id`) with events
    from `run`, metered; streams send at most one message per `stream_interval_s`.
    `body_of` reads the raw body into the request (default `read_json`; the Responses API
    translates its own request into a chat one there, metered as this call)."""
    call = meter.start(dep.deployment_id, key_id)
    try:
        return await _complete(
            kind, request, dep, run, meter, call, by_model, stream_interval_s, body_of
        )
    except ApiError as exc:  # refused before the response began (later ends: `meter.watch`)
        meter.finish(call, exc.status)
        raise
    except Exception:
        meter.finish(call, 500)
        raise


async def _complete(
    kind: Literal["chat", "completion"],
    request: Request,
    dep: DeploymentAccess,
    run: Runner,
    meter: ReplicaMeter,
    call: Call,
    by_model: bool,
    stream_interval_s: float,
    body_of: Callable[[bytes], Any] | None = None,
):
    started = call.started
    body = (body_of or read_json)(await request.body())
    try:
        model = protocol.ChatRequest if kind == "chat" else protocol.CompletionRequest
        req = protocol.parse(model, body)
    except protocol.BadParam as exc:
        raise ApiError(400, str(exc), exc.param, "invalid_parameter") from None
    adapter = requested_adapter(req, dep, by_model)
    call.adapter, call.n = (adapter["id"] if adapter else ""), req.n
    # admitted first: a key at its limit must not make the replica compile its schemas
    await meter.admit(dep.deployment_id, call.key, dep.limits.get(call.key))
    constraint = await _constraint_of(kind, req)
    request_for_engine = engine_request(kind, req, dep)
    payload = request_for_engine | {
        "regex": constraint.regex,
        "grammar": constraint.grammar,
        "constraint_param": constraint.param,
        "adapter": adapter,
        "native_tool_calls": native_tool_calls(constraint, req),
    }
    deadline = started + dep.timeout_s
    echo = request_for_engine["prompt"] if kind == "completion" and req.echo else ""
    fmt = protocol.Formatter(kind, f"{dep.name}:{adapter['name']}" if adapter else dep.name, echo)
    events = meter.watch(_bounded(run(payload), deadline, dep.timeout_s), call)
    if kind == "chat":
        # as OpenAI (and vLLM): a call the request named ends with "stop", one the model chose
        # ("auto", "required") with "tool_calls"
        named = isinstance(req.tool_choice, dict)
        tools_finish = ("stop" if named else "tool_calls") if constraint.mode == "tools" else None
        events = chat_events(events, tools_finish, req.include_reasoning, req.tools)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if stream_interval_s > 0:
            events = _paced(events, stream_interval_s)
        first = await _first_or_error(events)
        return StreamingResponse(
            _sse(fmt, first, events, include_usage, errors.request_id(request)),
            media_type="text/event-stream",
        )
    return JSONResponse(await _collect(fmt, events, req.n))


def requested_adapter(
    req: protocol._Request, dep: DeploymentAccess, by_model: bool
) -> dict[str, Any] | None:
    """The adapter a request picks (None: the plain model): `adapter`, or on the /v1 path
    (`by_model`) `model: "<deployment id or name>:<adapter>"`; 404 for one the deployment
    does not serve, naming the field."""
    ref, param = req.adapter, "adapter"
    if by_model and req.model is None:
        raise ApiError(
            400,
            "model is required on /v1: the deployment's id or name, or '<deployment>:<adapter>'",
            "model",
            "invalid_parameter",
        )
    if by_model and req.model not in (dep.deployment_id, dep.name):
        named = adapter_part(req.model, dep)
        if not named:
            raise unknown_model(req.model, dep)
        if ref is not None and ref != named:
            raise ApiError(400, f"model names adapter {named!r} and adapter {ref!r}", "adapter")
        ref, param = named, "model"
    # `param`: the field the replica's refusals name (`model` on /v1)
    return None if ref is None else dep.adapter(ref, param) | {"param": param}


def adapter_part(model: str, dep: DeploymentAccess) -> str | None:
    """What follows "<deployment id or name>:" in `model` (an adapter's name may hold ":"
    itself, and so may a deployment's name: the longest that fits); None if neither leads."""
    for prefix in sorted({dep.deployment_id, dep.name}, key=len, reverse=True):
        if model.startswith(f"{prefix}:"):
            return model[len(prefix) + 1 :]
    return None


def unknown_model(model: str, dep: DeploymentAccess) -> ApiError:
    """The 404 for a `model` that names neither the key's deployment nor its adapters."""
    return ApiError(
        404,
        f"model {model!r} is not the deployment of this API key ({dep.deployment_id}, "
        f"{dep.name!r}) nor one of its adapters ('<deployment>:<adapter>')",
        "model",
        "model_not_found",
    )


#: JSON nested deeper than this is refused: real requests (schemas included) stay far below,
#: and recursive validation and compilation of deeper ones would exhaust Python's stack
MAX_JSON_DEPTH = 64


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(body: Any) -> bool:
    """JSON may escape half a character (`"\\ud800"`); Python keeps it in the string, and the
    tokenizer then fails on it (a 500)."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def read_json(raw: bytes) -> Any:
    """A request body as JSON; a 400 that says where it is malformed or too deep."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"the request body is not valid UTF-8 (byte {exc.start})", "body", "invalid_json"
        ) from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}",
            "body",
            "invalid_json",
        ) from None
    except RecursionError:  # the parser's own stack limit, far beyond MAX_JSON_DEPTH
        body = None
        depth = MAX_JSON_DEPTH + 1
    except ValueError as exc:  # an integer past Python's 4,300 digits
        problem = f"the request body is not valid JSON: {exc}"
        raise ApiError(400, problem, "body", "invalid_json") from None
    else:
        depth = json_depth(body)
        if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
            raise ApiError(
                400,
                "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff not "
                "in a pair), which is no character",
                "body",
                "invalid_json",
            )
    if depth > MAX_JSON_DEPTH:
        raise ApiError(
            400,
            f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
            "body",
            "invalid_json",
        )
    return body


def json_depth(value: Any) -> int:
    """How deeply `value` nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


async def _first_or_error(events: AsyncIterator[list[dict]]) -> list[dict] | None:
    """Read the first events before answering, so early errors get a real HTTP status."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _collect(fmt: protocol.Formatter, events: AsyncIterator[list[dict]], n: int) -> dict:
    choices = [
        {"index": i, "text": "", "reasoning": None, "logprobs": [], "finish_reason": None}
        for i in range(n)
    ]
    prompt = completion = thought = 0
    async for batch in events:
        for ev in batch:
            c = choices[ev["index"]]
            c["text"] += ev["text"]
            if REASONING in ev:
                c["reasoning"] = (c["reasoning"] or "") + ev[REASONING]
            c["logprobs"] += ev["logprobs"]
            c["tool_calls"] = c.get("tool_calls", []) + (ev.get("tool_calls") or [])
            if ev["finish_reason"]:
                c["finish_reason"] = ev["finish_reason"]
                prompt = ev["prompt_tokens"]
                completion += ev["completion_tokens"]
                thought += reasoning_tokens(ev)
    return fmt.final(choices, prompt, completion, thought)


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(
    fmt, first, events, include_usage: bool, request_id: str | None
) -> AsyncIterator[str]:
    started: set[int] = set()
    prompt = completion = thought = 0

    def render(batch: list[dict]) -> str:
        """One SSE chunk per event, written together: one message per batch."""
        nonlocal prompt, completion, thought
        lines = []
        for ev in batch:
            i = ev["index"]
            if ev["finish_reason"]:
                prompt = ev["prompt_tokens"]
                completion += ev["completion_tokens"]
                thought += reasoning_tokens(ev)
            chunk = fmt.chunk(
                i,
                ev["text"],
                ev["logprobs"],
                ev["finish_reason"],
                i not in started,
                ev.get("tool_calls"),
                ev.get(REASONING),
            )
            started.add(i)
            lines.append(_sse_line(chunk))
        return "".join(lines)

    try:
        if first is not None:
            yield render(first)
        async for batch in events:
            yield render(batch)
        if include_usage:
            yield _sse_line(fmt.usage_chunk(prompt, completion, thought))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        err = errors.as_api_error(exc)
        if err is None:
            log.error("stream %s failed", request_id, exc_info=exc)
            err = ApiError(500, f"internal error (request id {request_id})", None, "internal_error")
        yield _sse_line(error_body(err.status, err.message, err.param, err.code, request_id))
        yield "data: [DONE]\n\n"
    finally:  # a client that went away cancels the engine stream at once
        await events.aclose()
