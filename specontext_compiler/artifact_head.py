"""The retrieval head of an exported artifact as data: ``head.json`` (kind and settings) plus tensors.

:func:`head_description` writes it; :func:`head_from_description` checks every field against
``HEADS`` (what each kind needs) and ``TARGET_LAYER_OPTIONS`` (keys added since) and rebuilds the head, raising :class:`HeadDescriptionError` (the
loader adds the file's name) for anything else.
"""

from __future__ import annotations

import torch

from .retrieval.target_layer_head import COMBINE


class HeadDescriptionError(ValueError):
    """``head.json`` holds a value the loader does not accept."""


def is_int(value) -> bool:
    """An int and not a bool (JSON's true/false load as bools, which are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def head_description(head) -> tuple[dict, dict[str, torch.Tensor]]:
    from .retrieval import OracleTopK, QuestPages, StreamingLLM, TargetLayerHead

    if head is None:
        return {"kind": "none"}, {}
    if isinstance(head, TargetLayerHead):
        if head.query != "previous":  # its fit reads the target's modules, which an artifact does not hold
            raise ValueError(f"export does not support the draft-free head with query={head.query!r} yet; "
                             "accepted: query='previous' (the default)")
        return {"kind": "target_layer", "layers": list(head.layers), "prefill_prior": head.prefill_prior,
                "query_weight": head.query_weight, "lookahead": head.lookahead, "lookbehind": head.lookbehind,
                "prior_window": head.prior_window, "prior_from": head.prior_from, "combine": head.combine}, {}
    if isinstance(head, StreamingLLM):
        return {"kind": "streaming"}, {}
    if isinstance(head, QuestPages):
        return {"kind": "quest", "page_size": head.page_size}, {}
    if isinstance(head, OracleTopK):
        return {"kind": "oracle"}, {}
    raise ValueError(
        f"export does not support a {type(head).__name__} retrieval head yet; supported: the draft-free head "
        "(draft=None, or a calibrated draft-free head) and the baselines (streaming, quest, oracle)"
    )


HEADS = {  # head.json: kind -> {key: (check, what is accepted)}
    "none": {}, "streaming": {}, "oracle": {},
    "quest": {"page_size": (lambda v: is_int(v) and v > 0, "a positive integer")},
    "target_layer": {
        "layers": (lambda v: isinstance(v, list) and v and all(is_int(i) and i >= 0 for i in v), "layer indices"),
        "prefill_prior": (lambda v: isinstance(v, bool), "true or false"),
        "query_weight": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    },
}
#: target_layer keys later versions added: key -> (value when absent, as in artifacts from before, check,
#: what is accepted).
TARGET_LAYER_OPTIONS = {
    "lookahead": (0, lambda v: is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
    "lookbehind": (0, lambda v: is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
    "prior_window": (1, lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
    "prior_from": (0.0, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
                   "a number in [0, 1)"),
    "combine": ("sum", lambda v: v in COMBINE, ", ".join(map(repr, COMBINE))),
}


def head_from_description(description: dict, tensors: dict[str, torch.Tensor], layers: int | None):
    from .retrieval import OracleTopK, QuestPages, StreamingLLM, TargetLayerHead

    kind = description.get("kind")
    if kind not in HEADS:
        raise HeadDescriptionError(f"unknown retrieval head kind {kind!r}; accepted: {', '.join(HEADS)}")
    for key, (accepts, what) in HEADS[kind].items():
        if key not in description or not accepts(description[key]):
            raise HeadDescriptionError(f"{key} is {description.get(key, 'missing')!r}; accepted: {what}")
    if kind == "target_layer":
        if layers is not None and max(description["layers"]) >= layers:
            raise HeadDescriptionError(f"layers {description['layers']} name a layer the model's {layers} lack")
        options = {}
        for key, (absent, accepts, what) in TARGET_LAYER_OPTIONS.items():
            options[key] = description.get(key, absent)
            if not accepts(options[key]):
                raise HeadDescriptionError(f"{key} is {options[key]!r}; accepted: {what}")
        return TargetLayerHead(tuple(description["layers"]), prefill_prior=description["prefill_prior"],
                               query_weight=description["query_weight"], **options)
    return {"none": lambda: None, "streaming": StreamingLLM, "oracle": OracleTopK,
            "quest": lambda: QuestPages(description["page_size"])}[kind]()
