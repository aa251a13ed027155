"""Generation and endpoint parameters: each one's allowed range and default, in one place.

The management API's deploy body (hyperParameters are a deployment's defaults), the OpenAI
request models, and the defaults a request falls back on all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field


@dataclass(frozen=True)
class Param:
    lo: float
    hi: float
    default: Any

    def field(self, what: str, default: Any = ...) -> Any:
        """A pydantic Field with this range, described as "<what>, lo–hi."."""
        value = self.default if default is ... else default
        return Field(value, ge=self.lo, le=self.hi, description=f"{what}, {self.lo}–{self.hi}.")


TEMPERATURE = Param(0, 2, 1.0)
TOP_P = Param(0, 1, 1.0)
TOP_K = Param(1, 100, 50)
#: a request's top_k: also 0, off (every token may be drawn), and vLLM's -1 for it
REQUEST_TOP_K = Param(-1, TOP_K.hi, None)
#: stop sequences, a request's `stop` and a deployment's default `stopSequence` alike
MAX_STOP_SEQUENCES = 8
#: tokens a request may generate; hyperParameters.maxTokens also takes 0, "this default"
MAX_TOKENS = Param(1, 512, 512)
#: sequences a replica decodes together
MAX_BATCH_SIZE = Param(1, 256, 10)
#: the deployment's endpoint timeout, seconds
TIMEOUT_S = Param(30, 180, 60)
#: choices per request
N = Param(1, 8, 1)
#: adapters a replica keeps loaded (least recently used ones leave); 0: the deployment serves
#: no adapter. The default holds where adapter slots cost nothing until an adapter is used;
#: vLLM's are off unless asked for (engine_app.loaded_adapters)
MAX_LOADED_ADAPTERS = Param(0, 64, 4)
#: the largest LoRA rank a deployment loads (vLLM sizes its LoRA buffers for it)
MAX_ADAPTER_RANK = Param(1, 512, 64)
#: prefix-cache-aware routing: how many more requests a prefix's replica may have in flight
#: than the least-loaded replica before that prefix's next request goes elsewhere; None: half
#: the deployment's maxBatchSize (at least 1)
PREFIX_IMBALANCE = Param(0, 1024, None)
#: a deployment key's optional limits (metering/limits.py); None: unlimited
REQUESTS_PER_MINUTE = Param(1, 1_000_000, None)
TOKENS_PER_MINUTE = Param(1, 1_000_000_000, None)
TOKENS_PER_DAY = Param(1, 1_000_000_000_000, None)
