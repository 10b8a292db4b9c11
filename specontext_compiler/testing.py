"""What tests, benchmarks and examples build on: tiny random models of every supported family (one
registry, so tests can be parametrized over it), padded prompt batches, and long documents with one fact
to retrieve. ``specontext.testing`` re-exports it.

Tiny models have random weights: they check that SpeContext computes what transformers computes, not
that it answers well (the real-weights checks use SmolLM2, ``specontext_compiler.models``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, TypeVar

import torch
import transformers

T = TypeVar("T")

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=1,
)

# family -> (config class, model class, extra config fields)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
         "query_pre_attn_scalar": 16},
    ),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    config_name, model_name, extra = TINY_FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def padded_batch(vocab: int, lengths: list[int], seed: int = 0, pad_id: int = 0, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(low, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def cpu_peak_bytes(fn: Callable[[], T]) -> tuple[T, int, int]:
    """Run ``fn`` and measure the CPU memory it allocates: (its result, the peak of bytes allocated and
    not yet freed since it started, those still allocated when it returned). Measured, not modelled:
    every allocation of torch's CPU allocator on the calling thread, a kernel's own workspaces included,
    as the profiler's memory events report them (``torch.cuda.max_memory_allocated`` on the CPU)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocations = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.typed[0] == _EventType.Allocation:  # an allocation, or a free (a negative size)
            allocations.append((node.start_time_ns, node.typed[1].total_allocated, node.typed[1].alloc_size))
    if not allocations:
        return result, 0, 0
    allocations.sort()
    # total_allocated: the allocator's running count of what it allocated while a profiler recorded
    # memory (this one or an earlier one) and has not freed; counted from what it was before fn
    _, first_total, first_size = allocations[0]
    start = first_total - first_size
    return result, max(total for _, total, _ in allocations) - start, allocations[-1][1] - start


def peaked_llama() -> transformers.PreTrainedModel:
    """A tiny random Llama whose attention falls on a few tokens, as a trained model's does (queries scaled
    up). A tiny random model's own attention is nearly uniform: no selection of a few tokens misses much
    more of it than the best selection of that size does, so nothing there is a miss for the accuracy guard."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(256)
    return model


def write_eagle3_checkpoint(folder: Path, target_hidden: int = 64) -> Path:
    """A random checkpoint in the EAGLE-3 draft-head format (fc, one midlayer, norms, lm_head, d2t/t2d) for a
    target of hidden size ``target_hidden``, written to ``folder``."""
    from safetensors.torch import save_file

    hidden, heads, kv_heads, head_dim = 64, 4, 2, 16
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {
        "fc.weight": rand(hidden, 3 * target_hidden),
        "midlayer.input_layernorm.weight": 1 + rand(hidden),
        "midlayer.hidden_norm.weight": 1 + rand(hidden),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "midlayer.mlp.gate_proj.weight": rand(96, hidden),
        "midlayer.mlp.up_proj.weight": rand(96, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, 96),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(32, hidden),
        "d2t": torch.zeros(32, dtype=torch.long),
        "t2d": torch.ones(96, dtype=torch.bool),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": hidden, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": 96, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "vocab_size": 96, "draft_vocab_size": 32, "max_position_embeddings": 512,
    }))
    return folder


# -- long documents with one fact to retrieve (demo, tests on SmolLM2, accuracy benchmarks) ---------------

TOPICS = [
    "The river valley was known for its orchards, and every autumn the farmers carried baskets of apples to the market square.",
    "Engineers inspected the old stone bridge each spring, measuring the cracks and writing long reports for the town council.",
    "In the library, a quiet room held maps of distant coastlines, drawn by sailors who had crossed the northern sea.",
    "The weather station on the hill recorded wind, rain and temperature every hour, and the data filled many notebooks.",
    "Children in the village learned to play the violin, and the school held a concert in the hall at the end of the year.",
    "A small bakery near the harbor opened before dawn, and the smell of fresh bread drifted along the wooden piers.",
    "The museum displayed clocks from many centuries, some with gears of brass and others carved entirely from wood.",
    "Hikers followed the trail through the pine forest, stopping at the lake to rest and watch the herons fish.",
]

CODE_WORDS = ["PELICAN", "MARBLE", "TORNADO", "SAPPHIRE", "LANTERN", "BISCUIT", "VOLCANO", "HARMONICA",
              "CACTUS", "GLACIER", "PUMPKIN", "TRUMPET", "MEADOW", "COMPASS", "FALCON", "NUTMEG"]


def code_word_document(tokenizer, target_tokens: int = 2000, code_word: str = "PELICAN", depth: float = 0.5, seed: int = 0):
    """A chat prompt of about ``target_tokens`` tokens: filler paragraphs, one sentence with the code word
    at relative ``depth``, and the question. Returns (input_ids [1, T], code_word)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while len(tokenizer.encode(" ".join(sentences))) < target_tokens - 80:
        sentences.append(rng.choice(TOPICS))
    sentences.insert(int(len(sentences) * depth), f"Remember this: the secret code word is {code_word}.")
    question = "What is the secret code word? Answer with the code word only."
    messages = [{"role": "user", "content": " ".join(sentences) + "\n\n" + question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not hasattr(ids, "shape"):
        ids = ids["input_ids"]
    return ids, code_word
