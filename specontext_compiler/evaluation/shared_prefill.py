"""One prefill, many selections: every method of a comparison decodes from the same prefilled prompt.

Prefill is dense whatever the selection, and on a CPU it costs far more than a few decode steps
(SmolLM2 at 4K tokens: ~18 s against ~0.15 s a step). So a comparison compiles the model once with a
:class:`HeadChoice` as its retrieval head (every candidate head observes the prefill), prefills each
prompt once, and then, for each method, rolls the runtime back to the prefilled state (the rollback a
step that ran out of memory uses), picks the method's head and token budget, and decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..retrieval.base import RetrievalHead
from ..runtime import step_transaction
from ..runtime.attention_runtime import SparseSettings
from ..runtime.sampling import resolve_generation_config


class HeadChoice(RetrievalHead):
    """Several retrieval heads (or baselines) following one sequence; the ``active`` one selects.

    Every head observes every step, so any of them can take over from a rolled-back state.
    """

    name = "head_choice"

    def __init__(self, heads: dict[str, RetrievalHead]):
        if not heads:
            raise ValueError("HeadChoice needs at least one head")
        self.heads = dict(heads)
        self.active = next(iter(self.heads))
        aux: list[int] = []
        for head in self.heads.values():
            aux += [layer for layer in head.aux_layers if layer not in aux]
        self.aux_layers = tuple(aux)

    def use(self, name: str) -> None:
        if name not in self.heads:
            raise ValueError(f"no head named {name!r}; heads: {', '.join(self.heads)}")
        self.active = name

    @property
    def per_layer(self) -> bool:  # the runtime asks the head that selects now
        return self.heads[self.active].per_layer

    def reset(self, batch, reserve_tokens):
        for head in self.heads.values():
            head.reset(batch, reserve_tokens)

    def observe(self, layer, q, k, keys, scale, key_valid=None):
        for head in self.heads.values():
            head.observe(layer, q, k, keys, scale, key_valid)

    def observe_step(self, input_ids, attention_mask, position_ids, aux_hidden):
        by_layer = dict(zip(self.aux_layers, aux_hidden))
        for head in self.heads.values():
            head.observe_step(input_ids, attention_mask, position_ids, [by_layer[layer] for layer in head.aux_layers])

    def snapshot(self):
        return {name: head.snapshot() for name, head in self.heads.items()}

    def restore(self, state):
        for name, head in self.heads.items():
            head.restore(state[name])

    def score(self, input_ids, attention_mask, past):
        return self.heads[self.active].score(input_ids, attention_mask, past)

    def score_layer(self, layer, q, keys, scale):
        return self.heads[self.active].score_layer(layer, q, keys, scale)

    def cache_bytes_per_token(self) -> int:
        return sum(head.cache_bytes_per_token() for head in self.heads.values())

    def parameter_count(self) -> int:
        return sum(head.parameter_count() for head in self.heads.values())


@dataclass(frozen=True)
class Method:
    """A selection to compare: a head of the :class:`HeadChoice` at a token budget (None: dense)."""

    head: str | None
    token_budget: int | float | None
    guard: bool = False  # with the accuracy guard the model was compiled with

    @property
    def name(self) -> str:
        """The method without its budget: the head's name (``+guard`` with the guard), or "dense"."""
        if self.token_budget is None:
            return "dense"
        return f"{self.head}{'+guard' if self.guard else ''}"

    @property
    def label(self) -> str:
        return self.name if self.token_budget is None else f"{self.name}@{self.token_budget:g}"


DENSE = Method(None, None)


def _select(compiled, choice: HeadChoice, method: Method, guard) -> None:
    """Make ``method`` the runtime's selection; ``guard``: the accuracy guard the model was compiled with."""
    runtime = compiled.runtime
    if method.guard and guard is None:
        raise ValueError(f"{method.label} asks for the accuracy guard but the model was compiled without one")
    runtime.guard = guard if method.guard else None
    if method.guard:  # the sequence starts again here: no hold or coverage left from the method before
        runtime.restart_guard()
    if method.token_budget is None:
        runtime.sparse = None
        return
    choice.use(method.head)
    runtime.sparse = SparseSettings(method.token_budget, compiled.config.sink_tokens, compiled.config.local_window,
                                    compiled.config.sticky_margin)


def _each(compiled, choice: HeadChoice, input_ids: torch.Tensor, reserve: int, methods, run) -> dict:
    """``run(prefilled)`` for every method, each from the state one dense prefill of ``input_ids`` left;
    the runtime's selection, guard and active head are put back afterwards."""
    runtime = compiled.runtime
    input_ids, mask = compiled._check_inputs(input_ids, None)
    compiled._check_budget(input_ids.shape[0], input_ids.shape[1], reserve)
    saved = runtime.sparse, runtime.guard, choice.active
    outputs = {}
    try:
        prefilled = compiled.engine.prefill(input_ids, mask, reserve)
        state = step_transaction.begin(runtime)
        for method in methods:
            step_transaction.roll_back(runtime, state)
            _select(compiled, choice, method, saved[1])
            outputs[method] = run(prefilled, method)
    finally:
        runtime.sparse, runtime.guard, choice.active = saved
    return outputs


def generate_each(compiled, choice: HeadChoice, input_ids: torch.Tensor, methods, max_new_tokens: int,
                  stats: dict | None = None, **generate_kwargs) -> dict[Method, torch.Tensor]:
    """Greedy new tokens [B, <= max_new_tokens] of every method, all decoded from one prefill of ``input_ids``.

    ``compiled`` must have been compiled with ``draft=choice``; ``generate_kwargs`` are ``generate``'s;
    ``stats``, if given, receives each method's ``compiled.stats``.
    """
    settings = resolve_generation_config(compiled.generation_config, None, input_ids.shape[1],
                                         {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs},
                                         compiled.max_positions)

    def decode(prefilled, method):
        tokens = compiled.engine.decode(prefilled, settings)[:, input_ids.shape[1]:]
        if stats is not None:
            stats[method] = dict(compiled.engine.stats)
        return tokens

    return _each(compiled, choice, input_ids, input_ids.shape[1] + max_new_tokens, methods, decode)


def replay_each(compiled, choice: HeadChoice, input_ids: torch.Tensor, continuation: torch.Tensor,
                methods, stats: dict | None = None) -> dict[Method, torch.Tensor]:
    """Teacher-forced logits [B, N, V] of every method over ``continuation``, from one prefill;
    ``stats``, if given, receives each method's accuracy-guard stats (empty without the guard)."""
    continuation = continuation.to(compiled.device)

    def replay(prefilled, method):
        logits = compiled.engine.replay_from(prefilled, continuation)
        if stats is not None:
            guard = compiled.runtime.guard
            stats[method] = {} if guard is None else guard.stats()
        return logits

    return _each(compiled, choice, input_ids, input_ids.shape[1] + continuation.shape[1], methods, replay)
