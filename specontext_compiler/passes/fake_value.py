"""``node.meta["val"]`` for a node a pass adds: torch.export's verifier asks every node of a program for
the fake tensor it produces."""

from __future__ import annotations

from typing import Callable

import torch
from torch._guards import detect_fake_mode


def record_fake_value(node: torch.fx.Node, compute: Callable, *inputs: torch.fx.Node) -> None:
    """Set ``node.meta["val"]`` to ``compute`` of the ``inputs`` nodes' fake values, under their fake mode;
    nothing when they have none (a graph not traced by torch.export)."""
    values = tuple(source.meta.get("val") for source in inputs)
    fake_mode = detect_fake_mode(values)
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = compute(*values)
