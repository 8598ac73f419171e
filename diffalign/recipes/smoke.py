"""A recipe as shipped, run for two steps on a CPU: ``diffalign train CONFIG --smoke``.

Before renting a GPU for ``configs/sdxl_dpo.yaml`` a user wants to know that the recipe starts, reads data of
its layout, trains, checkpoints, logs to its tracker and writes its weights. ``--smoke`` runs exactly that on
the recipe's tiny random counterpart (``assets/models/tiny-*``, the same architecture family a few hundred
thousand parameters large) and on a sample dataset of the layout the recipe's objective reads, changing only
what a CPU cannot do: the real weights, the size, CUDA-only 8-bit AdamW, the reward models that need weights.
Everything else (tracker, caching, flips, EMA, checkpoints, mixed precision, every loss setting) stays as
shipped. The same overrides are what the tests apply to every recipe (tests/test_recipes.py), so a recipe that
passes its smoke run here is the recipe the suite runs.

The toy configs (``toy_*``, ``sign_*``, ``tiny_*``) already run on a CPU; their smoke run keeps their data and model and
only shortens them (:func:`toy_size_overrides`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from diffalign.objectives import OBJECTIVES
from diffalign.objectives.base import data_layout
from diffalign.paths import ASSETS, CONFIGS
from diffalign.recipes import samples
from diffalign.rewards.weighted import reward_names

# a recipe's prefix -> its tiny architecture; a language model's is the toy LM's with a chat template ("lm")
TINY = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "sd35": "tiny-sd3", "flux": "tiny-flux",
        "flux_kontext": "tiny-flux-kontext", "flux2_klein": "tiny-flux2-klein", "flux2": "tiny-flux2-dev", "qwen_image": "tiny-qwenimage",
        "qwen_image_edit": "tiny-qwenimage-edit-plus",
        "z_image": "tiny-zimage", "wan21": "tiny-wan", "wan22": "tiny-wan22",
        "hunyuanvideo15": "tiny-hunyuanvideo15", "qwen": "lm"}


def tiny_counterpart(recipe: str | Path) -> str | None:
    """The tiny architecture of a recipe, by the longest prefix of its name (qwen_image_dpo.yaml is Qwen-Image,
    qwen_dpo.yaml the Qwen language model); None for a name no prefix fits."""
    name = Path(recipe).name
    fits = [prefix for prefix in TINY if name.startswith(prefix + "_")]
    return TINY[max(fits, key=len)] if fits else None


class SampleData:
    """A sample dataset of each layout in ``root``, written on first use (``data["pairs"]`` is a parquet path),
    in the columns the recipes name: Pick-a-Pic v2's pairs (with PickScore's scores of both images as
    ``pickscore_0/1``, which sdxl_smpo.yaml reads), ranked lists, captioned and labelled images, and TRL's
    conversational formats with a chat LM to read them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._made: dict[str, Path] = {}

    def __getitem__(self, layout: str | tuple) -> Path:
        """``data[layout]``, or ``data[layout, source_columns, renames, frames]``: edits of source images in those
        columns, with the sample's columns renamed (sample name, recipe's name) as a recipe names them, of clips of
        ``frames`` frames instead of images if that is given and not 0."""
        key = (*layout, 0)[:4] if isinstance(layout, tuple) else (layout, (), (), 0)
        if key not in self._made:
            self._made[key] = self._write(*key)
        return self._made[key]

    def _write(self, layout: str, sources: tuple[str, ...], renames: tuple[tuple[str, str], ...],
               frames: int) -> Path:
        if layout == "lm":
            return samples.chat_lm(self.root / "chat-lm")
        if layout not in samples.EXAMPLE_LAYOUTS:
            raise KeyError(f"no sample dataset of layout {layout!r}; layouts: lm, {', '.join(samples.EXAMPLE_LAYOUTS)}")
        tag = hashlib.sha1(repr((sources, renames, frames)).encode()).hexdigest()[:8] \
            if sources or renames or frames else ""
        path = samples.write_example(layout, self.root / f"{layout}{'-' + tag if tag else ''}.parquet", sources,
                                     frames)
        if renames:
            table = pq.read_table(path)
            # a column the sample has already under the recipe's name (sdxl_smpo's pickscore_0/1) stays as it is
            names = {old: new for old, new in renames if new not in table.column_names}
            pq.write_table(table.rename_columns([names.get(c, c) for c in table.column_names]), path)
        return path


# the columns of the sample datasets, by the data key that names them in a recipe
_SAMPLE_COLUMNS = {"caption_column": "caption", "image_columns": ["jpg_0", "jpg_1"], "label_column": "label_0",
                   "score_columns": [["pick_0", "pick_1"], ["aes_0", "aes_1"]], "images_column": "images",
                   "scores_column": "scores", "image_column": "image"}


def _renames(shipped_data: dict, layout: str) -> tuple[tuple[str, str], ...]:
    """(sample column, the recipe's column) for each column a recipe names otherwise than the sample data."""
    sample_columns = {**_SAMPLE_COLUMNS, "label_column": "label"} if layout == "labelled_images" else _SAMPLE_COLUMNS

    def flat(value) -> list[str]:
        return [c for item in value for c in (item if isinstance(item, list) else [item])] \
            if isinstance(value, list) else [value]

    pairs = {}
    for key, sample in sample_columns.items():
        if key in shipped_data:
            pairs.update(zip(flat(sample), flat(shipped_data[key])))
    return tuple((old, new) for old, new in pairs.items() if old != new)


@dataclass(frozen=True)
class Override:
    """One key a smoke run changes, and why a CPU cannot run it as shipped."""

    key: str
    value: str
    why: str

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


def _shipped(recipe: str | Path) -> dict:
    return yaml.safe_load(Path(recipe if Path(recipe).exists() else CONFIGS / recipe).read_text())


SMOKE_FRAMES = 5  # a video recipe's clips on a CPU: two latent frames of Wan's VAE
SMOKE_GROUP = 4  # samples a prompt in a smoke run's rounds, at most


def recipe_overrides(recipe: str | Path, data: SampleData) -> list[Override]:
    """What a CPU run of the shipped recipe ``recipe`` (a configs/ name or path) changes, each with its reason."""
    shipped = _shipped(recipe)
    objective = OBJECTIVES[shipped["objective"]["name"]]
    tiny = tiny_counterpart(recipe)
    if tiny is None:
        raise KeyError(f"{Path(recipe).name}: no tiny counterpart for its name; known prefixes: {', '.join(TINY)}")
    weights = "real weights: the tiny random counterpart of the same architecture"
    size = "the size a CPU runs in seconds"
    keys = [Override("model.path", str(data["lm"] if tiny == "lm" else ASSETS / "models" / tiny), weights),
            Override("model.random_init", "true", weights),
            Override("data.resolution", "32", size), Override("train.batch_size", "1", size),
            Override("train.gradient_accumulation", "1", size), Override("train.max_steps", "2", size)]
    width, height = shipped.get("data", {}).get("width"), shipped.get("data", {}).get("resolution")
    if width:  # crops that are not square stay so, near the recipe's aspect ratio, in whole 16-pixel tokens
        keys.append(Override("data.width", str(max(16, round(32 * width / (height or width) / 16) * 16)), size))
    frames = min(shipped.get("data", {}).get("frames") or 0, SMOKE_FRAMES)
    if frames:
        keys.append(Override("data.frames", str(frames), size))
    layout = data_layout(objective)  # DDO's and DRIFT's rounds pair real examples with their samples
    if layout is not None:
        sources = tuple(shipped.get("data", {}).get("source_columns") or ())
        renames = _renames(shipped.get("data", {}), layout)
        what = [f"edits of source images in {', '.join(sources)}"] if sources else []
        what += ["in the recipe's column names"] if renames else []
        what += [f"clips of {frames} frames"] if frames else []
        keys.append(Override("data.path", str(data[layout, sources, renames, frames]),
                             f"a sample dataset of the recipe's layout ({'; '.join([layout, *what])})"))
    if shipped["train"].get("ema_every", 1) > 2:
        keys.append(Override("train.ema_every", "1", "the EMA must update within the run's 2 steps"))
    if shipped["train"].get("adam_8bit"):
        keys.append(Override("train.adam_8bit", "false", "bitsandbytes' 8-bit AdamW needs CUDA"))
    if objective.dataset == "online":  # a round of 2 groups in 2 steps, of 2-step samples
        keys += [Override(key, value, size) for key, value in (
            ("online.groups_per_round", "2"), ("online.sample_batch_size", "2"), ("online.steps_per_round", "2"),
            ("objective.sample_steps", "2"))]
    if objective.dataset == "online" and objective.whole_groups:  # DGPO: each batch is whole groups, here one of 2
        keys += [Override("online.group_size", "2", size), Override("train.batch_size", "2", size)]
    elif objective.dataset == "online" and (shipped.get("online", {}).get("group_size") or 0) > SMOKE_GROUP:
        keys.append(Override("online.group_size", str(SMOKE_GROUP), size))  # Flow-GRPO's 24 clips a prompt
    sources = tuple(shipped.get("data", {}).get("source_columns") or ())
    if objective.dataset == "online" and objective.scored and sources:  # edit rounds: instructions with sources
        why = "the recipe's reward models need their real weights; DDPO's JPEG size needs none"
        keys += [Override("online.reward", "jpeg_incompressibility", why),
                 Override("online.reward_weights", "null", why),
                 Override("online.prompts", str(data["images", sources, _renames(shipped.get("data", {}), "images")]),
                          f"a sample table of instructions with source images in {', '.join(sources)}")]
    elif objective.dataset == "online" and objective.scored and reward_names(shipped["online"].get("reward")) == ["ocr"]:
        keys.append(Override("online.prompts", "sign_train", "the recipe's prompt file is not on this machine; the "
                             "sign world's prompts quote a word to render, as the recipe's do (the OCR reward needs "
                             "no weights and stays)"))
    elif objective.dataset == "online" and objective.scored:
        why = "the recipe's reward model needs its real weights; the toy reward judges the toy prompts"
        toy = "toy_preference_soft" if objective.samples_in_loss else "toy_preference"  # a gradient to follow
        keys += [Override("online.reward", toy, why), Override("online.prompts", "toy_train", why)]
    return keys


def cpu_overrides(recipe: str | Path, data: SampleData) -> list[str]:
    """The ``key=value`` overrides of :func:`recipe_overrides` (what the tests append to a recipe)."""
    return [str(override) for override in recipe_overrides(recipe, data)]


# the self-play loops: a round of 2 prompts x 2 samples told apart by their JPEG size (see grpo's note below)
_SELF_PLAY = ["online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2", "objective.sample_steps=2",
              "online.reward=jpeg_incompressibility"]

# per objective, what makes its toy run short: fewer inversion steps, rounds of 2 groups of 2-step samples
SHORTER = {"inpo": ["objective.options.inversion_steps=2"], "smpo": ["objective.options.inversion_steps=2",
                                                              "objective.options.renoise_iterations=1",
                                                              "data.score_columns=[[pick_0, pick_1]]"],
           "d3po": ["online.groups_per_round=2", "online.steps_per_round=2", "objective.sample_steps=2"],
           "ddo": ["objective.sample_steps=2", "online.groups_per_round=2", "online.steps_per_round=2"],
           # random tiny models draw no toy shapes, so the toy preference scores them all alike (no advantage);
           # DDPO's JPEG size tells their images apart
           **{name: ["online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2",
                     "objective.sample_steps=2", "online.reward=jpeg_incompressibility"]
              for name in ("grpo", "grpo_guard", "disco", "nft", "awm", "dgpo")},
           "tempflow_grpo": ["online.groups_per_round=2", "online.group_size=2", "objective.options.parents=1",
                             "online.steps_per_round=2", "objective.sample_steps=2",
                             "online.reward=jpeg_incompressibility"],
           **{name: _SELF_PLAY for name in ("sppo", "dno", "gpo", "inpo_nash")},
           "rso": [*_SELF_PLAY, "objective.options.accepted=2"],
           "drift": ["objective.sample_steps=2", "online.groups_per_round=2", "online.steps_per_round=2"],
           # the reward-gradient methods keep the differentiable toy reward, which scores any image of a toy prompt
           **{name: ["objective.sample_steps=4"] for name in ("alignprop", "refl")},
           "draft": ["objective.sample_steps=4", "objective.options.k=2"]}

SMALLER = ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "validation.images_per_prompt=1",
           "validation.steps=2"]


TOY_PREFIXES = ("toy_", "sign_", "tiny_")  # the shapes and text worlds', the sign world's, the tiny model's


def toy_size_overrides(name: str) -> list[str]:
    """What a smoke run changes in the toy config ``name`` (toy_<objective>.yaml, sign_<objective>.yaml): its
    size, nothing else. The sign and video worlds keep their rewards: their bases draw words and moving shapes, which
    the OCR model and the toy video preference tell apart."""
    stem = Path(name).name.removesuffix(".yaml")
    objective = _shipped(name)["objective"]["name"]
    keys = [key for key in SHORTER.get(objective, []) if not key.startswith("data.")]
    if stem.startswith(("sign_", "toy_video_")):
        keys = [key for key in keys if not key.startswith("online.reward=")]
    return [*SMALLER, *keys]


def is_toy(recipe: str | Path) -> bool:
    """A config that runs on a CPU as shipped (the toy worlds' and the tiny model's)."""
    return Path(recipe).name.startswith(TOY_PREFIXES)


def smoke_overrides(recipe: str | Path, work: Path) -> list[Override]:
    """Every key ``--smoke`` changes in ``recipe``, with its reason; sample data is written under ``work``, and the
    run's output goes there too, so a smoke run never mixes with a real one. A recipe's latent cache stays where
    the recipe puts it: its entries are keyed by model and image, so the tiny model's never meet the real one's."""
    if is_toy(recipe):
        keys = [Override(*key.split("=", 1), "the size a CPU runs in seconds") for key in toy_size_overrides(recipe)]
    else:
        keys = recipe_overrides(recipe, SampleData(work / "data"))
    keys.append(Override("output_dir", str(work / "run"), "a smoke run's own folder, not the recipe's run"))
    return keys


def smoke_folder(recipe: str | Path) -> Path:
    """Where ``diffalign train RECIPE --smoke`` writes: runs/smoke/<recipe name>."""
    return Path("runs") / "smoke" / Path(recipe).stem
