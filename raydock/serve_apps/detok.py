"""Incremental detokenization with stop sequences.

Emits only text that can no longer change: text that might be the start of a stop sequence,
or an incomplete UTF-8 character, is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Callable


class TextTracker:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already sent
        self.stopped = False
        self.text = ""

    def add(self, token: int) -> str:
        """Append a token; return the newly final text (may be empty). Sets `stopped`."""
        self.ids.append(token)
        text = self._decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - self._hold
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe)

    def flush(self) -> str:
        """The held-back tail, once generation ended for another reason."""
        return self._take(len(self.text.rstrip("\ufffd")))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
