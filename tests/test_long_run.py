"""10,000 decode steps of a tiny model with offloading and elastic loading, under a budget whose plan moves
layers to host memory as the sequence passes their thresholds: no growth of process memory or of live
tensors after warm-up, consistent stats, and every token's KV stored once, where it belongs."""

import ctypes
import gc
import os

import numpy as np
import torch

import specontext
from test_offload import CHUNK, SPARSE, budget_with_migrations
from specontext.testing import tiny_model

PROMPT, NEW = 40, 10_000
SAMPLES = (1_000, 4_000, 7_000, NEW)  # tokens generated when process memory and live tensors are read


def resident_bytes() -> int:
    """The process's resident memory, after glibc returns its free heap pages (what is left is in use)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class Probe:
    """A streamer that reads the process's memory at given token counts (``put`` is called every step)."""

    def __init__(self):
        self.tokens = -1  # the first put is the prompt
        self.samples: dict[int, tuple[int, int]] = {}

    def put(self, value):
        self.tokens += 1
        if self.tokens in SAMPLES:
            gc.collect()
            self.samples[self.tokens] = (resident_bytes(), live_tensors())

    def end(self):
        pass


def stored_kv(store, layer):
    """Every stored K/V of ``layer`` as [B, Hkv, L, D], wherever it lives."""
    if store.is_offloaded(layer):
        key, value = store.staged(layer)
    else:
        entry = store.layers[layer]
        key, value = entry.key[:, :, : entry.length], entry.value[:, :, : entry.length]
    return key.clone(), value.clone()


def test_ten_thousand_steps_hold_memory_steady_and_lose_no_token():
    model = tiny_model("llama", num_hidden_layers=2, max_position_embeddings=PROMPT + NEW + 64)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(11))
    budget, planned = budget_with_migrations(model, PROMPT, PROMPT + NEW)
    compiled = specontext.compile(model, budget, offload="auto", **SPARSE)
    compiled.runtime.store.migration.chunk = CHUNK
    # What the steps append, per layer, in order: into buffers filled before the run (numpy), so
    # that recording adds neither live tensors nor resident memory while it runs (NaN: every
    # page written now, and a position never recorded shows).
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    appended = {layer: (np.full((PROMPT + NEW, heads, dim), np.nan, np.float32), np.full((PROMPT + NEW, heads, dim), np.nan, np.float32), [0])
                for layer in range(2)}
    append = compiled.runtime.store.append

    def record(layer, key, value):
        keys, values, count = appended[layer]
        new = key.shape[2]
        keys[count[0]:count[0] + new] = key[0].permute(1, 0, 2).numpy()
        values[count[0]:count[0] + new] = value[0].permute(1, 0, 2).numpy()
        count[0] += new
        return append(layer, key, value)

    compiled.runtime.store.append = record
    probe = Probe()
    out = compiled.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, streamer=probe)

    # memory: flat after warm-up (a leak of one small tensor per step would add ~9,000 tensors)
    rss = {k: v[0] for k, v in probe.samples.items()}
    tensors = {k: v[1] for k, v in probe.samples.items()}
    assert set(probe.samples) == set(SAMPLES)
    # A layer that moves to host memory between two samples adds its host tier once (slot, ring and host
    # buffers, the slot map, the load plan's tensors: 19 for this model); between samples without a move,
    # nothing may be added.
    moves = [tokens - PROMPT for tokens in planned if PROMPT < tokens < PROMPT + NEW]
    assert moves, planned
    for before, after in zip(SAMPLES, SAMPLES[1:]):
        moved = sum(1 for generated in moves if before < generated <= after)
        assert tensors[after] - tensors[before] <= 8 + 24 * moved, (tensors, moves)
    # Resident memory may grow only by what the sequence stores: the KV store and the head's keys were
    # reserved for the whole sequence, but their pages become resident as tokens are written. Anything
    # else is a leak.
    head_keys = sum(c.keys[:, :, :1].nbytes for c in compiled.runtime.head.caches.values())
    per_token = compiled.kv_bytes_per_token + head_keys + 2 * 8  # KV, head keys, ids + mask
    grown = max(rss.values()) - rss[SAMPLES[0]]
    assert grown < (NEW - SAMPLES[0]) * per_token + 4 * 2**20, (rss, per_token)

    # stats
    stats = compiled.stats
    assert out.shape == (1, PROMPT + NEW)
    assert stats["new_tokens"] == NEW and stats["steps"] == NEW - 1
    assert stats["attended_tokens_per_step"] <= SPARSE["token_budget"]
    assert 0 < stats["h2d_bytes"] <= stats["h2d_bytes_full_reload"]
    assert 0.0 <= stats["selection_overlap"] <= 1.0
    assert stats["kv_bytes"] == compiled.kv_bytes_per_token * (PROMPT + NEW - 1)
    moves = sorted((tokens, layer) for layer, tokens in enumerate(planned) if PROMPT <= tokens < PROMPT + NEW)
    assert moves and sorted(compiled.memory.migrated) == moves  # each layer left when the sequence passed its threshold

    # every token's K/V stored once, in its position, across the move: what the steps appended, in order
    # (layer 1's values depend on the sparse attention before it); layer 0's also equal a dense forward's
    store = compiled.runtime.store
    for layer in range(2):
        key, value = stored_kv(store, layer)
        assert key.shape[2] == PROMPT + NEW - 1
        keys, values, count = appended[layer]
        assert count[0] == PROMPT + NEW - 1
        assert torch.equal(key[0].permute(1, 0, 2), torch.from_numpy(keys[: count[0]]))
        assert torch.equal(value[0].permute(1, 0, 2), torch.from_numpy(values[: count[0]]))
    with torch.no_grad():
        cache = model(out[:, :-1], use_cache=True).past_key_values
    key, value = stored_kv(store, 0)
    torch.testing.assert_close(key, cache.layers[0].keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(value, cache.layers[0].values, atol=1e-4, rtol=1e-4)
