"""Generation settings -> logits processors and token selection, the way transformers' ``generate`` does.

We build transformers' own processor classes in transformers' order so that greedy and seeded sampling
give the same tokens as ``model.generate``; settings this engine does not implement (beam search,
assisted decoding, constraints, ...) are refused with a clear error instead of being ignored.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# GenerationConfig fields that change the decoding algorithm in ways this engine does not implement.
_UNSUPPORTED_FIELDS = (
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "force_words_ids",
    "sequence_bias",
    "guidance_scale",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "num_return_sequences",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "stop_strings",
    "top_h",
)

# generate() keyword arguments that are not GenerationConfig fields.
EXTRA_GENERATE_KWARGS = ("streamer", "generation_config")


@dataclass
class DecodingSettings:
    """A resolved generation configuration for one ``generate`` call."""

    config: GenerationConfig
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    do_sample: bool


# transformers generates this many new tokens when neither max_new_tokens nor max_length is set.
DEFAULT_NEW_TOKENS = 20


def resolve_generation_config(
    base: GenerationConfig | None,
    generation_config: GenerationConfig | None,
    prompt_length: int,
    kwargs: dict,
    max_positions: int | None = None,
) -> DecodingSettings:
    """Merge ``generation_config`` (or the model's) with keyword overrides, as ``generate`` does."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig; got {type(generation_config).__name__}")
    config = copy.deepcopy(generation_config if generation_config is not None else (base or GenerationConfig()))
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unknown keyword argument(s) {sorted(unused)}")
    defaults = GenerationConfig()
    for name in _UNSUPPORTED_FIELDS:
        if getattr(config, name, None) != getattr(defaults, name, None):
            raise ValueError(
                f"generation setting {name}={getattr(config, name)!r} is not supported by SpeContext generate "
                "(greedy and multinomial sampling with temperature/top_k/top_p/min_p, repetition_penalty, "
                "min_length/min_new_tokens are)"
            )
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif config.max_length is not None:
        max_new_tokens = config.max_length - prompt_length
    else:
        max_length = prompt_length + DEFAULT_NEW_TOKENS
        if max_positions is not None:
            max_length = min(max_length, max_positions)
        max_new_tokens = max(max_length - prompt_length, 0)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int; got {max_new_tokens!r}")
    eos = config.eos_token_id
    eos_token_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = config.pad_token_id
    if pad is None and eos_token_ids:
        pad = eos_token_ids[0]
    return DecodingSettings(config, max_new_tokens, eos_token_ids, pad, bool(config.do_sample))


def build_logits_processors(settings: DecodingSettings, prompt_length: int, device: torch.device) -> LogitsProcessorList:
    """transformers' processors and warpers for ``settings``, in ``generate``'s order."""
    config = settings.config
    eos = torch.tensor(settings.eos_token_ids, device=device) if settings.eos_token_ids else None
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.min_length is not None and eos is not None and config.min_length > 0:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens is not None and eos is not None and config.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos, device=device))
    if settings.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return processors


def select_next_tokens(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """[B, V] processed scores -> [B] token ids (argmax, or one multinomial draw per row)."""
    if do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return greedy_tokens(scores, two_stage=scores.is_cuda)


@functools.lru_cache(maxsize=None)
def _argmax_chunk(vocab: int) -> int | None:
    """A chunk length in [256, 4096] that divides ``vocab`` into at least 8 chunks (None: none does)."""
    return next((chunk for chunk in range(256, 4097) if vocab % chunk == 0 and vocab // chunk >= 8), None)


def greedy_tokens(scores: torch.Tensor, two_stage: bool) -> torch.Tensor:
    """``torch.argmax(scores, dim=-1)`` for [B, V] scores. ``two_stage``: the maximum of each chunk of the
    vocabulary first, then of the chunks' maxima (the first of equal maxima, as argmax). CUDA's argmax
    reduces a row in one thread block: over a 128K vocabulary that took 27 us per batch-1 decode step on an
    H200 (docs/benchmarks.md); the chunks' maxima spread the reduction over many blocks."""
    chunk = _argmax_chunk(scores.shape[-1]) if two_stage else None
    if chunk is None:
        return torch.argmax(scores, dim=-1)
    values, within = scores.unflatten(-1, (-1, chunk)).max(dim=-1)  # [B, V / chunk]
    best = values.argmax(dim=-1, keepdim=True)
    return (best * chunk + within.gather(-1, best)).squeeze(-1)
