"""Memory accounting: what the model, the KV cache and the runtime need, against the GPU budget."""

from .footprint import head_dim, kv_bytes_per_token, num_kv_heads, weight_bytes
from .memory_model import HeadCost, MemoryTerm, ModelShape, memory_terms
from .planner import MemoryPlan, plan_memory

__all__ = ["HeadCost", "MemoryPlan", "MemoryTerm", "ModelShape", "head_dim", "kv_bytes_per_token", "memory_terms",
           "num_kv_heads", "plan_memory", "weight_bytes"]
