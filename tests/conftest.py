import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# parquet tables are converted into the datasets cache; keep the tests' conversions out of the user's
_DATASETS_CACHE = tempfile.mkdtemp(prefix="diffalign-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)

# pytest-xdist runs a worker per core (pyproject's addopts): each worker's torch, and the processes its tests start,
# take their share of the cores instead of all of them each (the tiny models' ops gain little from more threads)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def small_toy_datasets(tmp_path_factory):
    """The toy datasets (toy:pairs ...) in a cache folder of the test session's own, made on first use at a size
    a test affords: 1 group of 2 candidates per training prompt instead of 16 of 4. Every test has it: making the
    full-size image datasets takes 80 s on 2 cores, and the user's ~/.cache stays untouched by the tests."""
    from diffalign.synth import sign_pairs
    from diffalign.toy import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFALIGN_CACHE", str(tmp_path_factory.mktemp("diffalign-cache")))
        patch.setattr(datasets, "GROUPS_PER_PROMPT", 1)
        patch.setattr(datasets, "CANDIDATES", 2)
        patch.setattr(sign_pairs, "GROUPS_PER_PROMPT", 1)
        patch.setattr(sign_pairs, "CANDIDATES", 2)
        yield datasets.cache_root()
