"""Every objective on every backbone family the package supports (SD 1.5 and SDXL UNets, the SD3 and
FLUX.1 MMDiTs, the PixArt DiT): two optimiser steps of the objective's toy recipe on a tiny random model
log a finite loss and move the trained weights (a LoRA, or the full denoiser where the recipe trains it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import images_parquet, pickapic_parquet, ranked_parquet
from run_configs import SHORTER
from safetensors.torch import load_file

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.backbones import backbone_for
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train
from diffalign.train.memory import LiveStorage

BACKBONES = ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2-klein", "tiny-flux2-dev", "tiny-zimage",
             "tiny-qwenimage", "tiny-pixart", "tiny-wan"]
DATA = {"diffusion_dpo": "pairs", "inpo": "pairs", "smpo": "pairs", "rank_dpo": "ranked", "diffusion_kto": "labelled",
        "self_npo": "images", "ddo": "images", "d3po": None, "grpo": None, "grpo_guard": None, "nft": None, "awm": None, "dgpo": None,
        "disco": None, "draft": None, "alignprop": None, "refl": None, "sppo": None, "dno": None, "gpo": None, "inpo_nash": None, "rso": None, "drift": "images",
        "tempflow_grpo": None}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"pairs": pickapic_parquet(root / "pairs.parquet", 4), "ranked": ranked_parquet(root / "ranked.parquet"),
            "images": images_parquet(root / "images.parquet", 4),
            "labelled": images_parquet(root / "labelled.parquet", 4, labels=[1, 0, 1, 0])}


def _moved(run: Path, model: str) -> bool:
    """Whether the final weights differ from the base: a LoRA's B (zero at the start) left zero, or the
    full denoiser's tensors left equal to the random base's."""
    final = run / "final"
    if (final / "pytorch_lora_weights.safetensors").is_file():
        lora = load_file(final / "pytorch_lora_weights.safetensors")
        return any(v.abs().max() > 0 for k, v in lora.items() if ".lora.up." in k or ".lora_B." in k)
    base = load_pipeline(ASSETS / "models" / model, random_init=True, seed=0)
    attr = "unet" if getattr(base, "unet", None) is not None else "transformer"
    trained = load_file(final / attr / "diffusion_pytorch_model.safetensors")
    return any(not torch.equal(trained[k], v) for k, v in getattr(base, attr).state_dict().items())


# Methods that meet the backbone only through code another method already runs everywhere train on fewer
# architectures, which keeps the suite inside its time: the self-play loops share one class (SelfPlayObjective: its
# rounds, pi_t and denoising scores) and differ only in their pair rules and losses, each checked by hand, so SPPO
# runs on every backbone and the others on SD3; DisCO re-scores recorded steps as Flow-GRPO and D3PO do, so it runs
# on SD3 too; DGPO's units, noising and predictions are NFT's and AWM's (ForwardProcessObjective), so it runs on one
# epsilon and one flow model; GRPO-Guard's rounds and step re-scoring are Flow-GRPO's, with the step means recorded
# beside the trajectories, so it runs on one epsilon model and two flow models of other latent layouts. The
# reward-gradient methods share one sampling loop (RewardGradientObjective): DRaFT runs on every backbone, AlignProp
# and ReFL, which differ only in where the gradient starts and in the loss, on SD3. TempFlow-GRPO is Flow-GRPO's step
# re-scoring on rounds whose noise sits at one step (the round driver's window and starting-noise hooks), with a
# weight of each unit: one epsilon model and two flow models, as GRPO-Guard.
FEWER = {**{name: ("tiny-sd3",) for name in ("dno", "gpo", "inpo_nash", "rso", "drift", "disco", "alignprop", "refl")},
         "dgpo": ("tiny-sd15", "tiny-sd3"), **{name: ("tiny-sd15", "tiny-sd3", "tiny-flux")
                                               for name in ("grpo_guard", "tempflow_grpo")}}
EVERY = [(objective, model) for objective in sorted(DATA) for model in BACKBONES
         if model in FEWER.get(objective, BACKBONES)]


@pytest.mark.slow
@pytest.mark.parametrize("objective, model", EVERY)
def test_every_objective_trains_on_every_backbone(objective, model, data, tmp_path):
    _trains(objective, model, data, tmp_path)


@pytest.mark.parametrize("model", BACKBONES)
def test_a_batch_is_decoded_one_image_at_a_time(model):
    """A round or an evaluation batch goes through the VAE one image per call: the peak of decoding 4 latents is
    that of one plus the outputs (decoded slices and their concatenation), not 4 images' activations. Qwen-Image's
    decoder once took the batch whole; the memory estimate of qwen_image_grpo.yaml found it (a round batch of 16
    at 512 px held 27 GiB more)."""
    backbone = backbone_for(load_pipeline(ASSETS / "models" / model, random_init=True, seed=0))
    peaks = []
    for n in (1, 4):
        latents = torch.randn(n, *backbone.latent_shape(64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), LiveStorage() as live:
            images = backbone.decode_latents(latents)
        peaks.append(live.peak)
    assert images.shape == (4, 3, 64, 64)
    assert peaks[1] <= peaks[0] + 2 * 4 * images[0].nbytes


EDIT_MODELS = ["tiny-flux-kontext", "tiny-flux2-klein", "tiny-qwenimage-edit-plus"]


@pytest.fixture(scope="module")
def edits(tmp_path_factory) -> dict[str, Path]:
    """The same layouts as edits: each row with a source image (column ``source``)."""
    root, sources = tmp_path_factory.mktemp("edits"), ("source",)
    return {"pairs": pickapic_parquet(root / "pairs.parquet", 4, sources=sources),
            "ranked": ranked_parquet(root / "ranked.parquet", sources=sources),
            "images": images_parquet(root / "images.parquet", 4, sources=sources),
            "labelled": images_parquet(root / "labelled.parquet", 4, labels=[1, 0, 1, 0], sources=sources)}


@pytest.mark.slow
@pytest.mark.parametrize("model", EDIT_MODELS)
@pytest.mark.parametrize("objective", sorted(o for o, kind in DATA.items() if kind and o not in ("ddo", "drift")))
def test_every_offline_objective_trains_on_edits(objective, model, edits, tmp_path):
    """Every objective that reads a dataset (not the online ones, which sample) on edit data: pairs, lists and
    images of a source image each, on the edit models."""
    _trains(objective, model, edits, tmp_path, "data.source_columns=[source]")


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(o for o, kind in DATA.items() if kind is None
                                             and (o not in FEWER or o == "grpo_guard")
                                             and o not in ("awm", "draft")))  # AWM's rounds are NFT's;
# DRaFT samples inside its loss from text prompts alone, and refuses edits; GRPO-Guard keeps the step means of an
# edit round's trajectories, whose conditioning carries the sources
def test_every_online_objective_trains_on_rounds_of_edits(objective, edits, tmp_path):
    """Every objective that samples (DDO and DRIFT, which pair samples with real images, refuse edits) on rounds
    of edits: online.prompts a table of instructions with a source image each, on Qwen-Image-Edit, the model that
    only edits and whose text encoder reads the sources too."""
    _trains(objective, "tiny-qwenimage-edit", edits, tmp_path, f"online.prompts={edits['images']}",
            "data.source_columns=[source]", "online.reward=jpeg_incompressibility")


# self_npo's recipe is a full fine-tune; AWM's shadow weights and units are NFT's; FEWER: above
@pytest.mark.parametrize("objective", sorted(set(DATA) - {"self_npo", "awm"} - set(FEWER)))
def test_every_objective_trains_the_whole_flux_transformer(objective, data, tmp_path):
    _trains(objective, "tiny-flux", data, tmp_path, "train.lora_rank=0")


def _trains(objective: str, model: str, data: dict[str, Path], tmp_path: Path, *overrides: str) -> None:
    kind = DATA[objective]
    config = load_config(CONFIGS / f"toy_{objective}.yaml", [
        f"model.path={ASSETS / 'models' / model}", "model.random_init=true", f"output_dir={tmp_path / 'run'}",
        *([f"data.path={data[kind]}"] if kind else []), "data.resolution=32", "train.batch_size=2",
        "train.max_steps=2", "train.checkpoint_every=0", "train.log_every=1", "train.lr_scheduler=constant",
        "train.warmup_steps=0", "train.learning_rate=1e-2", "validation.every=0", *SHORTER.get(objective, []),
        *overrides])
    summary = train(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert _moved(tmp_path / "run", model)
