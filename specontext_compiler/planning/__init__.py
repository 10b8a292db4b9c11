"""Memory accounting: what the model, the KV cache and the runtime need, against the GPU budget."""

from .footprint import head_dim, kv_bytes_per_token, num_kv_heads, weight_bytes

__all__ = ["head_dim", "kv_bytes_per_token", "num_kv_heads", "weight_bytes"]
