"""Configs of common models by name, for planning without downloading them (``specontext plan``)."""

from __future__ import annotations

from pathlib import Path

KNOWN_MODELS = {
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         max_position_embeddings=131072, tie_word_embeddings=False)),
    "llama-3.1-70b": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                          max_position_embeddings=131072, tie_word_embeddings=False)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       max_position_embeddings=131072, tie_word_embeddings=False)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                     max_position_embeddings=131072, tie_word_embeddings=False)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                         max_position_embeddings=32768, tie_word_embeddings=False)),
}


def load_config(name_or_path: str):
    """A built-in name (``KNOWN_MODELS``), a config.json, or a directory holding one."""
    import transformers

    if name_or_path in KNOWN_MODELS:
        class_name, fields = KNOWN_MODELS[name_or_path]
        return getattr(transformers, class_name)(**fields)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--model {name_or_path!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a config.json or a "
            "directory holding one"
        )
    return transformers.AutoConfig.from_pretrained(str(path))
