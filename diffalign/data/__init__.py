"""Preference datasets from local files, and the deterministic order they are read in."""

from diffalign.data.order import DeterministicOrder, example_generator
from diffalign.data.pairs import PairDataset, PairExample, RowSource

__all__ = ["DeterministicOrder", "PairDataset", "PairExample", "RowSource", "example_generator"]
