"""The public verb, :func:`compile`, and what it returns, :class:`SpeContextModel`."""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .capture import CapturedStep, bound_data_dependent_sizes, check_supported, export_step, shadow_model
from .config import (DEFAULT_TOKEN_BUDGET, BudgetError, CompileConfig, GuardSettings, check_cuda_graph,
                     check_offload_layers, format_bytes)
from .kernels import TRITON_AVAILABLE
from .passes import attention_infos, default_passes, run_passes
from .planning import kv_bytes_per_token, weight_bytes
from .planning.memory_model import ModelShape
from .retrieval import build_head
from .runtime.accuracy_guard import AccuracyGuard, guard_preference
from .runtime.attention_runtime import AttentionRuntime, SparseSettings
from .runtime.engine import GenerationEngine
from .runtime.kv_store import KVStore
from .runtime.memory_manager import MemoryManager, head_cost
from .runtime.sampling import EXTRA_GENERATE_KWARGS, resolve_generation_config
from .sharding import shard_model, sharded_projections
from .tensor_parallel import (TensorParallel, check_divisible, check_environment, check_same_inputs,
                              join_process_group, rank_weight_bytes)

logger = logging.getLogger(__name__)


def compile(
    model: PreTrainedModel, budget: int | str, *, token_budget: int | float | None = DEFAULT_TOKEN_BUDGET, **options
) -> "SpeContextModel":
    """Compile a Hugging Face causal LM for long-context decoding under a GPU memory ``budget``.

    Args:
        model: a transformers causal LM of a supported family (Llama, Qwen2, Qwen3, Mistral, Phi-3,
            Gemma 2, Gemma 3 text). It is not modified: the compiled model shares its weights.
        budget: GPU memory budget, as bytes (int) or a string such as ``"24GB"``, ``"24GiB"``, ``"512MB"``.
        token_budget: tokens each decode step attends to (an int, or a float fraction of the context in
            (0, 1]); default 2048 (contexts up to it are attended densely); ``None`` is dense attention.
        **options: ``sink_tokens`` (default 4) and ``local_window`` (default 64), always attended;
            ``draft`` (the retrieval head: None for one derived from the target, a homologous model or
            its directory, an EAGLE-3 checkpoint directory, or a calibrated head); ``retrieval_layer``;
            ``selection`` ("retrieval_head", or a baseline: "streaming", "quest", "oracle");
            ``offload`` ("auto" (default): the memory plan, docs/memory.md: the first layers that fit stay on
            the GPU, others keep their KV in host memory or move there as the sequence grows, and a step
            that runs out of GPU memory is re-planned and retried; "none"; "all"; or a list of layer indices); ``elastic`` (default True: offloaded
            layers load only what each step's selection adds); ``sticky_margin`` (default 0.0, off: the
            score bonus of tokens the offloaded layers' slots hold, so near-ties load nothing); ``host_budget`` (default None: not
            bounded; host memory for the offloaded layers' KV, refused before any work past it); ``prefill_chunk``
            (prompt tokens per prefill step summed over the batch, default 2048); ``progress`` (prefill bar); ``compile_decode_step`` (default None: on CUDA
            devices with Triton installed the fixed-shape decode step goes through Inductor before its CUDA
            graph, faster steps for a minute of compilation per process and batch kind, 1 or more; False:
            captured as exported);
            ``cuda_graph`` (default None: fixed-shape decode steps replayed from a CUDA graph on CUDA
            devices; False: every decode step eager); ``tensor_parallel`` (default 1; N > 1: run this call in
            each of N processes, ``torchrun --nproc-per-node N``: each shards the layers' heads and MLP
            and keeps the KV of its heads, ``budget`` is per GPU; specontext_compiler/tensor_parallel.py).

    Returns:
        A :class:`SpeContextModel` with ``generate`` and ``__call__`` like the HF model.
    """
    config = CompileConfig.from_arguments(budget, token_budget, **options)
    check_supported(model)
    check_offload_layers(config.offload, model.config.num_hidden_layers)
    size = config.tensor_parallel
    if size == 1:
        check_cuda_graph(config, model.get_input_embeddings().weight.device)
    else:
        check_divisible(model.config, size)
        if config.draft is not None:  # a draft scores for every KV group; a rank attends to its own only
            raise ValueError(f"tensor_parallel={size} works with the head derived from the target (draft=None) or a "
                             f"baseline (selection=...); got draft={type(config.draft).__name__}")
        sharded_projections(model)  # every projection a plain Linear of the config's size
        check_environment(size)
    weights = rank_weight_bytes(model, size)
    if weights > config.budget_bytes:
        per = f" per GPU (1/{size} of the layers' projections, the embeddings and LM head whole)" if size > 1 else ""
        raise BudgetError(
            f"budget is too small: the model needs at least {format_bytes(weights)}{per} for its weights alone, "
            f"plus its KV cache; budget is {format_bytes(config.budget_bytes)}"
        )
    tensor_parallel = None
    if size > 1:
        tensor_parallel = join_process_group(size)
        check_cuda_graph(config, tensor_parallel.device)  # the rank's device is known once the group is
    return SpeContextModel(model, config, tensor_parallel)


class SpeContextModel:
    """A compiled model: an exported step graph with attention as ops, and the runtime that runs it."""

    def __init__(self, model: PreTrainedModel, config: CompileConfig, tensor_parallel: TensorParallel | None = None):
        started = time.perf_counter()
        self.config = config
        self.tensor_parallel = tensor_parallel
        self.model = shadow_model(model)
        if tensor_parallel is not None:  # before the head reads the layers and fusion concatenates the shards
            shard_model(self.model, tensor_parallel)
        self.generation_config = self.model.generation_config
        embeddings = self.model.get_input_embeddings().weight
        head = None
        if config.token_budget is not None:
            head = build_head(config, self.model)
        self.head = head  # _capture reads the head's auxiliary layers (EAGLE-3)
        step = self._capture(last_only=True)
        self._assemble(self.model.config, step, head, embeddings.device, embeddings.dtype, int(embeddings.shape[0]),
                       weight_bytes(self.model))
        logger.info(
            "compiled %s: %d attention layers, weights %s, KV %s/token, in %.1f s",
            type(model).__name__, len(self.layers), format_bytes(self.weight_bytes),
            format_bytes(self.kv_bytes_per_token), time.perf_counter() - started,
        )

    @classmethod
    def from_parts(cls, config: CompileConfig, hf_config, generation_config, step: CapturedStep, head,
                   device: torch.device, dtype: torch.dtype, vocab_size: int, weights: int) -> "SpeContextModel":
        """A compiled model from an already transformed step (``specontext.load``): no HF model object."""
        self = cls.__new__(cls)
        self.config = config
        self.tensor_parallel = None
        self.model = None
        self.generation_config = generation_config
        self._assemble(hf_config, step, head, device, dtype, vocab_size, weights)
        return self

    def _assemble(self, hf_config, step: CapturedStep, head, device, dtype, vocab_size: int, weights: int) -> None:
        """The runtime around a transformed step: KV store, attention runtime, memory manager, engine."""
        config = self.config
        self.hf_config = hf_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.max_positions = getattr(hf_config, "max_position_embeddings", None)
        self.weight_bytes = weights
        self.kv_bytes_per_token = kv_bytes_per_token(hf_config, dtype)
        self.head = head
        sparse = None
        if config.token_budget is not None:
            sparse = SparseSettings(config.token_budget, config.sink_tokens, config.local_window, config.sticky_margin)
        self.step = step
        self._step_all: CapturedStep | None = None
        self.layers = attention_infos(self.step.graph_module)
        # The recent ring holds the window plus the token before it: every always-attended recent token.
        self.window = config.local_window + 1
        store = KVStore(len(self.layers), [self.device] * len(self.layers), self.dtype, window=self.window, elastic=config.elastic)
        self.runtime = AttentionRuntime(store, sparse, self.head)
        self.set_guard(config.guard)
        shape = ModelShape.from_config(hf_config, dtype, weights)
        self.memory = MemoryManager(
            self.runtime, shape, config.budget_bytes, config.offload, config.token_budget, self.window,
            config.prefill_chunk, head_cost(self.head, shape), host_budget_bytes=config.host_budget_bytes,
        )
        self.engine = GenerationEngine(
            self.step.program.module(), self.runtime, self.device, config.prefill_chunk, config.progress,
            self.kv_bytes_per_token, self.memory, {info.layer: info.sliding_window for info in self.layers if info.sliding_window},
        )
        if config.cuda_graph is False:
            self.engine.decode_mode = "eager"
        if self.tensor_parallel is not None:
            # A step retried on one rank would pair its all-reduces with the other ranks' next ones: out of
            # memory ends the rank's generate instead (the others wait in their next all-reduce).
            self.memory.max_retries = 0
        # Inductor's CUDA code is Triton: without it the default leaves the step as exported.
        if config.compile_decode_step or (config.compile_decode_step is None and self.device.type == "cuda"
                                          and TRITON_AVAILABLE):
            self.engine.compile_fixed_shape_step()

    def set_guard(self, settings: GuardSettings | None) -> None:
        """Turn the accuracy guard on with ``settings`` (runtime/accuracy_guard.py), or off (None); from the
        next sequence on. Dense attention (``token_budget=None``) has nothing to guard."""
        runtime = self.runtime
        if settings is None or runtime.sparse is None:
            runtime.guard = None
            return
        runtime.guard = AccuracyGuard(settings, layer=None)
        runtime.guard.tensor_parallel = self.tensor_parallel  # every rank judges all KV heads' coverage
        runtime.guard_preferred = guard_preference(settings, self.head, len(self.layers))
        runtime.guard_candidates = {info.layer for info in self.layers if not info.sliding_window}

    def _capture(self, last_only: bool) -> CapturedStep:
        aux_layers = self.head.aux_layers if self.head is not None else ()
        step = export_step(self.model, last_only=last_only, aux_layers=aux_layers)
        run_passes(step.graph_module, default_passes(sparse=self.config.token_budget is not None))
        bound_data_dependent_sizes(step.program)
        return step

    @property
    def graph(self) -> torch.fx.GraphModule:
        """The transformed step graph (last-position logits), for inspection."""
        return self.step.graph_module

    @property
    def stats(self) -> dict:
        """Counters of the last ``generate``: steps, prefill/decode seconds, tokens/s, KV bytes stored,
        tokens attended and KV bytes read per decode step."""
        return dict(self.engine.stats)

    # -- input checks (before any work) ---------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor of shape [batch, tokens]; got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, tokens]; got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token per row")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary; accepted ids are 0..{self.vocab_size - 1}")
        if self.max_positions is not None and input_ids.shape[1] > self.max_positions:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens is longer than the model's max_position_embeddings "
                f"({self.max_positions}); accepted: at most {self.max_positions} tokens"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a tensor of 0/1; got {type(attention_mask).__name__}")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
            other = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
            if other.numel():
                raise ValueError(f"attention_mask holds {other.flatten()[0].item()}; accepted values are 0 (padding) and 1 (token)")
            if not bool(attention_mask.any(dim=-1).all()):
                raise ValueError("empty prompt: a row of attention_mask has no token (all padding)")
        return input_ids.to(self.device), attention_mask.to(self.device, torch.long)

    def _check_ranks_agree(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sampling: bool) -> None:
        """Tensor parallelism: every rank was given the same tokens (and, sampling, has the same generator state)."""
        if self.tensor_parallel is not None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            check_same_inputs(self.tensor_parallel, input_ids, mask, sampling)

    def _check_budget(self, batch: int, prompt: int, total: int) -> None:
        """Plan where the layers' KV lives for ``batch`` sequences growing from ``prompt`` to ``total``
        tokens under the budget (raises ValueError saying what it needs if it cannot)."""
        self.placement = self.memory.plan(batch, prompt, total)

    # -- the HF-like surface --------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Like ``model.generate`` for decoder LMs; returns the LongTensor [B, T + N] (or a
        ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``).

        ``kwargs``: GenerationConfig fields, and ``generation_config``, ``streamer``, ``logits_processor`` (a
        ``LogitsProcessorList``), ``stopping_criteria`` (a ``StoppingCriteriaList``) and ``tokenizer`` (needed
        by ``stop_strings``), with transformers' meaning and order."""
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        extras = {name: kwargs.pop(name) for name in EXTRA_GENERATE_KWARGS if name in kwargs}
        settings = resolve_generation_config(
            self.generation_config, extras.get("generation_config"), input_ids.shape[1], kwargs, self.max_positions,
            logits_processor=extras.get("logits_processor"), stopping_criteria=extras.get("stopping_criteria"),
            tokenizer=extras.get("tokenizer"),
        )
        self._check_ranks_agree(input_ids, attention_mask, settings.do_sample)
        total = input_ids.shape[1] + settings.max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            logger.warning("prompt + max_new_tokens = %d exceeds max_position_embeddings (%d)", total, self.max_positions)
        # Planned at the sequence's length; generate reserves up to 15 tokens more (reserved_tokens), which
        # the plan's workspace term covers.
        self._check_budget(input_ids.shape[0], input_ids.shape[1], total)
        return self.engine.generate(input_ids, attention_mask, settings, streamer=extras.get("streamer"))

    def replay(self, input_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoding: the logits [B, N, V] that predicted each token of ``continuation``
        after the prompt ``input_ids`` (no padding), each step with this model's sparse selection.
        Measures agreement with a reference continuation without the cascade of free-running decoding."""
        input_ids, _ = self._check_inputs(input_ids, None)
        continuation, _ = self._check_inputs(continuation, None)
        if continuation.shape[0] != input_ids.shape[0]:
            raise ValueError(f"continuation batch {continuation.shape[0]} differs from input_ids batch {input_ids.shape[0]}")
        self._check_ranks_agree(torch.cat([input_ids, continuation], dim=1), None, sampling=False)
        self._check_budget(input_ids.shape[0], input_ids.shape[1], input_ids.shape[1] + continuation.shape[1])
        return self.engine.replay(input_ids, continuation)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """A forward over a fresh sequence; ``.logits`` is [B, T, V] like an HF forward."""
        if kwargs:
            raise TypeError(f"SpeContextModel.__call__ takes input_ids and attention_mask; got {sorted(kwargs)}")
        if self.model is None:
            raise TypeError("this model was loaded from an exported artifact, which holds the step that generate and "
                            "replay run (last-position logits); the full-logits forward needs specontext.compile(model)")
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        self._check_ranks_agree(input_ids, attention_mask, sampling=False)
        self._check_budget(input_ids.shape[0], input_ids.shape[1], input_ids.shape[1])
        if self._step_all is None:
            self._step_all = self._capture(last_only=False)
            self._step_all_fn = self._step_all.program.module()
        logits = self.engine.forward(self._step_all_fn, input_ids, attention_mask)
        return CausalLMOutputWithPast(logits=logits)

    def _model_name(self) -> str:
        if self.model is not None:
            return type(self.model).__name__
        return (getattr(self.hf_config, "architectures", None) or [self.hf_config.model_type])[0]

    def __repr__(self) -> str:
        return (
            f"SpeContextModel({self._model_name()}, layers={len(self.layers)}, "
            f"budget={format_bytes(self.config.budget_bytes)}, token_budget={self.config.token_budget})"
        )
