"""Graph passes over the exported step, one per file; :mod:`.pipeline` owns their order."""

from .annotate_attention import AttentionInfo, annotate_attention, attention_infos
from .pipeline import default_passes, run_passes

__all__ = ["AttentionInfo", "annotate_attention", "attention_infos", "default_passes", "run_passes"]
