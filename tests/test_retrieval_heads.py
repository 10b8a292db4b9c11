"""Retrieval heads from every source: draft-free, a homologous draft model, an EAGLE-3 checkpoint;
calibration (head-level pruning) and saving/loading the pruned head."""

import json

import pytest
import torch

import specontext
from specontext_compiler.retrieval import DraftModelHead, Eagle3Head, TargetLayerHead
from specontext_compiler.retrieval.eagle3 import is_eagle3_checkpoint, rms_norm, rotate_half
from specontext.testing import padded_batch, tiny_model, write_eagle3_checkpoint

SPARSE = dict(token_budget=20, sink_tokens=2, local_window=4, progress=False)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def draft():
    return tiny_model("qwen3", seed=1, num_hidden_layers=6)


@pytest.fixture(scope="module")
def prompts(target):
    return padded_batch(target.config.vocab_size, [40, 27], seed=11)


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory):
    """A random checkpoint in the EAGLE-3 draft-head format (fc, one midlayer, norms, lm_head, d2t/t2d)."""
    return write_eagle3_checkpoint(tmp_path_factory.mktemp("eagle3"))


def dense_reference(model, ids, mask, new=10):
    return specontext.compile(model, "1GB", progress=False).generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("source", ["none", "draft_model", "eagle3"])
def test_every_head_source_runs_and_equals_dense_when_budget_covers_context(source, target, draft, eagle_dir, prompts):
    ids, mask = prompts
    kwargs = {"none": {}, "draft_model": {"draft": draft}, "eagle3": {"draft": str(eagle_dir)}}[source]
    expected_type = {"none": TargetLayerHead, "draft_model": DraftModelHead, "eagle3": Eagle3Head}[source]
    reference = dense_reference(target, ids, mask)
    covering = specontext.compile(target, "1GB", token_budget=ids.shape[1] + 10, progress=False, **kwargs)
    assert isinstance(covering.head, expected_type)
    assert torch.equal(covering.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), reference)
    sparse = specontext.compile(target, "1GB", **SPARSE, **kwargs)
    out = sparse.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert out.shape == reference.shape
    assert sparse.runtime.attended_tokens[1:] == [20] * 9


def test_draft_free_head_scores_against_a_float64_reference(target, prompts):
    """Draft-free head after prefill: every layer's attention from the prompt's last token, averaged
    (the prior), + query_weight x the scoring layers' attention from that token, each summed over a KV
    group's query heads, plus the same attention one position earlier (lookahead 1); padding gets no mass."""
    ids, mask = prompts
    captured = {}

    def record(layer, q, keys, scale):
        captured[layer] = (q[:, :, -1].double(), keys.double(), scale)

    past = ids.shape[1]
    valid = mask.bool()[:, None, None, :]

    def attention(layer):  # [B, Hkv, P]
        q, keys, scale = captured[layer]
        grouped = q.view(q.shape[0], keys.shape[1], -1, q.shape[-1])
        logits = torch.einsum("bhgd,bhpd->bhgp", grouped, keys[:, :, :past]) * scale
        return torch.softmax(logits.masked_fill(~valid, float("-inf")), -1).sum(2)

    for layers, expected_layers in [(None, (2,)), ((1, 3), (1, 3))]:  # default: 0.72-0.8 of 4 layers -> 2
        model = specontext.compile(target, "1GB", **({} if layers is None else {"retrieval_layer": layers}), **SPARSE)
        assert model.head.layers == expected_layers
        model.runtime.observers.append(record)
        model(ids, attention_mask=mask)  # prefill fills the head's keys, queries and prior
        scores = model.head.score(ids[:, -1:], mask, past).double()
        prior = torch.stack([attention(layer) for layer in range(4)]).mean(0)
        assert model.head.lookahead == 1
        query = sum(attention(layer) for layer in expected_layers)
        query = query + torch.nn.functional.pad(query[..., :-1], (1, 0))  # position j also gets j-1's
        expected = prior + model.head.query_weight * query
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
        assert float(scores.masked_select(~mask.bool()[:, None, :]).abs().max()) == 0.0


def test_windowed_prior_and_lookbehind_score_against_a_float64_reference(target, prompts):
    """``prior_window=W``: the prior averages the attention of the prompt's last W queries (each causal);
    ``lookbehind=2``: each position also gets the scores of the two positions after it."""
    ids, mask = prompts
    captured = {}

    def record(layer, q, keys, scale):
        captured[layer] = (q.double(), keys.double(), scale)

    window, past = 5, ids.shape[1]
    head = TargetLayerHead((1, 3), prior_window=window, lookahead=1, lookbehind=2)
    model = specontext.compile(target, "1GB", draft=head, **SPARSE)
    model.runtime.observers.append(record)
    model(ids, attention_mask=mask)
    scores = model.head.score(ids[:, -1:], mask, past).double()

    def attention(layer, row):  # [B, Hkv, P]: query ``row``'s attention, causal, padding masked
        q, keys, scale = captured[layer]
        grouped = q[:, :, row].reshape(q.shape[0], keys.shape[1], -1, q.shape[-1])
        logits = torch.einsum("bhgd,bhpd->bhgp", grouped, keys[:, :, :past]) * scale
        visible = mask.bool() & (torch.arange(past) <= row)
        return torch.softmax(logits.masked_fill(~visible[:, None, None, :], float("-inf")), -1).sum(2)

    prior = torch.stack([sum(attention(layer, past - 1 - back) for back in range(window)) / window
                         for layer in range(4)]).mean(0)
    query = sum(attention(layer, past - 1) for layer in (1, 3))
    spread = (query + torch.nn.functional.pad(query[..., :-1], (1, 0))
              + torch.nn.functional.pad(query[..., 1:], (0, 1)) + torch.nn.functional.pad(query[..., 2:], (0, 2)))
    torch.testing.assert_close(scores, prior + head.query_weight * spread, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prior_window"):
        TargetLayerHead(1, prior_window=0)
    with pytest.raises(ValueError, match="lookbehind"):
        TargetLayerHead(1, lookbehind=-1)


def test_union_of_rankings_and_a_deep_prior_against_a_reference(target, prompts):
    """``prior_from=0.5``: the prior averages layers 2 and 3 of 4; ``combine="union"``: a position scores by
    the better of its rank under the query part and under the prior (0 = first), the query part's first."""
    ids, mask = prompts
    past = ids.shape[1]
    plain = TargetLayerHead((1, 3), prior_from=0.5)
    union = TargetLayerHead((1, 3), prior_from=0.5, combine="union")
    for head in (plain, union):
        model = specontext.compile(target, "1GB", draft=head, **SPARSE)
        model(ids, attention_mask=mask)
    full = TargetLayerHead((1, 3))
    model = specontext.compile(target, "1GB", draft=full, **SPARSE)
    model(ids, attention_mask=mask)
    deep = torch.stack([full.prior_parts[layer] for layer in (2, 3)]).mean(0)
    torch.testing.assert_close(plain.prior(past), deep)
    query = plain.score(ids[:, -1:], mask, past) - deep

    def ranks(scores):  # ties to the earlier position, padding last
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        return scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)

    by_query, by_prior = ranks(query), ranks(deep)
    expected = -(2 * torch.minimum(by_query, by_prior) + (by_prior < by_query)).float()
    assert torch.equal(union.score(ids[:, -1:], mask, past), expected)
    with pytest.raises(ValueError, match="combine"):
        TargetLayerHead(1, combine="max")
    with pytest.raises(ValueError, match="prior_from"):
        TargetLayerHead(1, prior_from=1.0)


def test_eagle3_scores_match_a_float64_reference(target, eagle_dir):
    """The head's scores at one step, recomputed by hand from the checkpoint's tensors."""
    from safetensors.torch import load_file

    head = Eagle3Head(eagle_dir, target.get_input_embeddings(), 4, 2)
    head.reset(1, 16)
    ids = torch.randint(3, 96, (1, 9))
    aux = [torch.randn(1, 9, 64) for _ in range(3)]
    positions = torch.arange(9)[None]
    head.observe_step(ids, torch.ones(1, 9), positions, aux)
    new = torch.randint(3, 96, (1, 1))
    scores = head.score(new, torch.ones(1, 10, dtype=torch.long), past=9)

    w = {k: v.double() for k, v in load_file(str(eagle_dir / "model.safetensors")).items() if v.is_floating_point()}
    emb = target.get_input_embeddings().weight.double()
    hidden = torch.cat(aux, -1).double()[0]
    previous = torch.cat([torch.zeros(1, 192, dtype=torch.float64), hidden[:-1]])

    def project(tokens, feats, name, heads, pos):
        x = torch.cat([rms_norm(emb[tokens], w["midlayer.input_layernorm.weight"], 1e-6),
                       rms_norm(feats @ w["fc.weight"].T, w["midlayer.hidden_norm.weight"], 1e-6)], -1)
        p = (x @ w[f"midlayer.self_attn.{name}_proj.weight"].T).view(len(tokens), heads, 16).transpose(0, 1)
        inv = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
        angles = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
        return p * angles.cos() + rotate_half(p) * angles.sin()

    keys = project(ids[0], previous, "k", 2, torch.arange(9, dtype=torch.float64))
    query = project(new[0], hidden[-1:], "q", 4, torch.tensor([9.0]))
    probs = torch.softmax(torch.einsum("hqd,hkd->hqk", query, keys.repeat_interleave(2, 0)) / 4.0, -1)[:, 0]
    expected = probs.sum(0)
    torch.testing.assert_close(scores[0, 0].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores[0, 1].double(), expected, rtol=1e-4, atol=1e-6)


def test_eagle3_loads_only_what_scoring_needs(target, eagle_dir):
    head = Eagle3Head(eagle_dir, target.get_input_embeddings(), 4, 2)
    assert set(head.tensors) == {
        "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
        "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    }
    assert head.parameter_count() < head.checkpoint_parameters
    assert is_eagle3_checkpoint(eagle_dir) and not is_eagle3_checkpoint(eagle_dir.parent)


@pytest.mark.parametrize("source", ["none", "draft_model", "eagle3"])
def test_calibrate_prunes_saves_and_loads(source, target, draft, eagle_dir, tmp_path):
    texts = [torch.randint(3, 96, (1, 90), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    draft_arg = {"none": None, "draft_model": draft, "eagle3": str(eagle_dir)}[source]
    calibrated = specontext.calibrate(target, draft=draft_arg, texts=texts, token_budget=24, decode_steps=3,
                                      sink_tokens=2, local_window=4, progress=False)
    report = calibrated.report
    assert 0.0 <= report.coverage <= 1.0 and len(report.layer_coverage) >= 1
    if source == "none":
        # every layer measured; the lowest-KL one scores, on top of the prefill prior
        assert sorted(report.layer_kl) == list(range(target.config.num_hidden_layers))
        assert report.layer == min(report.layer_kl, key=report.layer_kl.get)
        assert calibrated.head.layers == (report.layer,) and calibrated.head.prefill_prior
    else:
        assert len(report.head_map) == 2 and all(len(group) == 2 for group in report.head_map)
        assert report.parameters_after < report.parameters_before
    path = calibrated.save(tmp_path / "head")
    manifest = json.loads((path / "specontext_head.json").read_text())
    assert manifest["kind"] == report.kind and manifest["head_map"] == report.head_map
    from_memory = specontext.compile(target, "1GB", draft=calibrated, **SPARSE)
    from_disk = specontext.compile(target, "1GB", draft=str(path), **SPARSE)
    ids = texts[0]
    assert torch.equal(from_memory.generate(ids, max_new_tokens=8, do_sample=False),
                       from_disk.generate(ids, max_new_tokens=8, do_sample=False))


def test_pruning_a_draft_of_four_or_more_layers_removes_over_90_percent(target, draft):
    texts = [torch.randint(3, 96, (1, 80), generator=torch.Generator().manual_seed(7))]
    calibrated = specontext.calibrate(target, draft=draft, texts=texts, token_budget=24, decode_steps=2,
                                      sink_tokens=2, local_window=4, max_layer=0, progress=False)
    assert draft.config.num_hidden_layers >= 4
    assert calibrated.report.reduction >= 0.90, calibrated.report.summary()


def test_bad_drafts_are_refused(target, tmp_path):
    with pytest.raises(ValueError, match="vocabulary"):
        specontext.compile(target, "1GB", draft=tiny_model("llama", vocab_size=50), **SPARSE)
    with pytest.raises(ValueError, match="is not a model"):
        specontext.compile(target, "1GB", draft=str(tmp_path), **SPARSE)
    with pytest.raises(ValueError, match="retrieval_layer=9"):
        specontext.compile(target, "1GB", retrieval_layer=9, **SPARSE)
    with pytest.raises(ValueError, match="retrieval_layer=9"):
        specontext.compile(target, "1GB", retrieval_layer=(1, 9), **SPARSE)
    with pytest.raises(ValueError, match="distinct"):
        specontext.compile(target, "1GB", retrieval_layer=(1, 1), **SPARSE)
    with pytest.raises(ValueError, match="one layer"):
        specontext.compile(target, "1GB", draft=tiny_model("llama", seed=3), retrieval_layer=(0, 1), **SPARSE)
    with pytest.raises(ValueError, match="tokenizer"):
        specontext.calibrate(target, texts=["some words"], token_budget=24, sink_tokens=2, local_window=4)


def test_default_scoring_layers_move_off_sliding_window_layers():
    from specontext_compiler.retrieval.target_layer_head import default_layers

    assert default_layers(30) == (21, 22, 23)  # SmolLM2
    gemma3 = (["sliding_attention"] * 5 + ["full_attention"]) * 3  # Gemma-3-270M's 18 layers
    assert default_layers(18) == (12, 13, 14)
    assert default_layers(18, gemma3) == (11, 17)
    assert default_layers(18, ["full_attention"] * 18) == (12, 13, 14)


def test_predicted_query_against_a_float64_ridge_reference(target, prompts):
    """``query="predicted"``: per row and query head, a ridge regression of each prompt query on the one
    before it and the layer's query projection of the token's embedding (pairs of real tokens, across
    prefill chunks), shrunk towards the previous query; the step's query is that prediction rotated to the
    new position. The reference reads unrotated queries from ``q_proj`` itself (no inverse rotation)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids, mask = prompts
    layer, heads, dim = 2, target.config.num_attention_heads, target.config.head_dim
    head = TargetLayerHead(layer, query="predicted", model=target)
    model = specontext.compile(target, "1GB", draft=head, prefill_chunk=16, **SPARSE)  # three chunks
    model(ids, attention_mask=mask)
    recorded = []  # the HF model's own forward, for the unrotated queries
    hook = target.model.layers[layer].self_attn.q_proj.register_forward_hook(lambda m, i, o: recorded.append(o))
    with torch.no_grad():
        target(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    hook.remove()
    batch, past = ids.shape
    new = torch.tensor([[5], [7]])
    positions = mask.sum(-1)
    predicted = head._step_queries(new, positions)[layer].double()

    unrotated = torch.cat(recorded, 1).double().view(batch, past, heads, dim)
    block = target.model.layers[layer]
    with torch.no_grad():
        def embedded(tokens):
            return block.self_attn.q_proj(block.input_layernorm(target.model.embed_tokens(tokens))).double()
        emb = embedded(ids).view(batch, past, heads, dim)
        emb_new = embedded(new).view(batch, 1, heads, dim)
        for row in range(batch):
            real = mask[row].bool()
            pairs = (real[1:] & real[:-1]).nonzero().flatten() + 1
            for h in range(heads):
                x = torch.cat([unrotated[row, pairs - 1, h], emb[row, pairs, h], torch.ones(len(pairs), 1)], -1)
                gram = x.T @ x
                ridge = head.predictors[layer].ridge * gram.diagonal().mean() + 1e-6
                eye = torch.eye(2 * dim + 1, dtype=torch.float64)
                weights = torch.linalg.solve(gram + ridge * eye, x.T @ unrotated[row, pairs, h] + ridge * eye[:, :dim])
                features = torch.cat([unrotated[row, -1, h], emb_new[row, 0, h], torch.ones(1)])
                cos, sin = target.model.rotary_emb(features[None, None], positions[row].view(1, 1))
                expected, _ = apply_rotary_pos_emb((features @ weights).view(1, 1, 1, dim), (features @ weights).view(1, 1, 1, dim),
                                                   cos.double(), sin.double())
                torch.testing.assert_close(predicted[row, h], expected.view(dim), rtol=2e-3, atol=2e-4)
    with pytest.raises(ValueError, match="needs model="):
        TargetLayerHead(1, query="predicted")
    with pytest.raises(ValueError, match="query must be one of"):
        TargetLayerHead(1, query="next")


def test_rotation_is_undone_exactly_with_scaling_and_partial_rotary():
    from specontext_compiler.retrieval.query_prediction import rotate

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    angles = torch.rand(2, 5, 4, generator=g, dtype=torch.float64) * 6
    for scale in (1.0, 1.3):
        cos = torch.cat([angles.cos()] * 2, -1) * scale  # 8 rotary dimensions of 16
        sin = torch.cat([angles.sin()] * 2, -1) * scale
        turned = rotate(q, cos, sin)
        assert torch.equal(turned[..., 8:], q[..., 8:])
        torch.testing.assert_close(rotate(turned, cos, sin, inverse=True), q)
