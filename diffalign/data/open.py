"""The dataset of a run's ``data`` settings in the layout its objective reads: one function for the trainers, for
``diffalign data check`` and for ``diffalign train CONFIG --plan``, so all three read a table the same way."""

from __future__ import annotations

from typing import Any

from diffalign.data.images import CaptionedImageDataset
from diffalign.data.layouts import LAYOUTS
from diffalign.data.pairs import ImageRows, PairDataset
from diffalign.data.ranked import RankedListDataset
from diffalign.data.video import VideoClips
from diffalign.data.text import TextCompletionDataset, TextPairDataset, TextRankedDataset, TextUnpairedDataset

def open_dataset(dc: Any, layout: str, tokenizer: Any = None) -> ImageRows:
    """The dataset of the data settings ``dc`` (a config's ``data``) in ``layout`` (a key of :data:`LAYOUTS`).

    A text layout tokenizes with ``tokenizer``; without one its rows are checked but not tokenized.
    """
    if layout.startswith("text_"):
        common = {"tokenizer": tokenizer, "max_length": dc.max_length, "prompt_column": dc.prompt_column,
                  "on_error": dc.on_error, "split": dc.split}
        if layout == "text_completions":
            return TextCompletionDataset(dc.path, completion_column=dc.completion_column, **common)
        if layout == "text_unpaired":
            return TextUnpairedDataset(dc.path, completion_column=dc.completion_column, label_column=dc.label_column,
                                       **common)
        if layout == "text_ranked":
            return TextRankedDataset(dc.path, completions_column=dc.completions_column,
                                     scores_column=dc.scores_column, step_pattern=dc.step_pattern, **common)
        return TextPairDataset(dc.path, chosen_column=dc.chosen_column, rejected_column=dc.rejected_column,
                               weight_column=dc.weight_column, margin_column=dc.margin_column,
                               reward_columns=tuple(dc.reward_columns) or None, **common)
    images = {"on_error": dc.on_error, "split": dc.split, "max_image_pixels": dc.max_image_pixels,
              "resolution": dc.resolution, "width": dc.width, "caption_column": dc.caption_column,
              "source_columns": tuple(dc.source_columns),
              "video": VideoClips(dc.frames, dc.fps) if dc.frames else None}
    if layout in ("images", "labelled_images"):
        return CaptionedImageDataset(dc.path, image_column=dc.image_column,
                                     label_column=dc.label_column if layout == "labelled_images" else None, **images)
    if layout == "ranked":
        return RankedListDataset(dc.path, images_column=dc.images_column, scores_column=dc.scores_column, **images)
    if layout != "pairs":
        raise ValueError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    return PairDataset(dc.path, image_columns=tuple(dc.image_columns), label_column=dc.label_column,
                       score_columns=[tuple(pair) for pair in dc.score_columns], score_scales=dc.score_scales,
                       ties=dc.ties, weight_column=dc.weight_column, margin_column=dc.margin_column,
                       ensemble_columns=[tuple(pair) for pair in dc.ensemble_columns], ensemble=dc.ensemble,
                       reward_columns=tuple(dc.reward_columns) or None, **images)
