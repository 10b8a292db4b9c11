"""Tensor parallelism across the GPUs of one host: which ranks, which process group, what each rank holds.

``specontext.compile(model, budget, tensor_parallel=N)`` runs in each of N processes started by
``torchrun --nproc-per-node N``. Each process is one rank: it holds a contiguous block of 1/N of every
layer's KV heads with their query groups, and 1/N of every MLP's width (Megatron-style,
:mod:`.sharding`), keeps its own KV cache for its heads, and runs its own retrieval head and memory plan
for them. Embeddings, norms and the LM head are replicated: that is the simplest layout, and after the
all-reduce that ends each MLP every rank holds the same hidden state, so every rank computes the same
logits and picks the same tokens with no further communication.

This module holds what the sharding, the planner and the runtime share: the checks of the requested
size (before any work), the per-rank view of a config (``rank_config``: what the memory plan and the
KV store see), the weight bytes of one rank, and :func:`join_process_group`, which initializes
``torch.distributed`` from torchrun's environment when the caller has not (NCCL on CUDA, gloo on the
CPU).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ACCEPTED = "an int >= 1 (1: one process; N > 1: N processes, e.g. torchrun --nproc-per-node N)"
#: What torchrun sets in every process it starts (``init_process_group``'s ``env://`` reads them).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def validate_tensor_parallel(value) -> int:
    """``tensor_parallel``: a positive int (bool refused: True is not a process count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"tensor_parallel must be {ACCEPTED}; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"tensor_parallel must be {ACCEPTED}; got {value}")
    return value


def _kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def check_divisible(config, size: int) -> None:
    """Each rank takes whole heads and an equal block of the MLP: ``size`` must divide the attention heads,
    the KV heads and the MLP width. Raises ValueError naming the count and the sizes that would do."""
    counts = (("attention heads (num_attention_heads)", int(config.num_attention_heads)),
              ("KV heads (num_key_value_heads)", _kv_heads(config)),
              ("MLP width (intermediate_size)", int(config.intermediate_size)))
    common = math.gcd(*(count for _, count in counts))
    for what, count in counts:
        if count % size:
            accepted = [d for d in range(1, common + 1) if common % d == 0]
            raise ValueError(f"tensor_parallel={size} does not divide the model's {count} {what}: each rank takes an "
                             f"equal block of whole heads and of the MLP; accepted for this model: {accepted}")


def shard_config_in_place(config, size: int) -> None:
    """``config`` as one rank sees it: 1/size of the attention heads, KV heads and MLP width; ``head_dim`` set
    explicitly (families that derive it from hidden_size / heads would otherwise get it wrong)."""
    head_dim = _head_dim(config)
    kv_heads = _kv_heads(config)
    config.head_dim = head_dim
    config.num_attention_heads = int(config.num_attention_heads) // size
    config.num_key_value_heads = kv_heads // size
    config.intermediate_size = int(config.intermediate_size) // size


def rank_config(config, size: int):
    """A copy of ``config`` as one of ``size`` ranks sees it (:func:`shard_config_in_place`)."""
    check_divisible(config, size)
    copied = copy.deepcopy(config)
    shard_config_in_place(copied, size)
    return copied


def rank_weight_bytes(model: torch.nn.Module, size: int) -> int:
    """Bytes of the parameters and buffers one of ``size`` ranks holds: 1/size of every sharded projection
    (biases of row-parallel projections stay whole: they are added once, after the all-reduce), the rest
    whole."""
    from .planning import weight_bytes
    from .sharding import sharded_projections

    total = weight_bytes(model)
    if size == 1:
        return total
    saved = 0
    for projection in sharded_projections(model):
        tensors = [projection.module.weight]
        if projection.column and projection.module.bias is not None:
            tensors.append(projection.module.bias)
        saved += sum(t.numel() * t.element_size() for t in tensors) * (size - 1) // size
    return total - saved


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: ``size`` ranks, this one ``rank``, on ``device``."""

    size: int
    rank: int
    group: object  # a torch.distributed ProcessGroup (every rank of the world)
    device: torch.device

    def block(self, count: int) -> slice:
        """This rank's contiguous block of ``count`` items (heads, rows): the rank-th of ``size`` equal ones."""
        width = count // self.size
        return slice(self.rank * width, (self.rank + 1) * width)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor; eager, for the runtime's own decisions)."""
        import torch.distributed._functional_collectives as funcol

        reduced = funcol.all_reduce(tensor, "sum", self.group)
        return reduced.wait() if isinstance(reduced, funcol.AsyncCollectiveTensor) else reduced

    def check_replicated(self, what: str, value: bytes) -> None:
        """Raise ValueError unless ``value`` (a prompt, a generator's state) is the same on every rank: the
        ranks' shards combine into one model only while they compute on the same tokens."""
        digest = int.from_bytes(hashlib.sha256(value).digest()[:7], "little")  # fits an int64
        both = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if int(both[0]) != digest or int(-both[1]) != digest:
            raise ValueError(f"tensor_parallel={self.size}: {what} differs between ranks (rank {self.rank} holds "
                             f"another); every rank must call generate with the same prompt and, for sampling, the "
                             "same generator state (torch.manual_seed(s) on every rank)")


def check_same_inputs(tp: TensorParallel, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: bool) -> None:
    """Before a ``generate``: every rank got the same prompt and, when sampling, holds the same generator state
    (each rank samples its own token from the same logits; they agree only if their generators do)."""
    tp.check_replicated("the prompt (input_ids, attention_mask)",
                        input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes())
    if sampling:
        device = input_ids.device
        state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
        tp.check_replicated(f"the random generator's state on {device}", state.numpy().tobytes())


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank_device(backend: str) -> torch.device:
    """Where this rank's shard lives: ``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo."""
    if "nccl" not in backend:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"the process group's backend is {backend!r}, which needs CUDA devices; this machine has "
                         "none; accepted: a gloo process group on the CPU")
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
    return torch.device("cuda", local)


def check_environment(size: int) -> None:
    """Without a process group, torchrun's environment must be there and name ``size`` processes: checked
    before anything starts (:func:`join_process_group` initializes the group from it)."""
    if not dist.is_available():
        raise ValueError(f"tensor_parallel={size} needs torch.distributed, which this torch build lacks; accepted: "
                         "tensor_parallel=1")
    if dist.is_initialized():
        world = dist.get_world_size()
        if world != size:
            raise ValueError(f"tensor_parallel={size} but the process group has {world} processes; accepted: "
                             f"tensor_parallel={world} (every process of the group is one rank)")
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"tensor_parallel={size} needs {size} processes, one per GPU, and this one has no process group and no "
            f"torchrun environment (missing {', '.join(missing)}); start them with torchrun --nproc-per-node {size} "
            "(or call torch.distributed.init_process_group first), or use tensor_parallel=1")
    world = os.environ["WORLD_SIZE"]
    if world != str(size):
        raise ValueError(f"tensor_parallel={size} but torchrun started WORLD_SIZE={world} processes; accepted: "
                         f"tensor_parallel={world} (or torchrun --nproc-per-node {size})")


def join_process_group(size: int, backend: str | None = None) -> TensorParallel:
    """This process's :class:`TensorParallel`: the caller's process group if one is initialized, else one
    initialized from torchrun's environment with ``backend`` (default NCCL where CUDA is available, else
    gloo). Every rank of the world is one tensor-parallel rank."""
    check_environment(size)
    if not dist.is_initialized():
        backend = backend or _default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before NCCL binds its communicator
        dist.init_process_group(backend)
        logger.info("initialized a %s process group of %d ranks from torchrun's environment", backend, size)
    device = rank_device(dist.get_backend())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return TensorParallel(size, dist.get_rank(), dist.group.WORLD, device)
