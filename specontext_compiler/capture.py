"""Capture: turn a Hugging Face causal LM into an exported step graph whose attention calls are ops.

Three pieces:

* ``specontext`` is registered with transformers' ``AttentionInterface`` (every attention call becomes
  one ``specontext::attention`` node carrying its layer index) and with ``AttentionMaskInterface``
  (transformers' SDPA mask builder, so padded batches get their padding mask; an unregistered name
  silently gets ``None``).
* :class:`RuntimeCacheView` stands in for the HF cache inside the step: it stores nothing (the runtime
  does) and only reports how many tokens precede the new ones, so masks and offsets come out right.
* :func:`export_step` exports ``logits = step(input_ids, attention_mask, position_ids)`` with
  ``torch.export`` (non-strict), with dynamic batch, new-token and total-token dimensions, and the
  projections that read one input (q/k/v, gate/up) as one matrix product (:mod:`.projection_fusion`).

The user's model computes what it did: :func:`shadow_model` makes a structural copy that shares every
parameter and buffer but has its own deep-copied config. The one change is where some weights live:
fused projections rebind the parameters to views of one concatenated weight (same values, same
``Parameter`` objects), so memory does not grow.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops  # noqa: F401  (registers the custom ops)
from .projection_fusion import fused_projections

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "specontext"

# model_type -> family name. These are the families whose attention goes through the HF attention
# interface with standard q/k/v layouts, and which the test-suite checks against transformers.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "phi3": "Phi-3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
}


def supported_families_text() -> str:
    return ", ".join(f"{name} (model_type={key!r})" for key, name in SUPPORTED_FAMILIES.items())


def check_supported(model: object) -> None:
    """Raise ``TypeError`` unless ``model`` is a supported Hugging Face decoder-only causal LM."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"specontext.compile needs a Hugging Face causal LM (a transformers PreTrainedModel), got "
            f"{type(model).__name__}; supported families: {supported_families_text()}"
        )
    config = model.config
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise TypeError(f"{type(model).__name__} is not a decoder-only causal LM; supported: {supported_families_text()}")
    if model_type not in SUPPORTED_FAMILIES or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); supported causal LM "
            f"families: {supported_families_text()}"
        )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls for ``attn_implementation="specontext"``."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.specontext.attention(
        query,
        key,
        value,
        int(module.layer_idx),
        attention_mask,
        float(scale),
        float(softcap or 0.0),
        int(sliding_window or 0),
    )
    return out.transpose(1, 2).contiguous(), None


def register_with_transformers() -> None:
    """Make ``attn_implementation="specontext"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register_with_transformers()


class RuntimeCacheView(Cache):
    """A cache that holds nothing: it tells transformers the number of past tokens.

    The runtime stores the KV. Inside the step, transformers asks the cache for the past length (for
    position ids and mask sizes) and hands it the new k/v (which it returns unchanged, so the attention
    op receives only the new tokens).
    """

    is_compileable = False

    def __init__(self, past_length: int | torch.SymInt):
        # Cache.__init__ insists on layer objects; this view has none on purpose.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.past_length = past_length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        return self.past_length + query_length, 0

    def get_query_offset(self, layer_idx: int = 0):
        return self.past_length

    @property
    def is_sliding(self) -> list[bool]:
        return []


def shadow_model(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` sharing its parameters and buffers, with its own config set to specontext."""
    memo: dict[int, object] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    shadow = copy.deepcopy(model, memo)
    shadow.eval()
    shadow.set_attn_implementation(ATTN_IMPLEMENTATION)
    return shadow


class StepModule(torch.nn.Module):
    """``logits = step(input_ids, attention_mask, position_ids)``: one forward of new tokens.

    ``attention_mask`` is the 2D padding mask over past + new tokens, ``position_ids`` the new tokens'
    positions. ``last_only`` keeps only the last position's logits (prefill and decode need no more;
    at 128K tokens the full logits would dwarf the KV of a step).
    """

    def __init__(self, model: PreTrainedModel, last_only: bool, aux_layers: tuple[int, ...] = ()):
        super().__init__()
        self.model = model
        self.last_only = last_only
        self.aux_layers = aux_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        past = attention_mask.shape[1] - input_ids.shape[1]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=RuntimeCacheView(past),
            use_cache=True,
            logits_to_keep=1 if self.last_only else 0,
            output_hidden_states=bool(self.aux_layers),
        )
        if not self.aux_layers:
            return out.logits
        # hidden_states[i] is the input of decoder layer i (0: the embeddings), over every new token.
        return (out.logits, *(out.hidden_states[i] for i in self.aux_layers))


@dataclass
class CapturedStep:
    """An exported step and the facts the passes need about it."""

    program: torch.export.ExportedProgram
    last_only: bool
    aux_layers: tuple[int, ...] = ()

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.program.graph_module


def export_step(model: PreTrainedModel, last_only: bool, aux_layers: tuple[int, ...] = ()) -> CapturedStep:
    """Export the step of a shadow model with dynamic batch, new-token and total-token sizes.

    The example inputs are small (batch 2, 3 new tokens after 2 past ones) so every size stays symbolic.
    Running the export needs no KV: the attention op's fake implementation gives shapes only.
    """
    device = model.get_input_embeddings().weight.device
    batch, new, past = 2, 3, 2
    input_ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    attention_mask = torch.ones(batch, past + new, dtype=torch.long, device=device)
    position_ids = torch.arange(past, past + new, device=device).expand(batch, new).contiguous()
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    new_dim = torch.export.Dim("new_tokens", min=1, max=1 << 20)
    total_dim = torch.export.Dim("total_tokens", min=1, max=1 << 22)
    dynamic_shapes = {
        "input_ids": {0: batch_dim, 1: new_dim},
        "attention_mask": {0: batch_dim, 1: total_dim},
        "position_ids": {0: batch_dim, 1: new_dim},
    }
    module = StepModule(model, last_only, aux_layers)
    with torch.no_grad(), fused_projections(model):
        program = torch.export.export(
            module,
            (),
            {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids},
            dynamic_shapes=dynamic_shapes,
            strict=False,
        )
    logger.info("exported %s step: %d graph nodes", "last-logits" if last_only else "all-logits", len(program.graph.nodes))
    return CapturedStep(program, last_only, aux_layers)


#: The largest token count a step's data-dependent sizes take (the exported total-token bound).
MAX_TOKENS = 1 << 22


def bound_data_dependent_sizes(program: torch.export.ExportedProgram) -> None:
    """Give every data-dependent size the passes introduced (the retrieval's selection width, an unbacked
    symbol of ``specontext::retrieve``'s output) a range in the program: ``torch.export.load`` needs one
    per symbol, and the passes edit the graph, not the program's range table."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from torch.utils._sympy.value_ranges import ValueRanges

    for node in program.graph.nodes:
        for symbol in free_unbacked_symbols(node.meta.get("val")):
            program.range_constraints.setdefault(symbol, ValueRanges(0, MAX_TOKENS))
