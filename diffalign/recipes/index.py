"""Where the recipes' local data comes from: each relative ``data.path`` or ``online.prompts`` a shipped recipe
reads, with the one command that makes it. diffalign never downloads; these are what a user runs once, and what
``--plan`` and a missing-file error name. docs/recipes.md lists the same per recipe (a test keeps them equal)."""

from __future__ import annotations

FLOW_GRPO_PROMPTS = ("git clone --depth 1 https://github.com/yifan123/flow_grpo /tmp/flow_grpo && mkdir -p data && "
                     "cp /tmp/flow_grpo/dataset/pickscore/train.txt data/pickscore_train.txt")

LOCAL_DATA = {
    "data/pickscore_train.txt": ("Flow-GRPO's PickScore prompt set (one prompt a line, from its repository)",
                                 FLOW_GRPO_PROMPTS),
    "data/ocr_train.txt": ("Flow-GRPO's OCR training prompts (text to render between quotes, one prompt a line)",
                           FLOW_GRPO_PROMPTS.replace("dataset/pickscore/train.txt data/pickscore_train.txt",
                                                     "dataset/ocr/train.txt data/ocr_train.txt")),
    "data/pickapic_kto": ("Pick-a-Pic v2's pairs as per-image liked/not-liked labels",
                          "diffalign pairs-to-labels yuvalkirstain/pickapic_v2 data/pickapic_kto"),
    "data/syn_pic": ("ranked lists of several generators' images scored by reward models (Syn-Pic's layout)",
                     "diffalign generate-ranked configs/sdxl_generate_ranked.yaml output_dir=data/syn_pic"),
    "data/pickapic_v2": ("Pick-a-Pic v2's pairs with PickScore's scores of both images (pickscore_0, pickscore_1)",
                         "score both images of each pair with PickScore into those columns (your own script, or "
                         "diffalign generate-ranked's pairs.jsonl, which holds them)"),
    "data/laion_captioned": ("captioned images (caption, image): any image-text set, e.g. a LAION subset",
                             "a folder of images with a .txt caption beside each, or a parquet table"),
    "data/captioned_photos": ("real captioned photos of the quality DDO should move towards (caption, image)",
                              "a folder of images with a .txt caption beside each, or a parquet table"),
    "data/edit_prompts.parquet": ("edit instructions with their source images (instruction, source_image)",
                                  "a parquet table of those two columns; diffalign data example images "
                                  "sample.parquet --sources source_image writes one to copy"),
    "data/video_pairs.jsonl": ("pairs of videos with their prompt and label (caption, jpg_0, jpg_1, label_0), each "
                               "video a file beside the index",
                               "a .jsonl index of those columns; diffalign data example pairs sample.jsonl --frames 33 "
                               "writes one to copy"),
    "data/video_prompts.txt": ("video prompts, one a line", "any text file of prompts, one a line"),
}


def how_to_make(path: str) -> str | None:
    """What a recipe's local ``path`` holds and the command that makes it; None for a path no recipe reads."""
    if path not in LOCAL_DATA:
        return None
    what, command = LOCAL_DATA[path]
    return f"{path} is {what}; make it with: {command}"
