"""One matrix product for the projections that read the same input: q/k/v, and gate/up.

A decode step's projections are matrix-vector products, each bound by reading its weight once; one
product over the concatenated weights reads the same bytes in fewer, larger kernels. Measured on an
H200 (``benchmarks/step_profile.py``, docs/benchmarks.md): the Llama-3.1-8B shape's 32 layers of
projections and its LM head take 4.44 ms with the HF model's separate projections and 3.91 ms with q/k/v
and gate/up concatenated (3.38 vs 3.83 TB/s).

The concatenated weight becomes the storage of the originals: each original parameter is rebound to a
view of its rows (same values, same ``Parameter`` object), so memory does not grow and the user's model
computes what it did. While a step is exported (:func:`fused_projections`), each group's modules are
swapped for slices of one fused product; the swap is undone afterwards. Families that already fuse
(Phi-3's ``qkv_proj``, ``gate_up_proj``) have no group to fuse.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Sibling projections that read the same input, in their output order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_FUSED = "_specontext_fused_projections"  # parent module -> {group: FusedProjection}, kept across exports


class FusedProjection(torch.nn.Module):
    """``F.linear`` over concatenated weights; :class:`ProjectionSlice` members return its parts.

    The members are called one after another on the same input tensor (``q_proj(x)``, ``k_proj(x)``,
    ...): the first call computes the fused product, the others take their slice of it. A call on a
    different tensor computes afresh, so the result is right in any calling order.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._input, self._output = x, F.linear(x, self.weight, self.bias)
        start, end = self.bounds[index]
        out = self._output[..., start:end]
        if index == len(self.bounds) - 1:  # the last member: let go of the input and the product
            self._input = self._output = None
        return out


class ProjectionSlice(torch.nn.Module):
    """Stands in for one projection of a fused group while the step is exported."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        self._fused = [fused]  # a list: not a submodule (the parent registers the fused module once)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.index)


def _fusible(modules: list) -> bool:
    if not all(type(m) is torch.nn.Linear for m in modules):  # exact type: quantized subclasses keep theirs
        return False
    first = modules[0].weight
    return (
        first.device.type != "meta"
        and all(m.in_features == modules[0].in_features for m in modules)
        and all(m.weight.dtype == first.dtype and m.weight.device == first.device for m in modules)
        and len({m.bias is None for m in modules}) == 1
    )


def _views_of(fused: FusedProjection, modules: list[torch.nn.Linear]) -> bool:
    """Whether the modules' weights are still views of ``fused`` (not if the model was moved since)."""
    storage = fused.weight.untyped_storage().data_ptr()
    return all(m.weight.untyped_storage().data_ptr() == storage for m in modules)


def _fuse(modules: list[torch.nn.Linear]) -> FusedProjection:
    """Concatenate the weights and rebind each module's parameters to views of the concatenation."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in modules])
        bias = None if modules[0].bias is None else torch.cat([m.bias for m in modules])
        sizes = [m.out_features for m in modules]
        start = 0
        for m, size in zip(modules, sizes):
            m.weight.data = weight[start : start + size]
            if bias is not None:
                m.bias.data = bias[start : start + size]
            start += size
    return FusedProjection(weight, bias, sizes)


def drop_fused_groups(parent: torch.nn.Module) -> None:
    """Forget the fused groups cached on ``parent`` (its projections are about to be replaced: tensor
    parallelism's shards); the next export fuses what it then holds."""
    parent.__dict__.pop(_FUSED, None)


@contextlib.contextmanager
def fused_projections(model: torch.nn.Module):
    """Within the block, every fusible group of ``model`` (:data:`GROUPS`) computes one matrix product."""
    swapped = []
    try:
        for parent in list(model.modules()):
            for group in GROUPS:
                modules = [getattr(parent, name, None) for name in group]
                if not _fusible(modules):
                    continue
                fused_groups = parent.__dict__.setdefault(_FUSED, {})
                if group not in fused_groups or not _views_of(fused_groups[group], modules):
                    fused_groups[group] = _fuse(modules)  # once per model: later exports reuse the storage
                fused = fused_groups[group]
                name = "fused_" + "_".join(group)
                parent.add_module(name, fused)
                swapped.append((parent, name, None))
                for index, (attribute, module) in enumerate(zip(group, modules)):
                    setattr(parent, attribute, ProjectionSlice(fused, index))
                    swapped.append((parent, attribute, module))
        if swapped:
            logger.info("fused %d projection groups", sum(1 for *_, m in swapped if m is None))
        yield
    finally:
        for parent, attribute, module in reversed(swapped):
            if module is None:
                delattr(parent, attribute)
            else:
                setattr(parent, attribute, module)
