"""Guidance with a negative model: the unconditional half of the guided batch comes from the
negative model (mixed by `mix`), the conditional half from the base, and a pipeline sampling
through the wrapper is the plain pipeline when the negative model is the base itself."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.negative_guidance import NegativeGuidedDenoiser, with_negative_guidance
from diffalign.diffusion.sampling import generate
from diffalign.paths import TOY_BASE

MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


def _perturbed(unet: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    other = copy.deepcopy(unet)
    torch.manual_seed(0)
    for p in other.parameters():
        p.data.add_(scale * torch.randn_like(p))
    return other


def test_unconditional_half_is_the_mix_of_base_and_negative_by_hand():
    pipe = load_pipeline(TOY_BASE)
    base, negative = pipe.unet, _perturbed(pipe.unet)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500, 500, 500])
    embeds = pipe.encode_prompt(["", "", "a red circle", "a blue square"], "cpu", 1, False)[0]
    with torch.no_grad():
        wrapped = NegativeGuidedDenoiser(base, negative, mix=0.25)(x, t, encoder_hidden_states=embeds).sample
        b = base(x, t, encoder_hidden_states=embeds).sample
        n = negative(x[:2], t[:2], encoder_hidden_states=embeds[:2]).sample
    torch.testing.assert_close(wrapped[:2], 0.75 * b[:2] + 0.25 * n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wrapped[2:], b[2:], rtol=0, atol=0)


def test_a_pipeline_with_the_base_as_negative_samples_what_the_plain_pipeline_does():
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    plain = generate(load_pipeline(TOY_BASE), prompts, seeds, steps=8)
    pipe = load_pipeline(TOY_BASE)
    same = generate(with_negative_guidance(pipe, copy.deepcopy(pipe.unet)), prompts, seeds, steps=8)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    pipe = load_pipeline(TOY_BASE)
    other = generate(with_negative_guidance(pipe, _perturbed(pipe.unet)), prompts, seeds, steps=8)
    assert (other - plain).abs().mean() > 1e-3
    unguided = generate(pipe, prompts, seeds, steps=8, guidance_scale=1.0)  # no guidance: the base alone
    torch.testing.assert_close(unguided, generate(load_pipeline(TOY_BASE), prompts, seeds, steps=8, guidance_scale=1.0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model, options", [("tiny-sd3", {}), ("tiny-flux", {"true_cfg_scale": 4.0, "negative_prompt": ""})])
def test_flow_pipelines_sample_with_a_negative_model(model, options):
    """SD3 stacks its guided batch; FLUX.1-dev, guidance-distilled, has an unconditional call only with diffusers'
    true CFG (``true_cfg_scale`` and a negative prompt), and that call is where the negative model goes."""
    folder = MODELS / model
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    settings = {"steps": 3, "resolution": 32, **options}
    plain = generate(load_pipeline(folder, random_init=True), prompts, seeds, **settings)
    pipe = load_pipeline(folder, random_init=True)
    same = generate(with_negative_guidance(pipe, copy.deepcopy(pipe.transformer)), prompts, seeds, **settings)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    pipe = load_pipeline(folder, random_init=True)
    guided = with_negative_guidance(pipe, _perturbed(pipe.transformer, scale=0.5))
    assert (generate(guided, prompts, seeds, **settings) - plain).abs().mean() > 1e-3
    if model == "tiny-flux":  # without true CFG no unconditional branch is computed: the negative model is unused
        without = {"steps": 3, "resolution": 32}
        torch.testing.assert_close(generate(guided, prompts, seeds, **without),
                                   generate(load_pipeline(folder, random_init=True), prompts, seeds, **without))


def test_eval_adds_a_negative_guided_row(tmp_path):
    import json

    from diffalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["eval", "--base", str(TOY_BASE), "--negative", str(TOY_BASE), "--prompts", str(prompts),
                 "--seeds", "2", "--steps", "4", "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report/metrics.json").read_text())
    row = summary["base+negative"]
    assert row["toy_preference_win_rate"] == 0.5  # the base as its own negative: identical images, all ties


def test_eval_on_flux_guides_with_a_negative_model_through_true_cfg(tmp_path, capsys):
    import json

    from diffalign.cli import main

    folder = tmp_path / "tiny-flux"
    load_pipeline(MODELS / "tiny-flux", random_init=True).save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    command = ["eval", "--base", str(folder), "--negative", str(folder), "--prompts", str(prompts), "--seeds", "2",
               "--steps", "2", "--resolution", "32", "--out", str(tmp_path / "report")]
    assert main(command) != 0 and "--negative on a FLUX pipeline needs --true-cfg" in capsys.readouterr().err
    assert main([*command, "--true-cfg", "4"]) == 0
    row = json.loads((tmp_path / "report/metrics.json").read_text())["base+negative"]
    assert row["toy_preference_win_rate"] == 0.5  # the base as its own negative: the same images as the base
    assert main(["eval", "--base", str(TOY_BASE), "--prompts", str(prompts), "--true-cfg", "4",
                 "--out", str(tmp_path / "x")]) != 0
    assert "--true-cfg is FluxPipeline's" in capsys.readouterr().err
