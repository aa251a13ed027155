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
    """The text of a growing list of token ids, decoded a few tokens at a time.

    Each token decodes only the window from the last final piece on (vLLM's
    `detokenize_incrementally`): the tokens since the text last became final, after the one
    or more tokens before them as context. A window that ends inside a UTF-8 character
    ("\ufffd") waits for the token that completes it. Decoding the whole output at every
    token instead costs time in its length: 250 µs a token at 2,048 tokens."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: tuple[str, ...] = (),
        context: list[int] | tuple[int, ...] = (),
    ):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._all = list(context[-CONTEXT_TOKENS:])  # context, then the output
        self._prefix = 0  # the window's context starts here in _all
        self._read = len(self._all)  # ... and its undecided tokens here
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already sent
        self.stopped = False
        self.text = ""  # the output's decoded text so far (cut at a stop sequence)

    def _pending(self) -> str:
        """The undecided tokens' text, read after their context."""
        before = self._decode(self._all[self._prefix : self._read])
        text = self._decode(self._all[self._prefix :])
        if text.startswith(before):
            return text[len(before) :]
        return self._decode(self._all[self._read :])  # the context reads differently: alone

    def add(self, token: int) -> str:
        """Append a token; return the newly final text (may be empty). Sets `stopped`."""
        self.ids.append(token)
        self._all.append(token)
        pending = self._pending()
        if pending and not pending.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._all)
            return self._extend(pending)
        return ""  # nothing new is final: the text is as the last piece left it

    def _extend(self, piece: str) -> str:
        start = max(len(self.text) - self._hold, 0)  # a stop sequence may end in the new piece
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._take(len(self.text))
        # final: all but what may be the start of a stop sequence
        return self._take(len(self.text) - self._hold)

    def flush(self) -> str:
        """The held-back tail, once generation ended for another reason (a stop sequence may
        end in an unfinished character's text too: then `stopped`)."""
        out = ""
        if self._read < len(self._all) and not self.stopped:  # an unfinished character
            piece = self._pending().rstrip("\ufffd")
            self._prefix = self._read = len(self._all)
            out = self._extend(piece)
        return out if self.stopped else out + self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
