"""Examples read ahead by threads: the same examples, counts and errors as reading in the loop."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fixtures import pickapic_parquet
from run_configs import tiny_config

from diffalign.data import ClassRatioOrder, DeterministicOrder, PairDataset
from diffalign.data.reader import ExampleReader
from diffalign.errors import UserError
from diffalign.train import train


def read_all(dataset, workers: int, positions, ahead: int = 4):
    reader = ExampleReader(dataset, DeterministicOrder(len(dataset), seed=3), workers)
    taken = []
    for n, position in enumerate(positions):
        reader.prefetch(positions[n:n + ahead])
        taken.append(reader.take(position))
    reader.close()
    return taken


def test_threads_give_the_same_examples_and_bad_row_counts_as_the_loop(tmp_path):
    path = pickapic_parquet(tmp_path / "p.parquet", 10, corrupt_rows=(2, 5, 6))
    positions = list(range(25))  # past one epoch: bad rows met again are counted again
    in_loop, threaded = PairDataset(path, resolution=16), PairDataset(path, resolution=16)
    a, b = read_all(in_loop, 0, positions), read_all(threaded, 3, positions)
    assert [e.index for e in a] == [e.index for e in b]
    assert not {2, 5, 6} & {e.index for e in a}  # bad rows replaced by the next usable ones
    assert all(torch.equal(x.pixels, y.pixels) and x.image_ids == y.image_ids for x, y in zip(a, b))
    assert in_loop.skipped == threaded.skipped and in_loop.skipped["jpg_1"] > 0


def test_reads_run_in_the_threads_and_a_bad_row_raises_only_when_taken(tmp_path):
    path = pickapic_parquet(tmp_path / "p.parquet", 6, corrupt_rows=(4,))
    dataset = PairDataset(path, resolution=16, on_error="raise")
    order = DeterministicOrder(len(dataset), seed=0)
    bad_position = [order[p] for p in range(6)].index(4)
    read_by, read = [], dataset.read

    def recording_read(*args, **kwargs):
        read_by.append(threading.current_thread().name)
        return read(*args, **kwargs)

    dataset.read = recording_read
    reader = ExampleReader(dataset, order, workers=2)
    reader.prefetch(range(6))  # the bad row is among them: reading it ahead raises nothing
    good = [p for p in range(6) if p != bad_position]
    assert [reader.take(p).index for p in good] == [order[p] for p in good]
    assert read_by and all(name.startswith("diffalign-read") for name in read_by)
    with pytest.raises(UserError, match=r"row 4, column 'jpg_1'"):
        reader.take(bad_position)
    reader.close()


def test_no_usable_row_is_a_clear_error(tmp_path):
    path = pickapic_parquet(tmp_path / "p.parquet", 3, corrupt_rows=(0, 1, 2))
    reader = ExampleReader(PairDataset(path, resolution=16), DeterministicOrder(3, seed=0), workers=2)
    reader.prefetch([0])
    with pytest.raises(UserError, match="can be decoded"):
        reader.take(0)


@pytest.mark.slow
def test_training_is_identical_with_and_without_reader_threads(tmp_path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 8, corrupt_rows=(3,))
    runs = {}
    for workers in (0, 3):
        out = tmp_path / f"workers-{workers}"
        summary = train(tiny_config(data, out, "train.max_steps=4", "train.batch_size=2", f"data.workers={workers}"))
        runs[workers] = ([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()],
                         summary["skipped_rows"])
    assert runs[0] == runs[3] and runs[0][1] == {"jpg_1": 1}


def test_the_order_across_an_epoch_boundary_is_the_same_however_it_is_visited():
    size = 7
    fresh = [DeterministicOrder(size, seed=5)[p] for p in range(3 * size)]  # one new order per lookup
    assert [DeterministicOrder(size, seed=5)[p] for p in range(size)] != fresh[size:2 * size]  # epochs differ
    order = DeterministicOrder(size, seed=5)
    zigzag = [p for k in range(size, 3 * size) for p in (k, k - size)]  # alternating epochs, as read-ahead does
    assert [order[p] for p in zigzag] == [fresh[p] for p in zigzag]
    assert sorted(fresh[:size]) == list(range(size))
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(order.__getitem__, zigzag * 3)) == [fresh[p] for p in zigzag] * 3


def test_reader_threads_default_to_none_on_cpu_and_negative_counts_are_refused(tmp_path):
    from diffalign.train.trainer import PreferenceTrainer

    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    # on CPU the step's own compute needs every core; on a GPU the default is 4 threads
    assert PreferenceTrainer(tiny_config(data, tmp_path / "run")).reader.workers == 0
    with pytest.raises(UserError, match="data.workers must be >= 0"):
        tiny_config(data, tmp_path / "bad", "data.workers=-1")


def test_a_class_ratio_order_is_a_pure_function_of_seed_and_position():
    """Each position draws its class with the given probability, then a member uniformly; the k-th
    example does not depend on what was read before it (resume, processes, threads)."""
    order = ClassRatioOrder([[10, 11, 12], [20]], [0.25, 0.75], seed=3)
    read = [order[k] for k in range(4000)]
    assert sum(x >= 20 for x in read) / len(read) == pytest.approx(0.75, abs=0.03)
    assert {x for x in read if x < 20} == {10, 11, 12}
    again = ClassRatioOrder([[10, 11, 12], [20]], [0.25, 0.75], seed=3)
    assert [again[k] for k in (3999, 7, 7)] == [read[3999], read[7], read[7]]
    assert [ClassRatioOrder([[10, 11, 12], [20]], [0.25, 0.75], seed=4)[k] for k in range(50)] != read[:50]
