"""The registry as the platform's code calls it (`await registry.method.remote(...)`), over a
real `Registry` in this process: the API routes and the notifier run without Ray."""

from __future__ import annotations

from typing import Any


class _Method:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class RegistryHandle:
    def __init__(self, registry: Any):
        self.registry = registry

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.registry, name))
