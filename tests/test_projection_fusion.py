"""Projections that read one input (q/k/v, gate/up) become one matrix product in the step graph, over a
weight the user's parameters are views of (specontext_compiler/projection_fusion.py)."""

import pytest
import torch

import specontext
from specontext.testing import TINY_FAMILIES, padded_batch, tiny_model


def linear_weights(compiled) -> list[torch.Size]:
    program = compiled.step.program
    sizes = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            sizes.append(tuple(node.args[1].meta["val"].shape))
    return sizes


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_each_layer_has_four_matrix_products_and_the_logits_are_unchanged(family):
    model = tiny_model(family)
    ids, mask = padded_batch(96, [9, 6], seed=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    compiled = specontext.compile(model, "1GB", token_budget=None, progress=False)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    sizes = linear_weights(compiled)
    # q/k/v, o, gate/up, down per layer, and the LM head (Phi-3 ships q/k/v and gate/up fused already)
    assert len(sizes) == 4 * config.num_hidden_layers + 1, sizes
    assert sizes.count((qkv, config.hidden_size)) == config.num_hidden_layers
    assert sizes.count((2 * config.intermediate_size, config.hidden_size)) == config.num_hidden_layers
    for name, p in model.named_parameters():  # the user's model: same values, same modules
        assert torch.equal(p, before[name]), name
    assert all(type(getattr(m, "q_proj", torch.nn.Linear(1, 1))) is torch.nn.Linear for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
    out = compiled(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-4, rtol=0)


def test_the_fused_weight_is_the_storage_of_the_users_parameters():
    model = tiny_model("qwen2")  # q/k/v with biases
    compiled = specontext.compile(model, "1GB", progress=False)
    state = compiled.step.program.state_dict
    attention = model.model.layers[0].self_attn
    fused = state["model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.weight"]
    bias = state["model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.bias"]
    assert not any(key.endswith("self_attn.q_proj.weight") for key in state)
    for m in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert m.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert m.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    with torch.no_grad():  # a write to the user's weight is a write to the fused one
        attention.k_proj.weight[0, 0] = 123.0
    assert fused[attention.q_proj.out_features, 0] == 123.0


def test_weights_moved_between_two_exports_are_fused_again():
    # The step is exported at compile, the all-logits step at the first __call__: if the parameters got new
    # storage in between (model.to(...), a reload), the second export fuses the new storage.
    model = tiny_model("llama")
    compiled = specontext.compile(model, "1GB", progress=False)
    for p in model.parameters():
        p.data = p.data.clone()
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=0)
    fused = compiled._step_all.program.state_dict["model.model.layers.1.mlp.fused_gate_proj_up_proj.weight"]
    gate = model.model.layers[1].mlp.gate_proj.weight
    assert gate.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
