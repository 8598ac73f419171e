"""What the tests change in a shipped config to run it on a CPU (the recipes' tiny counterparts, the toy
configs' size) and the tiny training configs several tests start from; shared by the tests, in one place."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import yaml
from fixtures import chat_lm, conversations_parquet, images_parquet, pickapic_parquet, ranked_parquet

from diffalign.objectives import OBJECTIVES
from diffalign.paths import ASSETS, CONFIGS, ROOT
from diffalign.train import load_config

# a recipe's prefix -> its tiny architecture; a language model's is the toy LM's with a chat template (`lm` below)
TINY = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "sd35": "tiny-sd3", "flux": "tiny-flux",
        "qwen": "lm"}


def recipe_data(root: Path) -> dict[str, Path]:
    """Tiny data of each layout an objective reads, with the columns the recipes name, in ``root``."""
    pairs = pickapic_parquet(root / "pairs.parquet", 4)
    # sdxl_smpo.yaml reads PickScore's scores of both images as pickscore_0 / pickscore_1
    table = pq.read_table(pairs)
    table = table.append_column("pickscore_0", table["pick_0"]).append_column("pickscore_1", table["pick_1"])
    pq.write_table(table, pairs)
    return {"pairs": pairs, "ranked": ranked_parquet(root / "ranked.parquet"),
            "images": images_parquet(root / "images.parquet", 4),
            "labelled_images": images_parquet(root / "labelled.parquet", 4, labels=[1, 0, 1, 0]),
            # language models: TRL's conversational formats (UltraFeedback's pairs, kto-mix's labelled rows)
            "lm": chat_lm(root / "chat-lm"), "text_pairs": conversations_parquet(root / "conversations.parquet"),
            "text_unpaired": conversations_parquet(root / "labelled-conversations.parquet", layout="unpaired")}


def cpu_overrides(recipe: str, data: dict[str, Path]) -> list[str]:
    """The keys a CPU run of ``recipe`` changes, and nothing else."""
    shipped = yaml.safe_load((CONFIGS / recipe).read_text())
    objective = OBJECTIVES[shipped["objective"]["name"]]
    tiny = TINY[recipe.split("_")[0]]
    keys = [f"model.path={data['lm'] if tiny == 'lm' else ASSETS / 'models' / tiny}", "model.random_init=true",  # weights
            "data.resolution=32", "train.batch_size=1", "train.gradient_accumulation=1", "train.max_steps=2"]  # size
    real = getattr(objective, "real_data", False)  # DDO: online, pairing real images with its samples
    if objective.dataset != "online" or real:
        keys.append(f"data.path={data['images' if real else objective.dataset]}")  # the recipe's data
    if shipped["train"].get("adam_8bit"):
        keys.append("train.adam_8bit=false")  # bitsandbytes is CUDA-only
    if objective.dataset == "online":  # a round of 2 groups in 2 steps, of 2-step samples
        keys += ["online.groups_per_round=2", "online.sample_batch_size=2", "online.steps_per_round=2",
                 "objective.sample_steps=2"]
    if objective.dataset == "online" and objective.scored:
        # the reward model needs real weights; the toy reward judges toy prompts
        keys += ["online.reward=toy_preference", "online.prompts=toy_train"]
    return keys


# the self-play loops: a round of 2 prompts x 2 samples told apart by their JPEG size (see grpo's note below)
_SELF_PLAY = ["online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2", "objective.sample_steps=2",
              "online.reward=jpeg_incompressibility"]


SHORTER = {"inpo": ["objective.options.inversion_steps=2"], "smpo": ["objective.options.inversion_steps=2",
                                                              "objective.options.renoise_iterations=1",
                                                              "data.score_columns=[[pick_0, pick_1]]"],
           "d3po": ["online.groups_per_round=2", "online.steps_per_round=2", "objective.sample_steps=2"],
           "ddo": ["objective.sample_steps=2", "online.groups_per_round=2", "online.steps_per_round=2"],
           # random tiny models draw no toy shapes, so the toy preference scores them all alike (no advantage);
           # DDPO's JPEG size tells their images apart
           "grpo": ["online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2",
                    "objective.sample_steps=2", "online.reward=jpeg_incompressibility"],
           "disco": ["online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2",
                     "objective.sample_steps=2", "online.reward=jpeg_incompressibility"],
           "nft": ["online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2",
                   "objective.sample_steps=2", "online.reward=jpeg_incompressibility"],
           **{name: _SELF_PLAY for name in ("sppo", "dno", "gpo", "inpo_nash")},
           "rso": [*_SELF_PLAY, "objective.options.accepted=2"],
           "drift": ["objective.sample_steps=2", "online.groups_per_round=2", "online.steps_per_round=2"]}


SMALLER = ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "validation.images_per_prompt=1",
           "validation.steps=2"]


def toy_size_overrides(name: str) -> list[str]:
    """What a test changes in the toy config ``name`` (toy_<objective>.yaml): its size, nothing else."""
    objective = name.removeprefix("toy_").removesuffix(".yaml")
    return [*SMALLER, *(key for key in SHORTER.get(objective, []) if not key.startswith("data."))]


def tiny_config(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml",
                       [f"data.path={data}", f"output_dir={out}", "model.path=" + str(ROOT / "assets/models/tiny-sdxl"),
                        *overrides])
