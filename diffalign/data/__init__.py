"""Preference datasets from local files, and the deterministic order they are read in."""

from diffalign.data.images import CaptionedImageDataset
from diffalign.data.order import DeterministicOrder, example_generator
from diffalign.data.pairs import GroupExample, PairDataset, RowSource
from diffalign.data.ranked import RankedListDataset

__all__ = ["CaptionedImageDataset", "DeterministicOrder", "GroupExample", "PairDataset", "RankedListDataset", "RowSource",
           "example_generator"]
