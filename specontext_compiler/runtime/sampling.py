"""Generation settings -> logits processors, stopping criteria and token selection, the way transformers'
``generate`` does.

We build transformers' own processor and criteria classes in transformers' order, and merge the caller's
``logits_processor`` / ``stopping_criteria`` into them as ``GenerationMixin._merge_criteria_processor_list``
does, so that greedy and seeded sampling give the same tokens as ``model.generate``; settings this engine
does not implement (beam search, assisted decoding, constraints, ...) are refused with a clear error
instead of being ignored.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

logger = logging.getLogger(__name__)

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
    "top_h",
    "watermarking_config",
    "token_healing",
)

# generate() keyword arguments that are not GenerationConfig fields.
EXTRA_GENERATE_KWARGS = ("streamer", "generation_config", "logits_processor", "stopping_criteria", "tokenizer")


@dataclass
class DecodingSettings:
    """A resolved generation configuration for one ``generate`` call."""

    config: GenerationConfig
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    do_sample: bool
    # The caller's processors, merged into the config's at build_logits_processors.
    logits_processor: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    # Criteria the decode loop evaluates on the sequences after each new token (empty: only its own EOS and
    # length checks, with no extra work per step).
    stopping_criteria: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)
    # The loop checks ``eos_token_ids`` itself (transformers' EosTokenCriteria, unless the caller's replaced it).
    check_eos: bool = True
    # Finished rows get ``pad_token_id``: transformers does so when any criterion has an ``eos_token_id``.
    pad_finished: bool = True


# transformers generates this many new tokens when neither max_new_tokens nor max_length is set.
DEFAULT_NEW_TOKENS = 20


def resolve_generation_config(
    base: GenerationConfig | None,
    generation_config: GenerationConfig | None,
    prompt_length: int,
    kwargs: dict,
    max_positions: int | None = None,
    *,
    logits_processor: LogitsProcessorList | list | None = None,
    stopping_criteria: StoppingCriteriaList | list | None = None,
    tokenizer: Any = None,
) -> DecodingSettings:
    """Merge ``generation_config`` (or the model's) with keyword overrides, as ``generate`` does, and take
    the caller's ``logits_processor`` and ``stopping_criteria`` (``tokenizer``: for ``stop_strings``)."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig; got {type(generation_config).__name__}")
    config = copy.deepcopy(generation_config if generation_config is not None else (base or GenerationConfig()))
    if generation_config is not None and base is not None:
        # transformers: fields the caller's config leaves unset come from the model's generation config.
        config.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
    defaults = _with_global_defaults(GenerationConfig())
    _with_global_defaults(config)
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unknown keyword argument(s) {sorted(unused)}; accepted: GenerationConfig's "
                        f"fields and {', '.join(EXTRA_GENERATE_KWARGS)}")
    for name in _UNSUPPORTED_FIELDS:
        if getattr(config, name, None) != getattr(defaults, name, None):
            raise ValueError(
                f"generation setting {name}={getattr(config, name)!r} is not supported by SpeContext generate "
                "(greedy and multinomial sampling with temperature/top_k/top_p/min_p, repetition_penalty, "
                "min_length/min_new_tokens, stop_strings, max_time, remove_invalid_values, renormalize_logits, and "
                "custom logits_processor/stopping_criteria are)"
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
    settings = DecodingSettings(config, max_new_tokens, eos_token_ids, pad, bool(config.do_sample),
                                logits_processor=LogitsProcessorList(_checked_list("logits_processor", logits_processor)))
    _resolve_stopping_criteria(settings, _checked_list("stopping_criteria", stopping_criteria), tokenizer,
                               prompt_length, max_positions)
    return settings


def _with_global_defaults(config: GenerationConfig) -> GenerationConfig:
    """Fill the fields still unset with transformers' model-agnostic defaults, as ``generate`` does (5.x:
    sampling then keeps the top 50 tokens unless ``top_k`` says otherwise). ``max_length`` stays unset: with
    neither it nor ``max_new_tokens`` given, 20 new tokens (``DEFAULT_NEW_TOKENS``), as transformers does."""
    global_defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if global_defaults is not None:  # transformers 5.x; 4.x configs carry their defaults themselves
        config.update(**{k: v for k, v in global_defaults().items() if k != "max_length"}, defaults_only=True)
    return config


def _checked_list(name: str, value) -> list:
    """``value`` (None, or a list of callables, as transformers' LogitsProcessorList / StoppingCriteriaList)
    as a list; anything else is refused here rather than failing mid-decode."""
    kind = "LogitsProcessorList" if name == "logits_processor" else "StoppingCriteriaList"
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a transformers {kind} (or a list of callables); got {type(value).__name__}")
    for item in value:
        if not callable(item):
            raise TypeError(f"{name} must hold callables (transformers {kind[:-4]} objects); got an item of type "
                            f"{type(item).__name__}")
    return list(value)


def merge_custom(default: list, custom: list, kind: str) -> list:
    """transformers' ``GenerationMixin._merge_criteria_processor_list`` (5.x): a custom item of the same
    type as a default one replaces it in place (with a warning), the other custom items follow the defaults.
    (transformers 4.x raised on such a duplicate; 5.x lets the custom one win.)"""
    if len(custom) == 0:
        return default
    merged = type(default)()
    for item in default:
        replacement = next((c for c in custom if type(c) is type(item)), None)
        if replacement is not None:
            logger.warning("a custom %s of type %s was passed to generate() but generate() also creates one from "
                           "its settings; the custom one takes precedence", kind, type(item).__name__)
        merged.append(item if replacement is None else replacement)
    for item in custom:
        if item not in merged:
            merged.append(item)
    return merged


def _resolve_stopping_criteria(settings: DecodingSettings, custom: list, tokenizer, prompt_length: int,
                               max_positions: int | None) -> None:
    """transformers' ``_get_stopping_criteria``: max length, stop strings, EOS, merged with ``custom``.

    The default length and EOS criteria are what the decode loop checks natively (its step count and an
    ``isin`` on the new token), so they are left out of ``settings.stopping_criteria``: with neither custom
    criteria nor stop strings that list is empty and the loop does no extra work per step."""
    config = settings.config
    stop_strings = config.stop_strings
    defaults = StoppingCriteriaList()
    length = MaxLengthCriteria(max_length=prompt_length + settings.max_new_tokens, max_position_embeddings=max_positions)
    defaults.append(length)
    if config.max_time is not None:
        defaults.append(MaxTimeCriteria(max_time=config.max_time))
    if stop_strings is not None:
        strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        accepted = "a non-empty str or a non-empty list of non-empty str"
        if not (isinstance(strings, (list, tuple)) and all(isinstance(s, str) for s in strings)):
            raise TypeError(f"stop_strings must be {accepted}; got {stop_strings!r}")
        if not strings or not all(strings):
            raise ValueError(f"stop_strings must be {accepted}; got {stop_strings!r}")
        if tokenizer is None:
            # transformers' own message (GenerationMixin._get_stopping_criteria)
            raise ValueError(
                "There are one or more stop strings, either in the arguments to `generate` or in the model's generation "
                "config, but we could not locate a tokenizer. When generating with stop strings, you must pass the "
                "model's tokenizer to the `tokenizer` argument of `generate`."
            )
        defaults.append(StopStringCriteria(stop_strings=stop_strings, tokenizer=tokenizer))
    eos = EosTokenCriteria(eos_token_id=settings.eos_token_ids) if settings.eos_token_ids else None
    if eos is not None:
        defaults.append(eos)
    merged = merge_custom(defaults, custom, "stopping criteria")
    for item in merged:
        if isinstance(item, MaxLengthCriteria) and item is not length and item.max_length > length.max_length:
            logger.warning("a custom MaxLengthCriteria(max_length=%d) allows more than the %d tokens generate reserved "
                           "(prompt + max_new_tokens): generation stops at %d", item.max_length, length.max_length,
                           length.max_length)
    settings.stopping_criteria = StoppingCriteriaList(item for item in merged if item is not length and item is not eos)
    settings.check_eos = eos is not None and any(item is eos for item in merged)
    settings.pad_finished = any(hasattr(item, "eos_token_id") for item in merged)
    if settings.pad_finished and settings.pad_token_id is None:
        raise ValueError("a stopping criterion has an eos_token_id (finished rows are then padded) but pad_token_id is "
                         "not set: pass pad_token_id (or eos_token_id) to generate")


def build_logits_processors(settings: DecodingSettings, prompt_length: int, device: torch.device) -> LogitsProcessorList:
    """transformers' processors and warpers for ``settings``, in ``generate``'s order (``_get_logits_processor``):
    the processors, then the caller's merged into them, then the sampling warpers. A caller's warper of the
    same type as a config-made one is therefore not merged but applied as well, as transformers does."""
    config = settings.config
    eos = torch.tensor(settings.eos_token_ids, device=device) if settings.eos_token_ids else None
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.min_length is not None and eos is not None and config.min_length > 0:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens is not None and eos is not None and config.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos, device=device))
    if config.remove_invalid_values is True:
        processors.append(InfNanRemoveLogitsProcessor())
    processors = merge_custom(processors, settings.logits_processor, "logits processor")
    if settings.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.renormalize_logits is True:  # last, as in transformers
        processors.append(LogitNormalization())
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
