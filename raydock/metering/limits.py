"""Per-key rate limits and daily token budgets, decided in one place for all replicas.

The rule (README "Rate limits and budgets"): a request is admitted while, for its key, the
requests admitted in the last 60 s are fewer than `requestsPerMinute`, the tokens charged in
the last 60 s fewer than `tokensPerMinute`, and the tokens charged today (UTC) fewer than
`tokensPerDay`. Admission counts the request at once, so a requests-per-minute limit is
exact across replicas and nodes. Tokens are charged when a request ends (a replica reports
within half a second), so a token limit can be passed by the requests already running when
it is reached: a request admitted under the limit runs to its end, the next one gets 429.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

WINDOW_S = 60.0
DAY_S = 86_400
#: a share of `tokensPerDay` that, once used, warns the key's owner
BUDGET_WARNING = 0.8

#: the limit fields of a key, in the order they are checked
LIMITS = ("requestsPerMinute", "tokensPerMinute", "tokensPerDay")


@dataclass(frozen=True)
class Refusal:
    limit: str  # one of LIMITS
    allowed: int
    retry_after_s: int

    @property
    def message(self) -> str:
        what = {
            "requestsPerMinute": f"{self.allowed} requests per minute",
            "tokensPerMinute": f"{self.allowed} tokens per minute",
            "tokensPerDay": f"{self.allowed} tokens per day",
        }[self.limit]
        return (
            f"rate limit reached for this API key: {self.limit} ({what}); "
            f"retry after {self.retry_after_s} s"
        )


def day_of(t: float) -> int:
    return int(t // DAY_S)


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._minute_tokens: dict[str, int] = {}
        self._day: dict[str, tuple[int, int]] = {}  # key -> (day, tokens charged that day)

    def _prune(self, key: str, now: float) -> None:
        requests = self._requests.get(key)
        while requests and requests[0] <= now - WINDOW_S:
            requests.popleft()
        tokens = self._tokens.get(key)
        while tokens and tokens[0][0] <= now - WINDOW_S:
            self._minute_tokens[key] -= tokens.popleft()[1]

    def day_tokens(self, key: str, now: float | None = None) -> int:
        day, tokens = self._day.get(key, (-1, 0))
        return tokens if day == day_of(self.clock() if now is None else now) else 0

    def admit(self, key: str, limits: Mapping[str, int | None]) -> Refusal | None:
        """None and the request counted, or the limit that refuses it."""
        now = self.clock()
        self._prune(key, now)
        requests = self._requests.setdefault(key, deque())
        rpm = limits.get("requestsPerMinute")
        if rpm and len(requests) >= rpm:
            return Refusal("requestsPerMinute", rpm, _ceil(requests[0] + WINDOW_S - now))
        tpm = limits.get("tokensPerMinute")
        if tpm and self._minute_tokens.get(key, 0) >= tpm:
            oldest = self._tokens[key][0][0]
            return Refusal("tokensPerMinute", tpm, _ceil(oldest + WINDOW_S - now))
        tpd = limits.get("tokensPerDay")
        if tpd and self.day_tokens(key, now) >= tpd:
            return Refusal("tokensPerDay", tpd, _ceil((day_of(now) + 1) * DAY_S - now))
        requests.append(now)
        return None

    def charge(self, key: str, tokens: int, at: float | None = None) -> tuple[int, int]:
        """Count `tokens` used by `key` (at time `at`); its tokens today before and after."""
        now = self.clock() if at is None else at
        if tokens > 0:
            self._tokens.setdefault(key, deque()).append((now, tokens))
            self._minute_tokens[key] = self._minute_tokens.get(key, 0) + tokens
            self._prune(key, self.clock())
        before = self.day_tokens(key, now)
        self._day[key] = (day_of(now), before + tokens)
        return before, before + tokens

    def load_day(self, key: str, day: int, tokens: int) -> None:
        """Tokens a key used on `day` before this limiter started (from stored usage), added
        to what it charged since it started (not yet stored)."""
        current_day, current = self._day.get(key, (day, 0))
        if current_day == day:
            self._day[key] = (day, current + tokens)


def budget_reached(used: int, budget: int | None) -> str | None:
    """The highest budget threshold `used` tokens reach: "exhausted", "warning" (80 %), or
    None. The meter tells each (key, day, threshold, budget) once: a budget raised or
    lowered during the day is told about anew, and one exhausted at a stroke is not also
    "nearing" its end."""
    if not budget:
        return None
    if used >= budget:
        return "exhausted"
    return "warning" if used >= BUDGET_WARNING * budget else None


def _ceil(seconds: float) -> int:
    return max(1, int(-(-seconds // 1)))
