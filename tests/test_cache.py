"""The tensor cache's storage: buffered shards, append-only per-writer indexes, crash safety."""

import pytest
import torch

from diffalign.diffusion import TensorCache
from diffalign.errors import UserError


def entry(i: int, size: int = 16) -> dict[str, torch.Tensor]:
    return {"latents": torch.full((size,), float(i)), "pooled": torch.arange(3) + i}


def assert_entry(cache: TensorCache, i: int) -> None:
    got = cache.get(f"k{i}")
    assert set(got) == {"latents", "pooled"}
    assert torch.equal(got["latents"], entry(i)["latents"]) and torch.equal(got["pooled"], entry(i)["pooled"])


def test_entries_are_buffered_into_large_shards_and_published_by_flush(tmp_path):
    one_entry = 16 * 4 + 3 * 8  # bytes of entry(i)
    cache = TensorCache(tmp_path, shard_bytes=4 * one_entry)
    for i in range(10):
        cache.put_many({f"k{i}": entry(i)})
        assert f"k{i}" in cache  # readable at once, published or not
        assert_entry(cache, i)
    # two full buffers of 4 became two shards; the last 2 entries wait in memory
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2
    assert len(TensorCache(tmp_path)) == 8 and len(cache) == 10
    cache.flush()
    cache.flush()  # nothing left: no empty shard
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    reopened = TensorCache(tmp_path)
    assert len(reopened) == 10
    for i in range(10):
        assert_entry(reopened, i)


def test_publishing_appends_the_new_lines_only(tmp_path):
    cache = TensorCache(tmp_path, shard_bytes=1)  # every put is published at once
    cache.put_many({f"k{i}": entry(i) for i in range(50)})
    (index,) = tmp_path.glob("index-*.jsonl")
    first_line = index.read_text().splitlines()[0] + "\n"
    with index.open("a") as f:  # a line the cache object never wrote: a rewrite would drop it
        f.write(first_line)
    before = index.read_text()
    cache.put_many({"k50": entry(50)})
    after = index.read_text()
    assert after.startswith(before) and after[len(before):].count("\n") == 1 and '"k50"' in after[len(before):]


def test_writers_never_share_a_file_and_see_each_other_on_refresh(tmp_path):
    a, b = TensorCache(tmp_path, shard_bytes=1), TensorCache(tmp_path, shard_bytes=1)
    a.put_many({"k0": entry(0)})
    b.put_many({"k1": entry(1)})
    assert len(list(tmp_path.glob("index-*.jsonl"))) == 2
    assert "k1" not in a
    a.refresh()
    assert_entry(a, 1)
    b.put_many({"k2": entry(2)})
    a.refresh()  # reads only b's new line
    assert_entry(a, 2) and len(a) == 3


def test_a_crash_mid_write_loses_only_the_unpublished_entries(tmp_path):
    cache = TensorCache(tmp_path, shard_bytes=10**9)
    cache.put_many({f"k{i}": entry(i) for i in range(3)})
    cache.flush()
    cache.put_many({"k3": entry(3)})  # buffered, never published: the process dies here
    (index,) = tmp_path.glob("index-*.jsonl")
    with index.open("a") as f:
        f.write('{"key": "k4", "shard": "shard-')  # a line torn by the crash
    (tmp_path / "shard-x-00001.safetensors.tmp").write_bytes(b"half a shard")

    reopened = TensorCache(tmp_path)
    assert len(reopened) == 3 and "k3" not in reopened and "k4" not in reopened
    for i in range(3):
        assert_entry(reopened, i)
    reopened.put_many({"k3": entry(3)})  # encoded again, into the new writer's own files
    reopened.flush()
    assert_entry(TensorCache(tmp_path), 3)


def test_a_damaged_index_line_is_a_clear_error(tmp_path):
    (tmp_path / "index-abc.jsonl").write_text('{"key": "k0", "shard": "s.safetensors", "fields": ["x"]}\nnot json\n')
    with pytest.raises(UserError, match="damaged line.*delete"):
        TensorCache(tmp_path)


def test_only_the_most_recently_used_shards_stay_open(tmp_path):
    cache = TensorCache(tmp_path, shard_bytes=1, open_shards=2)
    for i in range(5):
        cache.put_many({f"k{i}": entry(i)})  # one shard each
    reader = TensorCache(tmp_path, open_shards=2)
    for i in [0, 1, 2, 3, 4, 0]:
        assert_entry(reader, i)
        assert len(reader._handles) <= 2
    assert list(reader._handles) == [reader.index["k4"][0], reader.index["k0"][0]]
