"""Megatron-style sharding of a shadow model's layers for tensor parallelism (:mod:`.tensor_parallel`).

Rank r of N keeps, in every decoder layer:

* the rows of q/k/v (or Phi-3's fused ``qkv_proj``) of a contiguous block of N-th of the KV heads and
  their query groups (column-parallel: q heads are laid out group after group, so the r-th block of
  query heads is exactly the query groups of the r-th block of KV heads);
* the matching input columns of ``o_proj`` (row-parallel): its product is a partial sum, and one
  all-reduce after it gives every rank the attention block's whole output;
* the r-th N-th of the rows of ``gate_proj``/``up_proj`` (Phi-3's ``gate_up_proj``: of each half) and
  the matching columns of ``down_proj``, with one all-reduce after the MLP.

The all-reduce is ``torch.distributed``'s functional collective, so the exported step holds it as a
node, ``_c10d_functional.all_reduce`` followed by ``_c10d_functional.wait_tensor``, whose result the
residual add reads (dead-code elimination keeps it; tests/test_tensor_parallel.py checks the graph).
Row-parallel biases are added once, after the reduction.

The shards are new parameters of the shadow model (:func:`~.capture.shadow_model`), on this rank's device;
the user's model keeps its own. Sharding runs before the step is exported, so projection fusion
(:mod:`.projection_fusion`) concatenates the rank's shards, not the whole weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .projection_fusion import drop_fused_groups
from .retrieval.base import decoder_of
from .tensor_parallel import TensorParallel, shard_config_in_place

logger = logging.getLogger(__name__)


class RowParallelLinear(torch.nn.Module):
    """One rank's ``o_proj`` or ``down_proj``: the product over its block of input features, summed over the
    ranks by an all-reduce; the bias (whole on every rank) added once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        # Traced by torch.export as all_reduce + wait_tensor; the sum is what the residual add reads.
        total = funcol.all_reduce(F.linear(x, self.weight), "sum", self.group)
        return total if self.bias is None else total + self.bias


@dataclass(frozen=True)
class Projection:
    """One projection to shard: ``parent.name`` is the ``torch.nn.Linear``; ``parts`` the sizes of the
    sections along the sharded dimension (output rows for column-parallel, input columns for
    row-parallel), each of which the rank takes its block of."""

    parent: torch.nn.Module
    name: str
    column: bool
    parts: tuple[int, ...]

    @property
    def module(self) -> torch.nn.Linear:
        return getattr(self.parent, self.name)


def _attention_projections(attention, q_width: int, kv_width: int) -> list[Projection]:
    if hasattr(attention, "qkv_proj"):  # Phi-3: q, k, v stacked in one matrix
        columns = [Projection(attention, "qkv_proj", True, (q_width, kv_width, kv_width))]
    else:
        columns = [Projection(attention, "q_proj", True, (q_width,)), Projection(attention, "k_proj", True, (kv_width,)),
                   Projection(attention, "v_proj", True, (kv_width,))]
    return columns + [Projection(attention, "o_proj", False, (q_width,))]


def _mlp_projections(mlp, width: int) -> list[Projection]:
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up stacked
        columns = [Projection(mlp, "gate_up_proj", True, (width, width))]
    else:
        columns = [Projection(mlp, "gate_proj", True, (width,)), Projection(mlp, "up_proj", True, (width,))]
    return columns + [Projection(mlp, "down_proj", False, (width,))]


def sharded_projections(model: torch.nn.Module) -> list[Projection]:
    """Every projection of ``model``'s decoder layers that tensor parallelism shards, checked: each must be a
    plain ``torch.nn.Linear`` of the size the config says (ValueError otherwise, naming it)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, kv_heads * head_dim
    found = []
    for index, layer in enumerate(decoder_of(model).layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            raise ValueError(f"tensor_parallel: decoder layer {index} ({type(layer).__name__}) has no self_attn or mlp "
                             "to shard; accepted: the supported families' decoder layers")
        for projection in _attention_projections(attention, q_width, kv_width) + _mlp_projections(mlp, config.intermediate_size):
            module = getattr(projection.parent, projection.name, None)
            where = f"layer {index}'s {projection.name}"
            if type(module) is not torch.nn.Linear:  # exact type: a quantized subclass would lose its format
                raise ValueError(f"tensor_parallel shards torch.nn.Linear projections; {where} is "
                                 f"{type(module).__name__}; accepted: unquantized transformers models")
            size = module.weight.shape[0 if projection.column else 1]
            if size != sum(projection.parts):
                raise ValueError(f"tensor_parallel: {where} has {size} {'rows' if projection.column else 'columns'}, "
                                 f"the config says {sum(projection.parts)}")
            found.append(projection)
    return found


def _block(tensor: torch.Tensor, parts: tuple[int, ...], dim: int, tp: TensorParallel) -> torch.Tensor:
    """This rank's block of each section of ``tensor`` along ``dim``, concatenated, copied to its device."""
    pieces, start = [], 0
    for size in parts:
        block = tp.block(size)
        pieces.append(tensor.detach().narrow(dim, start + block.start, block.stop - block.start))
        start += size
    return torch.cat([piece.to(tp.device) for piece in pieces], dim=dim)  # new memory, even for one piece


def _to_device(model: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of the shadow ``model`` not on ``device`` replaced by a copy there (tied
    weights stay tied); the user's model, whose tensors these were, keeps them where they are."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in table.items():
                if tensor is None or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    copied = tensor.detach().to(device)
                    moved[id(tensor)] = torch.nn.Parameter(copied, requires_grad=False) if wrap else copied
                table[name] = moved[id(tensor)]


def shard_model(model: torch.nn.Module, tp: TensorParallel) -> None:
    """Shard the shadow ``model`` in place for rank ``tp.rank`` of ``tp.size`` (module docstring): its sharded
    projections become new parameters holding this rank's blocks, its config counts this rank's heads and
    MLP width, and everything else is copied to ``tp.device`` if it is not there."""
    projections = sharded_projections(model)
    for projection in projections:
        module = projection.module
        # A fused group cached by an earlier compile of the user's model holds the whole weights: not this rank's.
        drop_fused_groups(projection.parent)
        if projection.column:
            weight = _block(module.weight, projection.parts, 0, tp)
            bias = None if module.bias is None else _block(module.bias, projection.parts, 0, tp)
            shard = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta",
                                    dtype=weight.dtype)
            shard.weight = torch.nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                shard.bias = torch.nn.Parameter(bias, requires_grad=False)
        else:
            weight = _block(module.weight, projection.parts, 1, tp)
            bias = None if module.bias is None else module.bias.detach().to(tp.device)
            shard = RowParallelLinear(weight, bias, tp.group)
        setattr(projection.parent, projection.name, shard)  # on the shadow's module: the user's keeps its own
    config = model.config
    shard_config_in_place(config, tp.size)
    for layer in decoder_of(model).layers:
        if hasattr(layer.self_attn, "num_key_value_heads"):  # Phi-3 slices its fused qkv by it
            layer.self_attn.num_key_value_heads = config.num_key_value_heads
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = config.intermediate_size
    _to_device(model, tp.device)
    logger.info("rank %d of %d: %d projections sharded (%d KV heads, %d query heads, MLP width %d per rank) on %s",
                tp.rank, tp.size, len(projections), config.num_key_value_heads, config.num_attention_heads,
                config.intermediate_size, tp.device)
