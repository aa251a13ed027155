"""Every metric raydock exports: name, kind, labels and help, in one place.

Names follow Prometheus conventions (base units, `_total` on counters, `_seconds`). Labels
carry ids, never secrets: `key` is an API key's id (`key-…`), not the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "histogram", "gauge"]

#: request latencies, seconds (a replica on CPU takes tens of ms per token, seconds per request)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 180)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 10)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


def _m(name: str, kind: Kind, labels: tuple[str, ...], help: str, buckets=()) -> Metric:
    return Metric(name, kind, labels, help, tuple(buckets))


SERVED = ("deployment", "adapter")
KEYED = ("deployment", "adapter", "key")

REQUESTS = _m(
    "raydock_requests_total",
    "counter",
    (*KEYED, "status"),
    "Inference requests by HTTP status (499: the client went away)",
)
PROMPT_TOKENS = _m("raydock_prompt_tokens_total", "counter", KEYED, "Prompt tokens processed")
COMPLETION_TOKENS = _m(
    "raydock_completion_tokens_total", "counter", KEYED, "Completion tokens generated"
)
RATE_LIMITED = _m(
    "raydock_rate_limited_total",
    "counter",
    ("deployment", "key", "limit"),
    "Requests refused with 429 by a key's limit",
)
TTFT = _m(
    "raydock_time_to_first_token_seconds",
    "histogram",
    SERVED,
    "Time from a request's arrival to its first token",
    LATENCY_BUCKETS,
)
TPOT = _m(
    "raydock_time_per_output_token_seconds",
    "histogram",
    SERVED,
    "Time per output token after the first, per request",
    TOKEN_LATENCY_BUCKETS,
)
E2E = _m(
    "raydock_request_duration_seconds",
    "histogram",
    SERVED,
    "Time from a request's arrival to its last byte",
    LATENCY_BUCKETS,
)
QUEUE_DEPTH = _m(
    "raydock_queue_depth",
    "gauge",
    ("deployment",),
    "Requests waiting for a batch slot, summed over the deployment's replicas",
)
RUNNING = _m(
    "raydock_running_sequences",
    "gauge",
    ("deployment",),
    "Sequences decoding (the running batch), summed over the deployment's replicas",
)
GUIDED_COMPILE = _m(
    "raydock_guided_compile_seconds",
    "histogram",
    ("deployment",),
    "Guided-decoding grammar compile time (cache misses)",
    COMPILE_BUCKETS,
)
GUIDED_CACHE_HITS = _m(
    "raydock_guided_cache_hits_total",
    "counter",
    ("deployment",),
    "Guided-decoding grammars found compiled in the replica's cache",
)
GUIDED_CACHE_MISSES = _m(
    "raydock_guided_cache_misses_total",
    "counter",
    ("deployment",),
    "Guided-decoding grammars compiled",
)
#: per replica (`replica`: Serve's replica id), to see where prefix-cache-aware routing sends
#: requests and what vLLM's prefix cache saves on each
REPLICA_REQUESTS = _m(
    "raydock_replica_requests_total",
    "counter",
    ("deployment", "replica"),
    "Requests an engine replica took (both inference paths)",
)
PREFIX_CACHE_QUERIES = _m(
    "raydock_prefix_cache_queried_tokens_total",
    "counter",
    ("deployment", "replica"),
    "Prompt tokens vLLM looked up in its prefix cache",
)
PREFIX_CACHE_HITS = _m(
    "raydock_prefix_cache_hit_tokens_total",
    "counter",
    ("deployment", "replica"),
    "Prompt tokens vLLM found in its prefix cache (not computed again)",
)
REPLICAS = _m("raydock_replicas", "gauge", ("deployment",), "Running replicas of the deployment")
REPLICAS_TARGET = _m(
    "raydock_replicas_target",
    "gauge",
    ("deployment",),
    "Replicas the autoscaler wants for the deployment",
)
JOB_DURATION = _m(
    "raydock_job_duration_seconds",
    "histogram",
    ("action", "status"),
    "Duration of finished import, deploy, undeploy and export jobs",
    JOB_BUCKETS,
)
JOBS = _m(
    "raydock_jobs_total",
    "counter",
    ("action", "status"),
    "Finished jobs by action and outcome (FAILED counts failures)",
)

ALL: tuple[Metric, ...] = (
    REQUESTS,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    RATE_LIMITED,
    TTFT,
    TPOT,
    E2E,
    QUEUE_DEPTH,
    RUNNING,
    GUIDED_COMPILE,
    GUIDED_CACHE_HITS,
    GUIDED_CACHE_MISSES,
    REPLICA_REQUESTS,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    REPLICAS,
    REPLICAS_TARGET,
    JOB_DURATION,
    JOBS,
)
BY_NAME = {m.name: m for m in ALL}
