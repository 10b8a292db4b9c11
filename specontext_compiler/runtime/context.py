"""Which runtime the custom ops talk to.

A captured graph is a plain function of its inputs; the KV cache lives in a runtime object. The engine
activates its runtime around each step (``with activate(runtime): graph(...)``), and the op
implementations look it up here. A thread-local keeps two engines in two threads apart.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .attention_runtime import AttentionRuntime

_state = threading.local()


def active_runtime() -> "AttentionRuntime":
    runtime = getattr(_state, "runtime", None)
    if runtime is None:
        raise RuntimeError(
            "specontext::attention was called outside a SpeContext runtime: run captured graphs through "
            "SpeContextModel (generate / __call__), which activates the runtime that owns the KV cache"
        )
    return runtime


@contextlib.contextmanager
def activate(runtime: "AttentionRuntime") -> Iterator["AttentionRuntime"]:
    previous = getattr(_state, "runtime", None)
    _state.runtime = runtime
    try:
        yield runtime
    finally:
        _state.runtime = previous
