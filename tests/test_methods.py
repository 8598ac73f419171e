"""Each method owns its settings: ``objective.options`` is read into the method's own dataclass (defaults, ranges,
choices, documentation in one place), old flat keys say where they moved, and ``diffalign methods`` prints what the
classes declare."""

from __future__ import annotations

import dataclasses

import pytest

from diffalign.cli import main
from diffalign.config import ObjectiveConfig, field_docs, save_config
from diffalign.errors import UserError
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.catalog import method_family
from diffalign.paths import CONFIGS
from diffalign.train import load_config

# the rounds' sampler (sample_*, sampler) is every online method's: their round driver samples with it
SHARED = {"name", "loss", "beta", "loss_options", "timestep_sampler", "t_range", "weighting", "sample_steps",
          "sample_eta", "sample_guidance_scale", "sampler", "options"}


def test_the_objective_section_keeps_only_what_every_method_shares():
    assert {f.name for f in dataclasses.fields(ObjectiveConfig)} == SHARED


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_method_names_its_paper_and_documents_every_option(name):
    cls = OBJECTIVES[name]
    assert cls.paper and method_family(cls) in ("offline", "online", "self-play", "LM offline", "LM online",
                                                "LM self-play")
    docs = field_docs(cls.Options)
    assert all(docs.values()), f"{name}: options without a comment above them: {[k for k, v in docs.items() if not v]}"


def test_options_take_the_methods_defaults_and_the_resolved_config_shows_them(tmp_path):
    config = load_config(CONFIGS / "toy_nft.yaml", ["objective.options.beta=0.5"])
    assert (config.objective.options.beta, config.objective.options.kl_coef) == (0.5, 1e-4)
    grpo = load_config(CONFIGS / "toy_grpo.yaml")
    assert (grpo.objective.options.kl_coef, grpo.objective.options.ratio_clip) == (0.01, 1e-4)
    save_config(config, tmp_path / "config.yaml")  # what a run writes, read back as it is
    again = load_config(tmp_path / "config.yaml")
    assert again.objective.options == config.objective.options


@pytest.mark.parametrize("override, message", [
    ("objective.kl_coef=0.1", r"config key 'objective.kl_coef' is now objective.options.kl_coef \(grpo, nft\)"),
    ("objective.nft_beta=0.5", r"is now objective.options.beta \(nft\)"),
    ("objective.options.kl_coeff=0.1", r"objective.options.kl_coeff: grpo has no option 'kl_coeff' \(did you mean "
                                       r"'kl_coef'\?\)"),
    ("objective.options.ratio_clip=2", r"objective.options.ratio_clip=2.0 is out of range for grpo: it must be in "
                                       r"\(0, 1\)"),
    ("objective.options.advantage_std=batch", "objective.options.advantage_std='batch' is not valid for grpo; choose "
                                              "one of global, group"),
    ("objective.options.kl_coef=.inf", "objective.options.kl_coef=inf: settings must be finite numbers"),
    ("objective.options.kl_coef=much", r"config key 'objective.options.kl_coef' expects float"),
])
def test_a_methods_options_are_checked_naming_the_method(override, message):
    with pytest.raises(UserError, match=message):
        load_config(CONFIGS / "toy_grpo.yaml", [override])


def test_a_method_without_options_refuses_any(tmp_path):
    with pytest.raises(UserError, match="diffusion_dpo has no option 'ratio_clip'. Its options: none"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", ["objective.options.ratio_clip=0.1"])


def test_diffalign_methods_lists_every_method_and_one_methods_options(capsys):
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n{name} " in f"\n{listed}" for name in OBJECTIVES)
    assert main(["methods", "grpo"]) == 0
    page = capsys.readouterr().out
    assert "objective.options.kl_coef (float, default 0.01, allowed [0, inf))" in page
    assert "Flow-GRPO's and DiffusionNFT's beta" in page and "Liu et al. 2025" in page
    assert main(["methods", "grp"]) == 2
    assert "did you mean 'grpo'" in capsys.readouterr().err
