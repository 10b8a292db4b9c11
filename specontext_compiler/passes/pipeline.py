"""The ordered pass list, in one place.

Passes are pure ``GraphModule -> PassResult`` functions, one per file. This file owns their order and
the constraints between them (``this_before_that``), and runs them with torch.fx's ``PassManager``,
which checks the constraints and the graph after every pass. Later issues add passes here:
``plan_memory``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager, this_before_that_pass_constraint

from .annotate_attention import annotate_attention
from .insert_retrieval_head import insert_retrieval_head
from .schedule_prefetch import schedule_prefetch
from .sparsify_attention import sparsify_attention

logger = logging.getLogger(__name__)

GraphPass = Callable[[torch.fx.GraphModule], PassResult]


def default_passes(sparse: bool = False) -> list[GraphPass]:
    """The passes :func:`specontext.compile` runs, in order (dense: annotation only)."""
    if not sparse:
        return [annotate_attention]
    return [annotate_attention, insert_retrieval_head, sparsify_attention, schedule_prefetch]


# (earlier, later): every pass reads annotate_attention's annotations; sparsify needs the retrieve node;
# prefetches are scheduled around the sparse attention nodes.
ORDER = [
    (annotate_attention, insert_retrieval_head),
    (annotate_attention, sparsify_attention),
    (insert_retrieval_head, sparsify_attention),
    (sparsify_attention, schedule_prefetch),
]


def ordering_constraints(passes: list[GraphPass]) -> list[Callable]:
    constraints = [this_before_that_pass_constraint(a, b) for a, b in ORDER if a in passes and b in passes]
    constraints += [
        this_before_that_pass_constraint(annotate_attention, p)
        for p in passes
        if p is not annotate_attention and all(p is not b for _, b in ORDER)
    ]
    return constraints


def _lint(gm: torch.fx.GraphModule) -> None:
    gm.graph.lint()


def run_passes(gm: torch.fx.GraphModule, passes: list[GraphPass] | None = None) -> PassResult:
    passes = default_passes() if passes is None else passes
    manager = PassManager(passes=passes, constraints=ordering_constraints(passes), run_checks_after_each_pass=True)
    # The order given is the order run: a list that breaks a constraint is a bug to report, not to re-sort.
    manager.validate_constraints()
    manager.add_checks(_lint)
    result = manager(gm)
    logger.info("passes %s: graph modified=%s", [p.__name__ for p in passes], result.modified)
    return result
