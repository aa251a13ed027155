"""Incremental detokenization with stop sequences.

Emits only text that can no longer change: text that might be the start of a stop sequence,
or an incomplete UTF-8 character, is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Callable

#: prompt tokens the output is decoded after: a SentencePiece tokenizer (Llama 2, Mistral)
#: drops the space of the first token it decodes ("▁Paris" alone is "Paris"), so the output
#: is decoded in context and the context's text taken off, as vLLM's detokenizer does
CONTEXT_TOKENS = 4


class TextTracker:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: tuple[str, ...] = (),
        context: list[int] | tuple[int, ...] = (),
    ):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._context = list(context[-CONTEXT_TOKENS:])
        self._context_text = decode(self._context) if self._context else ""
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already sent
        self.stopped = False
        self.text = ""

    def _decoded(self) -> str:
        if self._context_text:
            text = self._decode(self._context + self.ids)
            if text.startswith(self._context_text):
                return text[len(self._context_text) :]
        return self._decode(self.ids)

    def add(self, token: int) -> str:
        """Append a token; return the newly final text (may be empty). Sets `stopped`."""
        self.ids.append(token)
        text = self._decoded()
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
