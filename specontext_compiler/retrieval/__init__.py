"""The retrieval head (the paper's algorithm level): scores every context token once per decode step.

``build_head`` turns the compile options into a head: the draft-free head of the target's own layer
(:mod:`.target_layer_head`), or a baseline (:mod:`.baselines`) for comparison.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from .base import RetrievalHead
from .calibrated_head import CalibratedHead, is_calibrated_head, load_head
from .draft_model_head import DraftModelHead
from .eagle3 import Eagle3Head, is_eagle3_checkpoint
from .baselines import OracleTopK, QuestPages, StreamingLLM
from .selection import resolve_token_budget, select_tokens
from .target_layer_head import TargetLayerHead, default_layers


def build_head(config, model) -> RetrievalHead:
    """The retrieval head (or baseline) that ``config.selection`` and ``config.draft`` name."""
    from ..planning import num_kv_heads

    target = model.config
    if config.selection == "streaming":
        return StreamingLLM()
    if config.selection == "quest":
        return QuestPages()
    if config.selection == "oracle":
        return OracleTopK()
    draft = config.draft
    if draft is None:
        num_layers = target.num_hidden_layers
        layers = config.retrieval_layer
        if layers is None:
            layers = default_layers(num_layers, getattr(target, "layer_types", None))
        elif isinstance(layers, int):
            layers = (layers,)
        for layer in layers:
            if layer >= num_layers:
                raise ValueError(f"retrieval_layer={layer} but the model has layers 0..{num_layers - 1}")
        return TargetLayerHead(layers)
    if isinstance(draft, RetrievalHead):
        return draft
    if isinstance(draft, CalibratedHead):
        return draft.head
    if isinstance(config.retrieval_layer, tuple):
        raise ValueError(f"retrieval_layer={config.retrieval_layer}: a draft scores with one layer; pass an int")
    if isinstance(draft, PreTrainedModel):
        check_homologous(model, draft)
        return DraftModelHead(draft, num_kv_heads(target), layer=config.retrieval_layer)
    path = Path(draft)
    if is_calibrated_head(path):
        return load_head(path, model)
    if is_eagle3_checkpoint(path):
        return Eagle3Head(path, model.get_input_embeddings(), target.num_hidden_layers, num_kv_heads(target))
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=model.dtype).to(model.device)
        check_homologous(model, loaded)
        return DraftModelHead(loaded.eval(), num_kv_heads(target), layer=config.retrieval_layer)
    raise ValueError(
        f"draft={str(draft)!r} is not a model, an EAGLE-3 checkpoint directory, a model directory or a calibrated "
        "head directory; accepted: None (a head from the target itself), a transformers model, or such a directory"
    )


def check_homologous(target, draft) -> None:
    """A draft must read the target's token ids: same vocabulary size."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}): a draft must share the target's tokenizer"
        )


__all__ = [
    "DraftModelHead",
    "Eagle3Head",
    "OracleTopK",
    "QuestPages",
    "RetrievalHead",
    "StreamingLLM",
    "TargetLayerHead",
    "build_head",
    "default_layers",
    "resolve_token_budget",
    "select_tokens",
]
