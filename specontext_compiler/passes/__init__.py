"""Graph passes over the exported step, one per file; :mod:`.pipeline` owns their order."""

from .annotate_attention import AttentionInfo, annotate_attention, attention_infos
from .insert_retrieval_head import insert_retrieval_head, retrieve_node
from .pipeline import default_passes, run_passes
from .sparsify_attention import sparsify_attention

__all__ = [
    "AttentionInfo",
    "annotate_attention",
    "attention_infos",
    "default_passes",
    "insert_retrieval_head",
    "retrieve_node",
    "run_passes",
    "sparsify_attention",
]
