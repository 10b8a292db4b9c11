"""The engine: chunked prefill, the decode loop, sampling, streaming and stats.

It drives a captured step graph (``logits = step(input_ids, attention_mask, position_ids)``) with the
runtime that owns the KV cache activated, the way gpt-fast's ``generate`` drives its model: prefill the
prompt in chunks, then one step per new token.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..config import MIN_PREFILL_CHUNK
from . import step_transaction
from .attention_runtime import AttentionRuntime
from .context import activate
from .host_ahead import REDO_PREVIOUS, LaggedStopCheck, LoopState, cyclic_gc_paused, rng_state
from .cuda_graph_decode import DecoderTotals, GraphDecoder, eligible
from .step_compile import compile_fixed_shape_step
from .step_timer import StepTimer
from .sampling import DecodingSettings, build_logits_processors, select_next_tokens

logger = logging.getLogger(__name__)

StepFn = Callable[..., torch.Tensor]


def prompt_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a (left-)padded prompt, counted over real tokens only, as transformers does."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


@dataclass
class Prefilled:
    """A prompt after :meth:`GenerationEngine.prefill`: its tokens, mask, last logits and the time it took."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor
    seconds: float


CAPACITY_ALIGNMENT = 16


def prefill_row_chunk(prefill_chunk: int, batch: int) -> int:
    """Prompt tokens of each row that one prefill step feeds: ``prefill_chunk`` tokens over the batch,
    rounded down to a multiple of 16, at least 16. Steps of one size whatever the batch let the caching
    allocator reuse the same blocks, and keep a step's activations (its mask: tokens x context) from
    growing with the batch; a multiple of 16 keeps every step's key length but the last aligned, as
    CUDA's memory-efficient attention wants a mask (it pads an unaligned one with a copy)."""
    return max(MIN_PREFILL_CHUNK, prefill_chunk // batch // MIN_PREFILL_CHUNK * MIN_PREFILL_CHUNK)


def reserved_tokens(total: int) -> int:
    """Tokens a ``generate`` reserves for sequences of ``total``: rounded up to a multiple of 16. The
    reservation is the fixed-shape step's capacity (its mask's width, the rows of its KV buffers), and
    Triton specializes a kernel's integer arguments, such as the mask's row stride, on divisibility by 16:
    an unaligned capacity compiles the kernels again for each new prompt length."""
    return -(-total // CAPACITY_ALIGNMENT) * CAPACITY_ALIGNMENT


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GenerationEngine:
    """Runs step graphs over one runtime.

    Args:
        step: the captured step returning the last position's logits, [B, 1, V].
        runtime: the attention runtime whose KV store the step's attention ops use.
        device: where inputs go.
        prefill_chunk: prompt tokens per prefill step over the batch (:func:`prefill_row_chunk`).
        progress: show a progress bar when the prompt takes more than one chunk.
        kv_bytes_per_token: K+V bytes of one token over all layers (for the bytes-read counter).
        memory: the :class:`~.memory_manager.MemoryManager` (None: fixed placement, no retries).
        sliding_windows: layer -> window of each sliding-window layer (fixed-shape decode waits until the
            context exceeds them all).

    ``decode_mode``: "graph" replays decode steps from a CUDA graph once their shapes stay fixed
    (:mod:`.cuda_graph_decode`; the default on CUDA), "fixed" runs those fixed-shape steps eagerly (what
    the CPU tests compare), "eager" never leaves the eager runtime (the default on the CPU).
    """

    DECODE_MODES = ("graph", "fixed", "eager")

    def __init__(
        self,
        step: StepFn,
        runtime: AttentionRuntime,
        device: torch.device,
        prefill_chunk: int,
        progress: bool,
        kv_bytes_per_token: int = 0,
        memory=None,
        sliding_windows: dict[int, int] | None = None,
    ):
        self.step = step
        self.sliding_windows = dict(sliding_windows or {})
        self.decode_mode = "graph" if device.type == "cuda" else "eager"
        self.decoder: GraphDecoder | None = None
        # What fixed-shape steps call (None: ``step``); e.g. the step under torch.compile.
        self.fixed_shape_step: StepFn | None = None
        self.kv_bytes_per_token = kv_bytes_per_token
        self.runtime = runtime
        self.device = device
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        self.stats: dict[str, float | int] = {}
        self.memory = memory  # MemoryManager: moves layers to host memory as sequences grow, retries on OOM
        self.fixed_shape_abandoned = False
        self.ended_decoders = DecoderTotals()  # this generate's fixed-shape decoders that ended before it did
        self.compile_seconds = 0.0  # this generate's calls of the compiled step that (re)compiled it
        # Time the compute stream's waits on loads inside fixed-shape steps (benchmarks; ``stats``
        # ``graph_prefetch_wait_ms``: the last step's).
        self.time_graph_waits = False
        # Record an event on the compute stream at each decode step (benchmarks; ``stats``
        # ``replayed_step_ms``: the mean interval from a replayed fixed-shape step to the next one).
        self.time_steps = False
        # Read the accuracy guard's checks one step late (None: on a GPU; tests set True), never with a streamer.
        self.lag_guard_reads: bool | None = None

    # -- prefill --------------------------------------------------------------------------------------
    def run_chunks(self, step: StepFn, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_all: bool) -> torch.Tensor:
        """Feed the prompt through ``step`` chunk by chunk (:func:`prefill_row_chunk` tokens of every row
        per step); each chunk's KV lands in the store.

        Returns the logits of every position (``keep_all``) or of the last one.
        """
        total = input_ids.shape[1]
        chunk = prefill_row_chunk(self.prefill_chunk, input_ids.shape[0])
        position_ids = prompt_position_ids(attention_mask)
        starts = range(0, total, chunk)
        bar = tqdm(total=total, desc="prefill", unit="tok", disable=not self.progress or total <= chunk, leave=False)
        outputs = []
        self.runtime.prefilling = True
        try:
            with bar:
                for start in starts:
                    end = min(start + chunk, total)
                    logits = self.run_step(step, input_ids[:, start:end], attention_mask[:, :end], position_ids[:, start:end])
                    if keep_all:
                        outputs.append(logits)
                    bar.update(end - start)
        finally:
            self.runtime.prefilling = False
        return torch.cat(outputs, dim=1) if keep_all else logits

    def run_step(self, step: StepFn, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """One step; auxiliary outputs (hidden states for an EAGLE-3 head) go to the runtime."""
        def call():
            return step(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

        out = call() if self.memory is None else self.memory.run_step(call, attention_mask.shape[1])
        logits, *aux = out if isinstance(out, tuple) else (out,)
        self.runtime.observe_step(input_ids, attention_mask, position_ids, aux)
        return logits

    def forward(self, step_all: StepFn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of every position of a fresh sequence (what an HF forward without cache returns)."""
        self.runtime.reset(input_ids.shape[1], padding_free=bool(attention_mask.all()))
        with torch.no_grad(), activate(self.runtime):
            return self.run_chunks(step_all, input_ids, attention_mask, keep_all=True)

    def replay(self, input_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: prefill ``input_ids`` [B, T], then feed ``continuation`` [B, N] one token per
        decode step (sparse selection applies as in generation). Returns the logits that predicted each
        continuation token, [B, N, V]."""
        mask = torch.ones_like(input_ids)
        return self.replay_from(self.prefill(input_ids, mask, input_ids.shape[1] + continuation.shape[1]), continuation)

    def replay_from(self, prefilled: "Prefilled", continuation: torch.Tensor) -> torch.Tensor:
        """:meth:`replay` after :meth:`prefill` (a prompt without padding)."""
        batch, prompt_length = prefilled.input_ids.shape
        steps = continuation.shape[1]
        attention_mask = torch.ones(batch, prompt_length + steps, dtype=torch.long, device=self.device)
        logits = prefilled.logits
        outputs = []
        if self.runtime.guard is not None:
            self.runtime.guard.reset_stats()
        with torch.no_grad(), activate(self.runtime):
            for index in range(steps):
                outputs.append(logits[:, -1].float())
                if index + 1 == steps:
                    break
                position = torch.full((batch, 1), prompt_length + index, device=self.device)
                logits = self.guarded_step(continuation[:, index:index + 1], attention_mask[:, :prompt_length + index + 1],
                                           position)
        return torch.stack(outputs, dim=1)

    def guarded_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One eager decode step under the accuracy guard (runtime/accuracy_guard.py): a step whose selection
        missed is rolled back and run again densely."""
        guard = self.runtime.guard
        if guard is None:
            return self.run_step(self.step, input_ids, attention_mask, position_ids)
        holding = guard.holding
        state = None if holding or not guard.check_due else step_transaction.begin(self.runtime)
        logits = self.run_step(self.step, input_ids, attention_mask, position_ids)
        if not holding and guard.missed():
            logits = None  # the missed step's tensors go before the redo allocates its own
            step_transaction.roll_back(self.runtime, state)
            guard.trigger()
            logits = self.run_step(self.step, input_ids, attention_mask, position_ids)
            holding = True
        guard.step_done(holding)
        return logits

    def compile_fixed_shape_step(self, inductor_options: dict | None = None) -> None:
        """Fixed-shape decode steps through Inductor (:func:`.step_compile.compile_fixed_shape_step`; the
        seconds spent compiling add to ``compile_seconds``). Prefill and eager steps keep ``step``."""
        self.fixed_shape_step = compile_fixed_shape_step(self.step, self.device, inductor_options, self._compiled)

    def _compiled(self, seconds: float) -> None:
        self.compile_seconds += seconds

    def _fixed_shape_decoder(self, attention_mask: torch.Tensor, capacity: int) -> GraphDecoder | None:
        """A decoder for the rest of the sequence if its steps can run at fixed shape from here on."""
        if eligible(self.runtime, attention_mask.shape[1], capacity, self.sliding_windows) is not None:
            return None
        step = self.step if self.fixed_shape_step is None else self.fixed_shape_step
        decoder = GraphDecoder(step, self.runtime, attention_mask, capacity,
                               use_graph=self.decode_mode == "graph" and self.device.type == "cuda")
        decoder.static.time_waits = self.time_graph_waits
        return decoder

    def _end_decoder_after_miss(self, steps: int) -> None:
        self.decoder.undo_step(steps)
        self.ended_decoders.add(self.decoder)
        self.decoder = None
        self.runtime.guard.trigger()

    def last_step_missed(self) -> bool:
        """Whether the guard check of the last fixed-shape step, read one step late and still pending, finds
        a miss (the loop ends: no step follows to read it after); the step is then taken back."""
        if self.decoder is None or not self.decoder.earlier_step_missed():
            return False
        self._end_decoder_after_miss(steps=1)
        return True

    def _fixed_shape_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position: torch.Tensor,
                          capacity: int, lagged: bool = False):
        """One decode step at fixed shape (the decoder is built at the first one that can be); None where
        the step must run eagerly. ``lagged``: the guard's checks are read one step late, and
        ``REDO_PREVIOUS`` says that the step before this one missed: both were taken back, and the loop
        redoes the earlier one densely.

        Out of GPU memory while the decoder is built, warms up or captures its graph, the decoder is
        abandoned (the step put back what it wrote in place), the memory manager re-plans with twice the
        margin (or raises, for a fixed placement), and this step and the rest of the sequence run eagerly,
        where the manager retries steps that still run out.
        """
        failure = None
        try:
            if self.decoder is None:
                self.decoder = self._fixed_shape_decoder(attention_mask, capacity)
                if self.decoder is None:
                    return None
            logits = self.decoder.decode(tokens, position)
            if lagged and self.decoder.earlier_step_missed():  # this step and the one it checked go back
                self._end_decoder_after_miss(steps=2)
                return REDO_PREVIOUS
            if self.decoder.guard_missed(lagged):  # the guard redoes the step eagerly, densely (guarded_step)
                self._end_decoder_after_miss(steps=1)
                return None
            return logits
        except torch.OutOfMemoryError as error:
            failure = error  # handled below, once the failed step's frames (and tensors) are gone
            traceback.clear_frames(error.__traceback__)  # the traceback stays; its frames' tensors go
        # A check read one step late is read now: a miss takes back the step it measured (this one put back
        # what it wrote), which the loop redoes densely.
        earlier_missed = lagged and self.decoder is not None and self.decoder.earlier_step_missed()
        if earlier_missed:
            self._end_decoder_after_miss(steps=1)
        if self.decoder is not None:
            self.ended_decoders.add(self.decoder)
            self.decoder.abandon()
        else:  # building the decoder failed (its in-place slot map may be half made), or it ended above
            self.runtime.store.slot_map.reset()
        self.decoder = None
        self.fixed_shape_abandoned = True
        length = attention_mask.shape[1] - 1
        logger.warning("out of GPU memory at %d tokens before a fixed-shape decode step could run (%s): the rest "
                       "of the sequence decodes eagerly", length, str(failure).splitlines()[0] if str(failure) else "")
        if self.memory is None:
            raise failure
        self.memory.recover(failure, length)
        return REDO_PREVIOUS if earlier_missed else None

    # -- generate -------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        settings: DecodingSettings,
        streamer=None,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Prefill the prompt, then decode (:meth:`prefill`, :meth:`decode`)."""
        prefilled = self.prefill(input_ids, attention_mask, reserved_tokens(input_ids.shape[1] + settings.max_new_tokens))
        return self.decode(prefilled, settings, streamer)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reserve_tokens: int) -> "Prefilled":
        """Start a new batch of sequences: reset the runtime (KV reserved for ``reserve_tokens``) and feed
        the prompt through the step in chunks. What :meth:`decode` continues from."""
        self.runtime.reset(reserve_tokens, padding_free=bool(attention_mask.all()))
        with torch.no_grad(), activate(self.runtime), cyclic_gc_paused():
            _synchronize(self.device)
            start = time.perf_counter()
            logits = self.run_chunks(self.step, input_ids, attention_mask, keep_all=False)
            _synchronize(self.device)
        return Prefilled(input_ids, attention_mask, logits, time.perf_counter() - start)

    def decode(self, prefilled: "Prefilled", settings: DecodingSettings, streamer=None) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """The decode loop after :meth:`prefill`: one step per new token, from the runtime's state as the
        prefill left it (a caller may roll the runtime back to that state and decode again)."""
        input_ids, attention_mask, logits = prefilled.input_ids, prefilled.attention_mask, prefilled.logits
        config = settings.config
        batch, prompt_length = input_ids.shape
        self.runtime.prefetcher.reset_stats()
        if self.runtime.guard is not None:
            self.runtime.guard.reset_stats()
        processors = build_logits_processors(settings, prompt_length, self.device)
        eos = (torch.tensor(settings.eos_token_ids, device=self.device)
               if settings.eos_token_ids and settings.check_eos else None)
        # Criteria beyond EOS and length (a caller's, stop strings): evaluated on the device after each new
        # token and folded into ``unfinished``, which the (lagged) stop check reads as it reads EOS.
        criteria = settings.stopping_criteria
        tracking = eos is not None or len(criteria) > 0  # rows can finish before max_new_tokens
        pad = settings.pad_finished  # finished rows get pad tokens (transformers: when a criterion has an eos_token_id)
        keep_scores = bool(config.return_dict_in_generate and config.output_scores)
        keep_logits = bool(config.return_dict_in_generate and config.output_logits)
        scores_out: list[torch.Tensor] = []
        logits_out: list[torch.Tensor] = []

        if streamer is not None:
            streamer.put(input_ids.cpu())
        sequences = input_ids
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        position = prompt_position_ids(attention_mask)[:, -1:]
        decode_steps = 0
        if self.decode_mode not in self.DECODE_MODES:
            raise ValueError(f"decode_mode={self.decode_mode!r} is not one of {', '.join(map(repr, self.DECODE_MODES))}")
        self.decoder = None
        self.fixed_shape_abandoned = False  # a fixed-shape step ran out of memory: eager from there on
        self.ended_decoders = DecoderTotals()
        self.compile_seconds = 0.0
        capacity = reserved_tokens(prompt_length + settings.max_new_tokens)
        stop = LaggedStopCheck(self.device)
        # The guard's checks read one step late (on a GPU, without a streamer, which is handed each token at
        # once): the GPU does not idle while the host prepares and launches the step after a check.
        lagged = self.runtime.guard is not None and streamer is None and (
            self.lag_guard_reads if self.lag_guard_reads is not None else self.device.type == "cuda")
        timer = StepTimer(self.time_steps and self.device.type == "cuda")
        attended_before = len(self.runtime.attended_tokens)
        with torch.no_grad(), activate(self.runtime), cyclic_gc_paused():
            _synchronize(self.device)
            t1 = time.perf_counter()
            try:
                index, before_step, earlier = 0, None, None
                while index < settings.max_new_tokens:
                    next_logits = logits[:, -1, :].to(dtype=torch.float32, copy=True)
                    scores = processors(sequences, next_logits)
                    if keep_logits:
                        logits_out.append(next_logits)
                    if keep_scores:
                        scores_out.append(scores)
                    next_tokens = select_next_tokens(scores, settings.do_sample)
                    redo = None
                    # Every row ended last step (these are padding), or after this token: the loop ends.
                    ending = tracking and stop.all_finished_before()
                    if pad:
                        next_tokens = torch.where(unfinished, next_tokens, settings.pad_token_id)
                    if not ending:
                        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
                        if streamer is not None:
                            streamer.put(next_tokens.cpu())
                        if eos is not None:
                            unfinished &= ~torch.isin(next_tokens, eos)
                        if criteria:
                            # transformers passes the kept scores (None unless output_scores) to the criteria.
                            unfinished &= ~criteria(sequences, tuple(scores_out) if keep_scores else None)
                        if tracking:
                            stop.record(unfinished)
                        ending = index + 1 == settings.max_new_tokens or stop.finished_now()
                    if ending:
                        if not (lagged and self.last_step_missed()):
                            break
                        redo = before_step  # the last step's check, read late, missed: that step goes again
                    else:
                        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
                        position = position + 1
                        earlier, before_step = before_step, LoopState(
                            index, decode_steps, sequences, attention_mask, position, unfinished.clone(), next_tokens,
                            len(scores_out), len(logits_out), rng_state(self.device) if lagged and settings.do_sample else None)
                        logits = None
                        timer.step_starts()
                        if self.decode_mode != "eager" and not self.fixed_shape_abandoned:
                            logits = self._fixed_shape_step(next_tokens[:, None], attention_mask, position, capacity,
                                                            lagged)
                        timer.kind(self.decoder is not None and logits is not None and self.decoder.last_replayed)
                        if logits is REDO_PREVIOUS:
                            redo = earlier
                    if redo is not None:
                        # The guard found the step of ``redo`` missed, read one step late: the steps after it
                        # were taken back; the loop returns to before it, and the step runs again densely.
                        sequences, attention_mask, position = redo.sequences, redo.attention_mask, redo.position
                        # ``unfinished`` as it was before the taken-back step: a row that EOS or a criterion
                        # ended on a token chosen from that step's logits goes on.
                        unfinished = redo.unfinished.clone()
                        if tracking:
                            stop.record(unfinished)
                        del scores_out[redo.scores:], logits_out[redo.logits:]
                        redo.restore_rng(self.device)
                        timer.step_starts()
                        timer.kind(False)
                        logits = self.guarded_step(redo.tokens[:, None], attention_mask, position)
                        index, decode_steps = redo.index + 1, redo.steps + 1
                        continue
                    if logits is None:
                        logits = self.guarded_step(next_tokens[:, None], attention_mask, position)
                    decode_steps += 1
                    index += 1
            finally:
                graph_wait_ms = None if self.decoder is None else self.decoder.static.wait_ms()
                if self.decoder is not None:  # the stored lengths catch up with the steps that ran
                    self.decoder.finish()
            timer.step_starts()  # the end of the last step
            _synchronize(self.device)
            t2 = time.perf_counter()
        if streamer is not None:
            streamer.end()

        new_tokens = sequences.shape[1] - prompt_length
        decode_seconds = t2 - t1
        # Tokens each decode step attended to (per sequence and KV head): the selection when sparse.
        decode_attended = self.runtime.attended_tokens[attended_before:] if decode_steps and self.runtime.attended_tokens else [
            prompt_length + 1 + i for i in range(decode_steps)
        ]
        attended = sum(decode_attended) / len(decode_attended) if decode_attended else 0.0
        self.stats = {
            "batch": batch,
            "prompt_tokens": prompt_length,
            "new_tokens": new_tokens,
            "steps": decode_steps,
            "prefill_seconds": prefilled.seconds,
            "decode_seconds": decode_seconds,
            "prefill_tokens_per_s": batch * prompt_length / max(prefilled.seconds, 1e-9),
            "tokens_per_s": batch * decode_steps / decode_seconds if decode_steps else 0.0,
            "ms_per_step": 1e3 * decode_seconds / decode_steps if decode_steps else 0.0,
            "kv_bytes": self.runtime.store.nbytes(),
            "attended_tokens_per_step": attended,
            "kv_bytes_read_per_step": attended * batch * self.kv_bytes_per_token,
            "kv_bytes_allocated": self.runtime.store.allocated_bytes(),
            "kv_device_bytes": self.runtime.store.device_bytes(),
            **self.runtime.prefetcher.stats(),
            "fixed_shape_abandoned": self.fixed_shape_abandoned,
            **self.ended_decoders.with_decoder(self.decoder).stats(),
            "compile_seconds": self.compile_seconds,
            **({} if graph_wait_ms is None else {"graph_prefetch_wait_ms": graph_wait_ms}),
            **timer.stats(),
            **({"guard": False} if self.runtime.guard is None else self.runtime.guard.stats()),
        }
        logger.info(
            "generated %d x %d tokens: prefill %.2f s, decode %.1f tok/s", batch, new_tokens, prefilled.seconds,
            self.stats["tokens_per_s"]
        )
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(
                sequences=sequences,
                scores=tuple(scores_out) if keep_scores else None,
                logits=tuple(logits_out) if keep_logits else None,
            )
        return sequences
