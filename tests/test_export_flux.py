"""FLUX.1 exports: the run's LoRA for FluxPipeline.load_lora_weights, the same LoRA in kohya-ss names giving the
same images, and the transformer in Black Forest Labs' layout read back equal by diffusers' own single-file
loader (an independent implementation of the key mapping)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from fixtures import pickapic_parquet
from safetensors.torch import load_file, save_file

from diffalign.cli import main
from diffalign.diffusion import load_pipeline
from diffalign.diffusion.finetuned import load_finetuned
from diffalign.diffusion.sampling import generate
from diffalign.train import load_config, train
from diffalign.train.export import merged_pipeline
from diffalign.train.flux_keys import flux_transformer_to_original

ROOT = Path(__file__).resolve().parent.parent
TINY_FLUX = ROOT / "assets/models/tiny-flux"
# diffusers' kohya FLUX reader splits the single blocks' fused linear1 at FLUX.1's real widths (3072, 12288),
# so the run it reads back adapts the double blocks only; test_kohya_fusion_... checks the single blocks
DOUBLE_BLOCKS_ONLY = ("train.lora_targets=[transformer_blocks.0.attn.to_q, transformer_blocks.0.attn.to_k, "
                      "transformer_blocks.0.attn.to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, "
                      "ff.net.0.proj, ff_context.net.2]")
PROMPTS, SEEDS = ["a red circle", "a blue square"], [1, 2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two-step LoRA runs on tiny FLUX: the attention targets of both streams (both kinds of block), double blocks only,
    and the default targets (the image stream's attention projections)."""
    root = tmp_path_factory.mktemp("flux-export")
    data = pickapic_parquet(root / "pairs.parquet", 4)
    made = {}
    for name, targets in (("attention", "train.lora_targets=[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, "
                                        "add_v_proj, to_add_out]"), ("double", DOUBLE_BLOCKS_ONLY),
                          ("default", "train.seed=0")):  # the config's default targets: to_q, to_k, to_v, to_out.0
        made[name] = root / name
        train(load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
            f"data.path={data}", f"output_dir={made[name]}", f"model.path={TINY_FLUX}", "model.random_init=true",
            "train.lora_rank=4", "train.max_steps=2", "train.learning_rate=1e-2", "train.checkpoint_every=0",
            targets]))
    return made


def _images(pipe) -> torch.Tensor:
    return generate(pipe, PROMPTS, SEEDS, steps=2, resolution=32, guidance_scale=3.5)


def test_lora_export_loads_in_flux_pipeline_and_changes_its_images(runs, tmp_path):
    assert main(["export", str(runs["attention"]), "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    pipe = load_pipeline(TINY_FLUX, random_init=True)
    base = _images(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = _images(pipe)
    assert (loaded - base).abs().mean() > 1e-3
    torch.testing.assert_close(loaded, _images(load_finetuned(runs["attention"])), rtol=1e-4, atol=1e-4)


def test_kohya_and_diffusers_exports_give_the_same_images(runs, tmp_path):
    run = runs["double"]
    assert main(["export", str(run), "--format", "kohya", "--dtype", "fp32", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    keys = load_file(tmp_path / "k.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # q, k, v fused: rank 3 x 4
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12
    images = {}
    for name, lora in (("kohya", tmp_path / "k.safetensors"), ("diffusers", tmp_path / "lora")):
        pipe = load_pipeline(TINY_FLUX, random_init=True)
        pipe.load_lora_weights(str(lora))
        images[name] = _images(pipe)
    assert (images["diffusers"] - _images(load_pipeline(TINY_FLUX, random_init=True))).abs().mean() > 1e-3
    torch.testing.assert_close(images["kohya"], images["diffusers"], rtol=1e-4, atol=1e-4)


def test_kohya_fusion_is_the_same_update_on_the_single_blocks(runs, tmp_path):
    """linear1 fuses q, k, v and the MLP input: up @ down of the fused LoRA is the separate updates stacked, with
    zero rows for the untrained MLP projection (4x the width)."""
    assert main(["export", str(runs["attention"]), "--format", "kohya", "--dtype", "fp32",
                 "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    ours = load_file(runs["attention"] / "final" / "pytorch_lora_weights.safetensors")
    name = "lora_unet_single_blocks_0_linear1"
    fused = kohya[f"{name}.lora_up.weight"] @ kohya[f"{name}.lora_down.weight"]
    assert kohya[f"{name}.alpha"].item() == kohya[f"{name}.lora_down.weight"].shape[0] == 16  # 4 parts x rank 4
    inner = 32
    parts = fused.split([inner, inner, inner, 4 * inner])
    for part, module in zip(parts, ("to_q", "to_k", "to_v")):
        prefix = f"transformer.single_transformer_blocks.0.attn.{module}"
        torch.testing.assert_close(part, ours[f"{prefix}.lora_B.weight"] @ ours[f"{prefix}.lora_A.weight"])
    assert parts[3].abs().max() == 0


@pytest.mark.slow
def test_single_file_transformer_reads_back_equal_with_diffusers_loader(tmp_path):
    """At FLUX.1's real width (diffusers' single-file reader assumes 3072 and an MLP ratio of 4), one block of each
    kind: every tensor comes back equal, the final norm's (shift, scale) halves included."""
    config = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 16, "pooled_projection_dim": 16,
              "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    model.save_config(tmp_path / "config" / "transformer")
    state = flux_transformer_to_original(model.state_dict())
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "guidance_in.in_layer.weight",
            "final_layer.adaLN_modulation.1.weight"} <= set(state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "flux.safetensors")
    del state
    read = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux.safetensors"), config=str(tmp_path / "config"),
                                                   subfolder="transformer", local_files_only=True,
                                                   torch_dtype=torch.bfloat16)
    expected, got = model.state_dict(), read.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_cli_single_file_export_of_a_flux_run_is_its_merged_transformer_in_original_names(runs, tmp_path):
    out = tmp_path / "flux.safetensors"
    assert main(["export", str(runs["attention"]), "--format", "single-file", "--dtype", "fp32", "--out", str(out)]) == 0
    state = load_file(out)
    expected = flux_transformer_to_original(merged_pipeline(runs["attention"]).transformer.state_dict())
    assert set(state) == set(expected) and "single_blocks.0.linear1.weight" in state  # the transformer alone
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)
    base = flux_transformer_to_original(load_pipeline(TINY_FLUX, random_init=True).transformer.state_dict())
    assert not torch.equal(state["double_blocks.0.img_attn.qkv.weight"], base["double_blocks.0.img_attn.qkv.weight"])


def test_kohya_export_of_a_run_with_the_default_targets_is_the_same_update(runs, tmp_path):
    """Issue 40: with attention-only targets the run's file keeps diffusers' lora.down/lora.up names, which the kohya
    export did not know (KeyError). Each fused kohya LoRA is the run's separate updates stacked."""
    ours = load_file(runs["default"] / "final" / "pytorch_lora_weights.safetensors")
    assert any(".lora.down." in key for key in ours)  # the naming that broke the export
    assert main(["export", str(runs["default"]), "--format", "kohya", "--dtype", "fp32",
                 "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    inner = 32
    for name, prefix, parts in (("double_blocks_0_img_attn_qkv", "transformer_blocks.0.attn", 3),
                                ("single_blocks_0_linear1", "single_transformer_blocks.0.attn", 4)):
        fused = kohya[f"lora_unet_{name}.lora_up.weight"] @ kohya[f"lora_unet_{name}.lora_down.weight"]
        pieces = fused.split([inner] * 3 + [4 * inner] * (parts - 3))
        for piece, module in zip(pieces, ("to_q", "to_k", "to_v")):
            key = f"transformer.{prefix}.{module}"
            torch.testing.assert_close(piece, ours[f"{key}.lora.up.weight"] @ ours[f"{key}.lora.down.weight"])
        assert all(piece.abs().max() == 0 for piece in pieces[3:])
    out = kohya["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] @ \
        kohya["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"]
    torch.testing.assert_close(out, ours["transformer.transformer_blocks.0.attn.to_out.0.lora.up.weight"]
                               @ ours["transformer.transformer_blocks.0.attn.to_out.0.lora.down.weight"])
