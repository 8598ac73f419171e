"""A run on a step-distilled model says what training it means, at its start and in its plan; other models run
without a word (diffalign.diffusion.distilled)."""

from __future__ import annotations

import shutil

import pytest
from fixtures import pickapic_parquet

from diffalign.diffusion.distilled import distilled_family
from diffalign.paths import ASSETS, CONFIGS
from diffalign.recipes.plan import plan_lines
from diffalign.train import load_config, train


@pytest.mark.parametrize("name, family", [
    ("black-forest-labs/FLUX.1-schnell", "FLUX.1-schnell"), ("Tongyi-MAI/Z-Image-Turbo", "a Turbo model"),
    ("stabilityai/sdxl-turbo", "a Turbo model"), ("black-forest-labs/FLUX.2-klein-4B", "FLUX.2 klein"),
    ("ByteDance/SDXL-Lightning", "a Lightning model"), ("/models/my_lcm_sd15", "an LCM"),
    ("black-forest-labs/FLUX.2-klein-base-4B", None), ("black-forest-labs/FLUX.1-dev", None),
    ("stabilityai/stable-diffusion-xl-base-1.0", None), ("Qwen/Qwen-Image", None), ("assets/models/tiny-flux", None),
])
def test_step_distilled_models_are_told_by_their_names(name, family):
    assert distilled_family(name) == family


def test_a_run_and_a_plan_on_a_turbo_model_say_what_training_it_means(tmp_path, capsys):
    turbo = tmp_path / "tiny-z-image-turbo"
    shutil.copytree(ASSETS / "models" / "tiny-zimage", turbo)
    data = pickapic_parquet(tmp_path / "pairs.parquet", 2)
    overrides = [f"model.path={turbo}", "model.random_init=true", f"data.path={data}", "data.resolution=32",
                 f"output_dir={tmp_path / 'run'}", "train.batch_size=1", "train.max_steps=1", "validation.every=0"]
    train(load_config(CONFIGS / "toy_diffusion_dpo.yaml", overrides))
    said = " ".join(capsys.readouterr().err.split())
    assert f"warning: {turbo} reads as a Turbo model, a step-distilled model" in said
    plan = "\n".join(plan_lines(CONFIGS / "toy_diffusion_dpo.yaml", [*overrides, f"output_dir={tmp_path / 'plan'}"],
                                memory=False))
    assert "reads as a Turbo model" in plan
    plain = [f"model.path={ASSETS / 'models' / 'tiny-zimage'}", f"data.path={data}"]
    assert "step-distilled" not in "\n".join(plan_lines(CONFIGS / "toy_diffusion_dpo.yaml", plain, memory=False))
