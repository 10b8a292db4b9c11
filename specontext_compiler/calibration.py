"""Head-level pruning: measure which heads retrieve the way the target attends, keep those, save them.

``specontext.calibrate(model, draft=..., texts=..., token_budget=...)``:

1. The target generates ``decode_steps`` greedy tokens after each calibration text (dense attention),
   and every layer's true attention of every decode step is recorded.
2. Every candidate head scores the same steps: for ``draft=None`` each target layer's previous-step
   query (per KV group) on top of the prefill prior (the head that runs); for a draft model each (layer, query head) of the draft; for an EAGLE-3 head
   each of its query heads.
3. The scoring *layer* is chosen by output fidelity: for every step and candidate layer, the target
   runs that decode step with the layer's selection (sinks + window + top-k, the decoding rule) over
   the dense prefix, and the KL divergence of its next-token distribution from the dense one is
   averaged. The layer with the lowest KL is kept. (Attention-mass coverage alone picks the wrong
   layer on SmolLM2: early layers cover the most mass, 0.62 against 0.20 for layer 24, yet retrieve
   no code word, while layer 24 retrieves as well as dense; docs/accuracy.md.)
4. Within that layer, heads are chosen by *coverage* for each target KV group g: the share of the
   target's attention mass outside the sinks and the window, summed over all layers and g's heads,
   that a head's selection covers; the ``heads_per_group`` best form ``head_map[g]``. Everything the
   scoring does not need is dropped.

A calibrated head (retrieval/calibrated_head.py) saves as ``specontext_head.json`` (kind, layer, heads,
head map, coverage, parameter counts, the draft's config) plus ``head.safetensors`` (its tensors);
loading runs no pickled code.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .api import compile as specontext_compile
from .planning import num_kv_heads
from .retrieval.base import RetrievalHead, group_probabilities
from .retrieval.calibrated_head import CalibratedHead, CalibrationReport
from .retrieval.draft_model_head import DraftModelHead
from .retrieval.eagle3 import Eagle3Head, is_eagle3_checkpoint
from .retrieval.selection import select_tokens
from .retrieval.target_layer_head import DEFAULT_QUERY_WEIGHT, TargetLayerHead
from .runtime.context import activate
from .runtime.engine import prompt_position_ids

logger = logging.getLogger(__name__)

# -- measurement -------------------------------------------------------------------------------------------
class _Recorder:
    """Records every decode step's per-layer query and the layer's keys, through the runtime's observers."""

    def __init__(self):
        self.queries: dict[int, list[torch.Tensor]] = {}
        self.prefill_query: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, keys: torch.Tensor, scale: float) -> None:
        if q.shape[2] == 1:
            self.queries.setdefault(layer, []).append(q[0, :, 0].float())
        else:
            self.prefill_query[layer] = q[0, :, -1].float()
        self.keys[layer] = keys[0]  # a view of the store: read before the next sequence resets it
        self.scale = scale


def _target_probabilities(recorder: _Recorder, step: int) -> list[torch.Tensor]:
    """Per layer, [Hq, L] true attention probabilities of decode step ``step`` (L = keys seen then)."""
    probs = []
    for layer in sorted(recorder.queries):
        q = recorder.queries[layer][step]
        length = recorder.first_length + step + 1
        keys = recorder.keys[layer][:, :length].float()
        groups = q.shape[0] // keys.shape[0]
        logits = torch.einsum("hd,hld->hl", q, keys.repeat_interleave(groups, 0)) * recorder.scale
        probs.append(torch.softmax(logits, -1))
    return probs


def _coverage(candidate_scores: torch.Tensor, truth: list[torch.Tensor], budget: int, sinks: int, window: int) -> torch.Tensor:
    """Mass-weighted far coverage per (candidate, target group).

    candidate_scores [C, P] over the P past tokens; truth: per layer [Hq, P + 1]. Returns covered and
    total far mass, [C, Hkv] each.
    """
    candidates, past = candidate_scores.shape
    q_heads = truth[0].shape[0]
    valid = torch.ones(candidates, past, dtype=torch.bool)
    picked = select_tokens(candidate_scores[:, None, :], valid, budget, sinks, window)[:, 0]  # [C, K]
    selected = torch.zeros(candidates, past, dtype=torch.bool)
    selected.scatter_(1, picked, True)
    forced = select_tokens(torch.zeros(1, 1, past), valid[:1], min(budget, sinks + window), sinks, window)[0, 0]
    far = torch.ones(past, dtype=torch.bool)
    far[forced] = False
    mass = torch.stack([p[:, :past] for p in truth])  # [layers, Hq, P]
    far_mass = (mass * far).sum(0)  # [Hq, P] summed over layers
    covered = torch.einsum("hp,cp->ch", far_mass, selected.float())  # [C, Hq]
    total = far_mass.sum(-1)  # [Hq]
    return covered, total.expand(candidates, q_heads)


def calibrate(
    model,
    draft=None,
    texts=(),
    token_budget: int = 256,
    *,
    tokenizer=None,
    heads_per_group: int = 2,
    decode_steps: int = 16,
    sink_tokens: int = 4,
    local_window: int = 64,
    max_layer: int | None = None,
    progress: bool = True,
) -> CalibratedHead:
    """Measure candidate retrieval heads against ``model``'s attention and keep the best (see module doc).

    Args:
        model: the target transformers causal LM.
        draft: None (heads from the target itself), a homologous transformers model, or an EAGLE-3
            checkpoint directory.
        texts: calibration prompts: strings (with ``tokenizer``) or LongTensors of token ids.
        token_budget: the budget the selection is measured at.
        heads_per_group: draft heads kept per target KV group.
        max_layer: only consider scoring layers up to this one (a smaller head).
    """
    prompts = _tokenize(texts, tokenizer)
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget <= sink_tokens + local_window:
        raise ValueError(f"token_budget must be an int above sink_tokens + local_window; got {token_budget!r}")
    if isinstance(draft, (str, Path)) and is_eagle3_checkpoint(draft):
        kind = "eagle3"
    elif draft is None:
        kind = "target_layer"
    elif hasattr(draft, "config") and hasattr(draft, "get_input_embeddings"):
        kind = "draft_model"
    else:
        raise ValueError(f"draft={draft!r}: calibrate takes None, a transformers model or an EAGLE-3 checkpoint directory")

    kv_heads = num_kv_heads(model.config)
    dense = specontext_compile(model, 2**50 - 1, progress=False)
    probe_head = _ProbeHead()
    probe = specontext_compile(
        model, 2**50 - 1, token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window,
        draft=probe_head, progress=False,
    )
    kl_sum: dict[int, float] = {}
    agree_sum: dict[int, float] = {}
    probes = 0
    budget = token_budget - 1  # the new token is always attended
    covered_sum: dict[int, torch.Tensor] = {}
    total_sum: dict[int, torch.Tensor] = {}
    eagle = Eagle3Head(draft, model.get_input_embeddings(), model.config.num_hidden_layers, kv_heads) if kind == "eagle3" else None
    bar = tqdm(prompts, desc="calibration", disable=not progress)
    for ids in bar:
        recorder = _Recorder()
        dense.runtime.observers.append(recorder)
        try:
            result = dense.generate(ids, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1,
                                    do_sample=False, return_dict_in_generate=True, output_logits=True)
        finally:
            dense.runtime.observers.remove(recorder)
        sequence = result.sequences
        recorder.first_length = ids.shape[1]
        candidates = _candidate_scores(kind, model, draft, eagle, recorder, sequence, ids.shape[1], decode_steps)
        for layer, (kl, agree) in _layer_fidelity(probe, probe_head, sequence, ids.shape[1], candidates, result.logits, kv_heads).items():
            kl_sum[layer] = kl_sum.get(layer, 0.0) + kl
            agree_sum[layer] = agree_sum.get(layer, 0.0) + agree
        probes += decode_steps
        q_heads = recorder.queries[0][0].shape[0]
        groups = q_heads // kv_heads
        for step in range(decode_steps):
            truth = _target_probabilities(recorder, step)
            for layer, scores in candidates[step].items():  # scores [C, P]
                covered, total = _coverage(scores, truth, budget, sink_tokens, local_window)
                covered = covered.view(-1, kv_heads, groups).sum(-1)  # [C, Hkv]
                total = total.view(-1, kv_heads, groups).sum(-1)
                covered_sum[layer] = covered_sum.get(layer, 0) + covered
                total_sum[layer] = total_sum.get(layer, 0) + total
    coverage = {layer: covered_sum[layer] / total_sum[layer].clamp_min(1e-12) for layer in covered_sum}  # [C, Hkv]
    layers = [layer for layer in coverage if max_layer is None or layer <= max_layer]
    if not layers:
        raise ValueError(f"no candidate layer at or below max_layer={max_layer}")

    def layer_score(layer: int) -> float:
        table = coverage[layer]
        if kind == "target_layer":
            return float(table.diagonal().mean())  # the layer's group g scores for target group g
        best = table.topk(min(heads_per_group, table.shape[0]), dim=0).values  # per group, its best heads
        return float(best.mean())

    layer_coverage = {layer: layer_score(layer) for layer in sorted(layers)}
    layer_kl = {layer: kl_sum[layer] / probes for layer in sorted(layers)}
    layer_agreement = {layer: agree_sum[layer] / probes for layer in sorted(layers)}
    chosen = min(layer_kl, key=layer_kl.get)
    table = coverage[chosen]
    if kind == "target_layer":
        head = TargetLayerHead(chosen)
        heads, head_map = list(range(model.config.num_attention_heads)), None
        before = after = 0
        draft_config = None
    else:
        keep = min(heads_per_group, table.shape[0])
        head_map = [sorted(table[:, g].topk(keep).indices.tolist()) for g in range(kv_heads)]
        heads = sorted({h for group in head_map for h in group})
        if kind == "draft_model":
            head = DraftModelHead(draft, kv_heads, layer=chosen, heads=heads, head_map=head_map)
            before, draft_config = head.original_parameters, draft.config.to_dict()
        else:
            head = eagle.pruned(heads, head_map)
            before, draft_config = eagle.checkpoint_parameters, eagle.config
        after = head.parameter_count()
    report = CalibrationReport(
        kind=kind,
        layer=chosen,
        heads=heads,
        head_map=head_map,
        layer_kl=layer_kl,
        layer_agreement=layer_agreement,
        layer_coverage=layer_coverage,
        coverage=layer_coverage[chosen],
        parameters_before=before,
        parameters_after=after,
        token_budget=token_budget,
        texts=len(prompts),
        decode_steps=decode_steps,
        draft_config=draft_config,
    )
    logger.info(report.summary())
    return CalibratedHead(head, report)


class _ProbeHead(RetrievalHead):
    """A retrieval head whose scores calibration sets from outside, one candidate at a time."""

    name = "calibration_probe"

    def __init__(self):
        self.scores: torch.Tensor | None = None

    def score(self, input_ids, attention_mask, past):
        return self.scores[..., :past]


def _layer_fidelity(probe, probe_head, sequence, prompt_length, candidates, dense_logits, kv_heads):
    """Per candidate layer: summed KL(dense || sparse) of the next-token distribution and top-1 agreement.

    Each decode step of the dense run is replayed over the dense prefix once per candidate layer (the
    store is truncated back to the prefix), then once densely to restore the prefix for the next step.
    """
    runtime, engine = probe.runtime, probe.engine
    total = sequence.shape[1]
    results: dict[int, list[float]] = {}
    runtime.reset(total, padding_free=True)
    with torch.no_grad(), activate(runtime):
        ids = sequence[:, :prompt_length]
        engine.run_chunks(engine.step, ids, torch.ones_like(ids), keep_all=False)
        for step, by_layer in enumerate(candidates):
            position = prompt_length + step
            token = sequence[:, position:position + 1]
            mask = torch.ones(1, position + 1, dtype=torch.long, device=sequence.device)
            where = prompt_position_ids(mask)[:, -1:]
            reference = torch.log_softmax(dense_logits[step + 1].float(), -1)
            for layer, scores in by_layer.items():
                if scores.shape[0] == kv_heads:
                    probe_head.scores = scores[None]  # one candidate per target group
                else:
                    probe_head.scores = scores.sum(0, keepdim=True)[None].expand(1, kv_heads, -1)
                runtime.store.truncate(position)
                logits = engine.run_step(engine.step, token, mask, where)[:, -1].float()
                sparse = torch.log_softmax(logits, -1)
                kl = float((reference.exp() * (reference - sparse)).sum())
                same = float(logits.argmax(-1).eq(reference.argmax(-1)).float().mean())
                entry = results.setdefault(layer, [0.0, 0.0])
                entry[0] += kl
                entry[1] += same
            runtime.store.truncate(position)
            runtime.selection_enabled = False
            try:
                engine.run_step(engine.step, token, mask, where)
            finally:
                runtime.selection_enabled = True
    return {layer: (kl, same) for layer, (kl, same) in results.items()}


def _tokenize(texts, tokenizer) -> list[torch.Tensor]:
    prompts = []
    for text in texts:
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("calibration texts are strings: pass tokenizer= to turn them into token ids")
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        elif isinstance(text, torch.Tensor):
            ids = text if text.dim() == 2 else text[None]
        else:
            raise TypeError(f"calibration texts must be strings or LongTensors of token ids; got {type(text).__name__}")
        if ids.shape[0] != 1 or ids.shape[1] < 2:
            raise ValueError(f"each calibration text must be one sequence of at least 2 tokens; got shape {tuple(ids.shape)}")
        prompts.append(ids)
    if not prompts:
        raise ValueError("calibrate needs at least one text")
    return prompts


def _candidate_scores(kind, model, draft, eagle, recorder, sequence, prompt_length, decode_steps):
    """Per decode step, {scoring layer: [candidates, past]} scores of every candidate head."""
    steps: list[dict[int, torch.Tensor]] = [dict() for _ in range(decode_steps)]
    if kind == "target_layer":
        # Layer l's candidate for group g: the head's prefill prior (every layer's attention from the
        # prompt's last query, averaged) + the weighted previous-step attention of l's heads in g, summed.
        prior = torch.stack([
            group_probabilities(recorder.prefill_query[layer][None], recorder.keys[layer][None, :, :prompt_length].float(), recorder.scale)[0]
            for layer in recorder.queries
        ]).mean(0)  # [Hkv, prompt]
        for layer, queries in recorder.queries.items():
            keys = recorder.keys[layer].float()
            for step in range(decode_steps):
                past = prompt_length + step
                q = recorder.prefill_query[layer] if step == 0 else queries[step - 1]
                # exactly what TargetLayerHead.score computes at this step
                dynamic = group_probabilities(q[None], keys[None, :, :past], recorder.scale)[0]  # [Hkv, P]
                steps[step][layer] = torch.nn.functional.pad(prior, (0, past - prompt_length)) + DEFAULT_QUERY_WEIGHT * dynamic
        return steps
    # Draft model / EAGLE-3: every query head is a candidate; its attention at the position being fed.
    per_layer = _draft_attention(draft, sequence) if kind == "draft_model" else {0: eagle.attention_rows(model, sequence)}
    for layer, (queries, keys, scale) in per_layer.items():
        groups = queries.shape[0] // keys.shape[0]
        for step in range(decode_steps):
            position = prompt_length + step  # the token the target is fed at this decode step
            logits = torch.einsum("hd,hld->hl", queries[:, position], keys[:, :position].repeat_interleave(groups, 0)) * scale
            steps[step][layer] = torch.softmax(logits.float(), -1)
    return steps


def _draft_attention(draft, sequence: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Every draft layer's post-RoPE queries [H, T, D] and keys [Hkv, T, D] over ``sequence``, one forward."""
    from transformers import AttentionInterface

    captured: dict[int, tuple] = {}

    def probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        captured[module.layer_idx] = (query[0].float(), key[0].float(), scaling or query.shape[-1] ** -0.5)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("specontext_probe", probe)
    memo = {id(t): t for t in list(draft.parameters()) + list(draft.buffers())}
    probe_model = copy.deepcopy(draft, memo)
    probe_model.set_attn_implementation("specontext_probe")
    with torch.no_grad():
        probe_model(input_ids=sequence.to(draft.device), use_cache=False)
    return captured
