"""Preference datasets from local files, and the deterministic order they are read in."""

from diffalign.data.images import CaptionedImageDataset
from diffalign.data.labels import pairs_to_labelled_images
from diffalign.data.order import ClassRatioOrder, CurriculumOrder, DeterministicOrder, example_generator
from diffalign.data.pairs import GroupExample, PairDataset, RowSource
from diffalign.data.ranked import RankedListDataset

__all__ = ["CaptionedImageDataset", "ClassRatioOrder", "CurriculumOrder", "DeterministicOrder", "GroupExample", "PairDataset",
           "RankedListDataset", "RowSource", "example_generator", "pairs_to_labelled_images"]
