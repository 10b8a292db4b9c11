"""Which layers keep their full KV on the GPU (``offload=``), and the GPU bytes that placement needs.

A resident layer holds all B x L tokens of its KV on the GPU. An offloaded layer holds on the GPU only
its recent ring (``window`` tokens) and its slots (the selection + a scratch row + the new token's
row); its full KV is in host memory. While any layer is offloaded, dense steps (prefill chunks) stage
one offloaded layer's full KV at a time on the GPU, so one more layer's worth is needed.

``offload="auto"`` keeps the *first* layers resident, as many as fit: prefetches of later layers then
have the most compute to hide behind. (The sympy planner of the memory-model issue replaces this
closed form with one that also counts activations and workspace.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import format_bytes


@dataclass(frozen=True)
class Placement:
    offloaded: tuple[int, ...]
    device_bytes: int  # weights + the KV buffers the GPU holds under this placement


def kv_device_bytes(num_layers: int, offloaded: int, layer_token_bytes: int, batch: int, tokens: int,
                    slot_tokens: int, window: int) -> int:
    """GPU bytes of the KV buffers when ``offloaded`` of ``num_layers`` layers live in host memory."""
    full = layer_token_bytes * batch * tokens
    fast = layer_token_bytes * batch * (slot_tokens + 2 + window)
    staging = full if offloaded else 0
    return (num_layers - offloaded) * full + offloaded * fast + staging


def place_layers(
    offload,
    num_layers: int,
    budget_bytes: int,
    weight_bytes: int,
    layer_token_bytes: int,
    batch: int,
    tokens: int,
    slot_tokens: int,
    window: int,
) -> Placement:
    """Resolve ``offload`` ("none", "all", "auto" or layer indices) for a sequence of ``tokens`` tokens.

    Raises ValueError, stating what is needed, when the placement does not fit ``budget_bytes``.
    """
    def needed(count: int) -> int:
        return weight_bytes + kv_device_bytes(num_layers, count, layer_token_bytes, batch, tokens, slot_tokens, window)

    if offload == "auto":
        for count in range(num_layers + 1):  # fewest offloaded layers that fit
            if needed(count) <= budget_bytes:
                return Placement(tuple(range(num_layers - count, num_layers)), needed(count))
        offloaded = tuple(range(num_layers))
    elif offload == "none":
        offloaded = ()
    elif offload == "all":
        offloaded = tuple(range(num_layers))
    else:
        offloaded = tuple(sorted(offload))
        bad = [layer for layer in offloaded if layer >= num_layers]
        if bad:
            raise ValueError(f"offload lists layers {bad}; the model has layers 0..{num_layers - 1}")
    total = needed(len(offloaded))
    if total > budget_bytes:
        kv = total - weight_bytes
        hint = "" if len(offloaded) == num_layers else "; offload='auto' or 'all' keeps less KV on the GPU"
        raise ValueError(
            f"budget is too small for batch {batch} x {tokens} tokens with {len(offloaded)} of {num_layers} layers "
            f"offloaded: needs at least {format_bytes(total)} (weights {format_bytes(weight_bytes)}, KV on the GPU "
            f"{format_bytes(kv)}); budget is {format_bytes(budget_bytes)}{hint}"
        )
    return Placement(offloaded, total)
