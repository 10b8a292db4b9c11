import pytest
import torch

from specontext_compiler.runtime.kv_store import KVStore


def poisoned_store(layers=2, grow_chunk=4):
    store = KVStore(layers, ["cpu"] * layers, torch.float32, grow_chunk=grow_chunk)
    return store


def test_append_returns_everything_stored_in_order():
    store = poisoned_store()
    chunks = [torch.randn(2, 3, n, 5) for n in (3, 1, 6, 1)]
    for chunk in chunks:
        keys, values = store.append(0, chunk, -chunk)
    expected = torch.cat(chunks, dim=2)
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)
    torch.testing.assert_close(values, -expected, rtol=0, atol=0)
    assert store.length(0) == 11 and store.length(1) == 0
    assert store.nbytes() == 2 * expected.nbytes


def test_reservation_avoids_growth_and_growth_keeps_data():
    store = poisoned_store(grow_chunk=8)
    store.reset(reserve_tokens=20)
    keys, _ = store.append(1, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    buffer = store.layers[1].key
    assert store.layers[1].capacity == 20  # exactly the reservation (memory placement counts it)
    store.append(1, torch.randn(1, 2, 15, 4), torch.randn(1, 2, 15, 4))
    assert store.layers[1].key is buffer  # still within the reservation
    before = store.layers[1].key[:, :, :20].clone()
    keys, _ = store.append(1, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert store.layers[1].capacity == 24  # past it: whole chunks
    torch.testing.assert_close(keys[:, :, :20], before, rtol=0, atol=0)


def test_unwritten_slots_never_leak():
    store = poisoned_store(grow_chunk=16)
    store.reset(reserve_tokens=16)
    store.append(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    store.layers[0].key[:, :, 2:].fill_(float("nan"))  # poison the unwritten capacity
    keys, _ = store.append(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    assert keys.shape[2] == 5 and not torch.isnan(keys).any()


def test_reset_then_new_batch_shape():
    store = poisoned_store()
    store.append(0, torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="reset the store"):
        store.append(0, torch.randn(1, 3, 1, 5), torch.randn(1, 3, 1, 5))
    store.reset()
    keys, _ = store.append(0, torch.randn(1, 3, 2, 5), torch.randn(1, 3, 2, 5))
    assert keys.shape == (1, 3, 2, 5)


def test_devices_must_match_layers():
    with pytest.raises(ValueError, match="one per layer"):
        KVStore(3, ["cpu"], torch.float32)


def test_retrieval_key_cache_appends_grows_and_refuses_short_reads():
    from specontext_compiler.retrieval.base import KeyCache

    cache = KeyCache(grow_chunk=4)
    cache.reset(reserve_tokens=6)
    chunks = [torch.randn(1, 2, n, 3) for n in (5, 1, 4)]
    for chunk in chunks:
        cache.append(chunk)
    cache.keys[:, :, cache.length:] = float("nan")  # poison what was never written
    expected = torch.cat(chunks, dim=2)
    torch.testing.assert_close(cache.view(10), expected, rtol=0, atol=0)
    torch.testing.assert_close(cache.view(7, [1]), expected[:, [1], :7], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="holds 10 keys, needs 11"):
        cache.view(11)


def test_offloaded_layer_keeps_every_token_through_ring_flushes_and_truncation():
    """Decode tokens sit in the device ring and reach host memory in batches; staging (and truncation)
    must still see every token exactly once, in order."""
    store = KVStore(2, ["cpu"] * 2, torch.float32, offloaded=[1], window=3)
    store.reset(reserve_tokens=40)
    g = torch.Generator().manual_seed(0)
    written = [torch.randn(1, 2, 7, 4, generator=g)]
    store.append(1, written[0], -written[0])
    for step in range(12):
        token = torch.randn(1, 2, 1, 4, generator=g)
        written.append(token)
        store.append(1, token, -token)
        if step % 5 != 4:  # in between, only the ring (and the periodic flushes) hold the new tokens
            continue
        keys, values = store.staged(1)
        expected = torch.cat(written, dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
    store.truncate(10)
    keys, _ = store.staged(1)
    assert torch.equal(keys, torch.cat(written, dim=2)[:, :, :10])
    assert not store.ring_holds(1, torch.tensor([9])).item()  # the ring is not trusted after truncation
