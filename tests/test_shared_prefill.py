"""One prefill, many selections (evaluation/shared_prefill.py) against one compiled model per method."""

import torch

import specontext
from specontext_compiler.config import GuardSettings
from specontext_compiler.evaluation.shared_prefill import DENSE, HeadChoice, Method, generate_each, replay_each
from specontext_compiler.retrieval import OracleTopK, StreamingLLM, TargetLayerHead
from specontext.testing import padded_batch, peaked_llama

GUARD = GuardSettings(threshold=0.6, check_every=1, dense_start=0)


def test_each_method_decodes_as_its_own_compiled_model_and_the_runtime_is_put_back():
    model = peaked_llama()  # attention on a few tokens: a narrow selection can miss it (the guard then triggers)
    ids, _ = padded_batch(96, [40], seed=3)
    choice = HeadChoice({"head": TargetLayerHead(1), "streaming": StreamingLLM(), "oracle": OracleTopK()})
    compiled = specontext.compile(model, "1GB", token_budget=16, draft=choice, offload="none", progress=False, guard=GUARD)
    # Two guarded methods in a row: the first one's hold after its trigger must not leak into the second,
    # whose wide selection alone never triggers.
    methods = [DENSE, Method("head", 12), Method("streaming", 12), Method("oracle", 12), Method("head", 6, True),
               Method("head", 45, True)]
    stats = {}
    out = generate_each(compiled, choice, ids, methods, 10, stats)
    guard_keys = ("guard_checks", "guard_triggers", "guard_dense_steps")
    for method in methods:
        options = dict(token_budget=method.token_budget, offload="none", progress=False, guard=GUARD if method.guard else False)
        if method.head == "head":
            options["draft"] = TargetLayerHead(1)
        elif method.head:
            options["selection"] = method.head
        alone = specontext.compile(model, "1GB", **options)
        expected = alone.generate(ids, max_new_tokens=10, do_sample=False)[:, 40:]
        assert torch.equal(out[method], expected), method.label
        if method.guard:
            assert {k: stats[method][k] for k in guard_keys} == {k: alone.stats[k] for k in guard_keys}, method.label
    assert stats[methods[-2]]["guard_triggers"] > 0 and stats[methods[-1]]["guard_dense_steps"] == 0
    runtime = compiled.runtime
    assert runtime.guard is not None and choice.active == "head" and runtime.sparse.token_budget == 16
    logits = replay_each(compiled, choice, ids, out[DENSE], methods)
    dense = specontext.compile(model, "1GB", token_budget=None, progress=False).replay(ids, out[DENSE])
    torch.testing.assert_close(logits[DENSE], dense)
