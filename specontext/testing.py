"""Tiny random models, padded prompt batches and long documents for tests and benchmarks (see
:mod:`specontext_compiler.testing`)."""

from specontext_compiler.testing import (
    CODE_WORDS,
    TINY_FAMILIES,
    TOPICS,
    code_word_document,
    cpu_peak_bytes,
    padded_batch,
    peaked_llama,
    tiny_model,
    write_eagle3_checkpoint,
)

__all__ = ["CODE_WORDS", "TINY_FAMILIES", "TOPICS", "code_word_document", "cpu_peak_bytes", "padded_batch", "peaked_llama",
           "tiny_model", "write_eagle3_checkpoint"]
