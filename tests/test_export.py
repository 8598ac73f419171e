"""Export: LoRA for load_lora_weights, merged diffusers folder, and the original single-file layout
read back by diffusers' own single-file loader (an independent implementation of the key mapping)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from fixtures import pickapic_parquet
from safetensors import safe_open
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.diffusion import load_pipeline
from diffalign.diffusion.finetuned import load_finetuned
from diffalign.errors import UserError
from diffalign.train import load_config, train
from diffalign.train.export import export_run, save_single_file, single_file_state

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {"tiny-sd15": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline,
             "tiny-sd3": StableDiffusion3Pipeline}
UNET_PIPELINES = ("tiny-sd15", "tiny-sdxl")
# SD3's LoRA also adapts the text stream's attention, as configs/sd3_dpo.yaml does
SD3_CONTEXT_TARGETS = ("train.lora_targets=[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, "
                       "to_add_out]",)


def _sdxl_with_distinct_text_widths(folder: Path) -> Path:
    """tiny-sdxl with a wider second text encoder, as in the real SDXL (768 vs 1280).

    diffusers' single-file loader tells SDXL's two text encoders apart by width, so with equal
    widths (the shipped tiny config) it would read the first encoder into both.
    """
    shutil.copytree(ROOT / "assets/models/tiny-sdxl", folder)
    _edit_configs(folder, {
        "text_encoder_2/config.json": {"hidden_size": 48, "intermediate_size": 192, "projection_dim": 48},
        "unet/config.json": {"cross_attention_dim": 80, "projection_class_embeddings_input_dim": 96}})
    return folder


def _edit_configs(folder: Path, edit: dict[str, dict]) -> None:
    for name, changes in edit.items():
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, **changes}))


def _sd3_like_the_real_one(folder: Path, **transformer: object) -> Path:
    """tiny-sd3 saved with weights, made like the real SD3 where diffusers' single-file loader relies on it.

    The loader tells CLIP-L from CLIP-G by width (768 vs 1280 in SD3), and it reads CLIP-L's
    projection as the identity, which SD3's CLIP-L is (its pooled output is used unprojected).
    ``transformer`` changes the MMDiT's config, e.g. SD3.5's RMS norms and dual attention.
    """
    shutil.copytree(ROOT / "assets/models/tiny-sd3", folder / "config")
    _edit_configs(folder / "config", {
        "text_encoder_2/config.json": {"hidden_size": 48, "intermediate_size": 192, "projection_dim": 48},
        "transformer/config.json": {"pooled_projection_dim": 80, "joint_attention_dim": 80, **transformer},
        "text_encoder_3/config.json": {"d_model": 80}})
    pipe = load_pipeline(folder / "config", random_init=True)
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(32))
    pipe.save_pretrained(folder / "weights")
    return folder / "weights"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run and a full fine-tune on each UNet family, a LoRA run on SD3 (2 steps; weights moved off the base)."""
    root = tmp_path_factory.mktemp("export")
    data = pickapic_parquet(root / "pairs.parquet", 4)
    models = {"tiny-sd15": ROOT / "assets/models/tiny-sd15",
              "tiny-sdxl": _sdxl_with_distinct_text_widths(root / "tiny-sdxl"),
              "tiny-sd3": _sd3_like_the_real_one(root / "tiny-sd3")}
    made = {}
    for model, folder in models.items():
        for lora in (4, 0) if model in UNET_PIPELINES else (4,):
            out = root / f"{model}-{lora}"
            train(load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
                f"data.path={data}", f"output_dir={out}", f"model.path={folder}",
                f"model.random_init={model in UNET_PIPELINES}",
                f"train.lora_rank={lora}", "train.max_steps=2", "train.learning_rate=1e-2", "train.checkpoint_every=0",
                "train.reference_dtype=fp32", *SD3_CONTEXT_TARGETS * (model == "tiny-sd3")]))
            made[model, lora] = out
    made["folders"] = models
    return made


def _denoiser_outputs(pipe, seed: int = 0) -> torch.Tensor:
    """The UNet's or the SD3 transformer's prediction for fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    if getattr(pipe, "transformer", None) is not None:
        config = pipe.transformer.config
        x = torch.randn(1, config.in_channels, 8, 8, generator=g)
        with torch.no_grad():
            return pipe.transformer(x, encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim, generator=g),
                                    pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                                    timestep=torch.tensor([500])).sample
    unet = pipe.unet
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=text, **extra).sample


@pytest.mark.slow
@pytest.mark.parametrize("model", PIPELINES)
def test_lora_export_loads_with_load_lora_weights(runs, model, tmp_path):
    run = runs[model, 4]
    written = export_run(run, "lora", tmp_path / "lora")
    trained = load_finetuned(run)
    base = load_pipeline(runs["folders"][model], random_init=model in UNET_PIPELINES)
    base_out = _denoiser_outputs(base)
    base.load_lora_weights(str(written.parent))
    torch.testing.assert_close(_denoiser_outputs(base), _denoiser_outputs(trained))
    if model == "tiny-sd3":  # the text stream's projections went through the export and load too
        assert any(".add_q_proj.lora" in key for key in load_file(written))
    assert not torch.allclose(_denoiser_outputs(base), base_out)  # the LoRA changes the model


@pytest.mark.parametrize("model", UNET_PIPELINES)
def test_kohya_export_of_the_default_targets_loads_as_the_trained_model(runs, model, tmp_path):
    """The runs train the default LoRA targets (the attention projections); their kohya file, read by diffusers'
    kohya loader, gives the trained model's outputs (FLUX's: test_export_flux.py)."""
    run = runs[model, 4]
    assert main(["export", str(run), "--format", "kohya", "--dtype", "fp32", "--out", str(tmp_path / "k.safetensors")]) == 0
    base = load_pipeline(runs["folders"][model], random_init=True)
    base.load_lora_weights(str(tmp_path / "k.safetensors"))
    torch.testing.assert_close(_denoiser_outputs(base), _denoiser_outputs(load_finetuned(run)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora", [4, 0])
def test_merged_diffusers_folder_equals_the_trained_model(runs, lora, tmp_path):
    run = runs["tiny-sd15", lora]
    export_run(run, "diffusers", tmp_path / "merged", dtype="fp32")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    torch.testing.assert_close(_denoiser_outputs(merged), _denoiser_outputs(load_finetuned(run)), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model", PIPELINES)
def test_single_file_is_read_back_by_diffusers_single_file_loader(runs, model, tmp_path):
    run = runs[model, 4]
    path = export_run(run, "single-file", tmp_path / "model.safetensors", dtype="fp32")
    keys = load_file(path).keys()
    denoiser = "joint_blocks.0.x_block.attn.qkv." if model == "tiny-sd3" else "input_blocks."
    assert any(k.startswith("model.diffusion_model." + denoiser) for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in keys)
    reference = load_finetuned(run)
    reference.fuse_lora()
    reference.unload_lora_weights()
    _assert_read_back_equal(path, PIPELINES[model], runs["folders"][model], reference)


def _assert_read_back_equal(path: Path, pipeline_class, config_folder: Path, reference) -> None:
    """diffusers' single-file loader reads every weight of ``reference`` back from ``path``, unchanged."""
    pipe = pipeline_class.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(reference, name, None) is None:
            continue
        expected, got = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        missing = {k for k in expected if k not in got}
        assert not missing, f"{name}: {sorted(missing)[:5]}"
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, msg=f"{name}.{k}")


def test_sd35_single_file_keeps_rms_norms_and_dual_attention(tmp_path):
    """SD3.5-medium's MMDiT adds q/k RMS norms and a second image attention (``attn2``) per block."""
    folder = _sd3_like_the_real_one(tmp_path, qk_norm="rms_norm", dual_attention_layers=[0])
    pipe = load_pipeline(folder)
    state = single_file_state(pipe)
    for key in ("joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.0.x_block.attn2.ln_q.weight",
                "joint_blocks.1.context_block.attn.ln_k.weight"):
        assert "model.diffusion_model." + key in state
    path = save_single_file(pipe, tmp_path / "sd35.safetensors")
    _assert_read_back_equal(path, StableDiffusion3Pipeline, folder, pipe)


def test_sd3_single_file_refuses_a_projected_clip_l(tmp_path):
    """SD3 files' loaders pool CLIP-L unprojected: a pipeline that projects it cannot be written faithfully."""
    pipe = load_pipeline(ROOT / "assets/models/tiny-sd3", random_init=True)
    with pytest.raises(UserError, match="text_projection is not the identity"):
        single_file_state(pipe)


def _unwrapped(message: str) -> str:
    """The CLI wraps errors at 100 columns; where a line breaks depends on the temp path's length."""
    return " ".join(message.split())


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_a_checkpoint_loads_as_the_run_stood_at_its_step(tmp_path, lora_rank):
    """A checkpoint (``run/checkpoints/step-N``) evaluates a run part-way: at the last step it is the
    final model (LoRA scale alpha / r included), at an earlier step an earlier one, on the run's base or on
    a base given for it; ``diffalign eval --aligned`` takes it like a run."""
    run = tmp_path / "run"
    train(load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={pickapic_parquet(tmp_path / 'pairs.parquet', 4)}", f"output_dir={run}",
        f"model.path={ROOT / 'assets/models/tiny-sd15'}", f"train.lora_rank={lora_rank}", "train.lora_alpha=2",
        "train.max_steps=2", "train.learning_rate=1e-2", "train.checkpoint_every=1", "train.reference_dtype=fp32"]))
    final = _denoiser_outputs(load_finetuned(run))
    last = _denoiser_outputs(load_finetuned(run / "checkpoints" / "step-0000002"))
    torch.testing.assert_close(last, final, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_denoiser_outputs(load_finetuned(run / "checkpoints" / "step-0000001")), final)
    base = tmp_path / "base"
    load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True, seed=0).save_pretrained(base)
    on_base = load_finetuned(run / "checkpoints" / "step-0000002", base=base)
    torch.testing.assert_close(_denoiser_outputs(on_base), final, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_a_checkpoint_exports_as_the_run_stood_at_its_step(tmp_path, lora_rank):
    """The step that ``eval`` picked exports like a finished run: the last step's checkpoint gives the run's own
    exports (the LoRA file and kohya file equal, its alpha / r scale folded in the same way; the merged model
    equal), an earlier step another model; a full fine-tune's checkpoint is refused as a LoRA."""
    run = tmp_path / "run"
    train(load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={pickapic_parquet(tmp_path / 'pairs.parquet', 4)}", f"output_dir={run}",
        f"model.path={ROOT / 'assets/models/tiny-sd15'}", f"train.lora_rank={lora_rank}", "train.lora_alpha=2",
        "train.max_steps=2", "train.learning_rate=1e-2", "train.checkpoint_every=1", "train.reference_dtype=fp32"]))
    last, earlier = run / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000001"
    merged = {}
    for name, source in (("run", run), ("last", last), ("earlier", earlier)):
        export_run(source, "diffusers", tmp_path / name / "merged", dtype="fp32")
        merged[name] = _denoiser_outputs(
            StableDiffusionPipeline.from_pretrained(tmp_path / name / "merged", local_files_only=True))
    torch.testing.assert_close(merged["last"], merged["run"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged["earlier"], merged["run"], atol=1e-4)
    single = export_run(earlier, "single-file", tmp_path / "earlier.safetensors", dtype="fp32")
    with safe_open(single, "pt") as f:
        assert f.metadata()["diffalign_step"] == "1" and f.metadata()["diffalign_run"] == str(run.resolve())
    if lora_rank == 0:
        with pytest.raises(UserError, match="trained the full model, not a LoRA"):
            export_run(last, "lora", tmp_path / "lora")
        return
    for fmt, out in (("lora", "lora"), ("kohya", "kohya.safetensors")):
        ours = load_file(export_run(last, fmt, tmp_path / "last" / out, dtype="fp32"))
        theirs = load_file(export_run(run, fmt, tmp_path / "run" / out, dtype="fp32"))
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, msg=key)
    assert main(["export", str(earlier), "--format", "lora", "--out", str(tmp_path / "earlier" / "lora")]) == 0
    pipe = load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True)
    pipe.load_lora_weights(str(tmp_path / "earlier" / "lora"))
    torch.testing.assert_close(_denoiser_outputs(pipe), merged["earlier"], atol=1e-5, rtol=1e-4)
    (earlier / "model.safetensors").unlink()  # as an FSDP or DeepSpeed checkpoint, which keeps its own shards
    with pytest.raises(UserError, match="holds no model.safetensors .* use the run's final weights instead"):
        export_run(earlier, "lora", tmp_path / "sharded")


def test_export_cli_and_clear_errors(runs, tmp_path, capsys):
    assert main(["export", str(runs["tiny-sd15", 0]), "--format", "lora", "--out", str(tmp_path / "x")]) == 2
    assert "full model, not a LoRA" in _unwrapped(capsys.readouterr().err)
    assert main(["export", str(tmp_path), "--format", "diffusers", "--out", str(tmp_path / "y")]) == 2
    assert "not a finished run directory" in _unwrapped(capsys.readouterr().err)
    with pytest.raises(UserError, match=".safetensors"):
        export_run(runs["tiny-sd15", 4], "single-file", tmp_path / "model.ckpt")
    with pytest.raises(UserError, match="kohya export covers SD 1.x/2.x, SDXL and FLUX LoRAs"):
        export_run(runs["tiny-sd3", 4], "kohya", tmp_path / "sd3.safetensors")
    assert main(["export", str(runs["tiny-sd15", 4]), "--format", "single-file",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").stat().st_size > 0


def _half_scale_lora_run(tmp_path: Path, model: str, layer: str) -> tuple[Path, torch.Tensor]:
    """A 2-step LoRA run at rank 4, alpha 2 (scale 0.5), and the update 0.5 * B A that ``layer`` trained
    with, read from the raw adapter in the run's last checkpoint."""
    run = tmp_path / "run"
    train(load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={pickapic_parquet(tmp_path / 'pairs.parquet', 4)}", f"output_dir={run}",
        f"model.path={ROOT / 'assets/models' / model}", "train.lora_rank=4", "train.lora_alpha=2", "train.max_steps=2",
        "train.learning_rate=1e-2", "train.checkpoint_every=2", "train.reference_dtype=fp32"]))
    state = load_file(run / "checkpoints" / "step-0000002" / "model.safetensors")
    down, up = (state[f"{layer}.lora_{part}.default.weight"] for part in ("A", "B"))
    return run, 0.5 * up @ down


def test_a_lora_alpha_other_than_the_rank_keeps_its_scale_when_loaded(tmp_path):
    """LoRA scales B A by alpha / rank; loaders assume alpha = rank unless told, so the saved B has the scale in it."""
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    run, update = _half_scale_lora_run(tmp_path, "tiny-sd15", layer)
    base = load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True).unet.get_submodule(layer).weight
    for pipe in (load_finetuned(run), _lora_loaded(run, "lora"), _lora_loaded(run, "kohya")):
        pipe.fuse_lora()
        torch.testing.assert_close(pipe.unet.get_submodule(layer).weight, base + update)


def _lora_loaded(run: Path, fmt: str):
    """The base with the exported LoRA (diffusers' folder, or one kohya file) loaded the way users load it."""
    pipe = load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True)
    if fmt == "lora":
        pipe.load_lora_weights(str(export_run(run, "lora", run.parent / "lora").parent))
        return pipe
    kohya = export_run(run, "kohya", run.parent / "kohya.safetensors", dtype="fp32")
    state = load_file(kohya)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(state)
    assert state[f"{name}.alpha"].item() == 4 and not any(k.startswith("unet.") for k in state)  # scale folded in
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    return pipe


def test_a_pixart_lora_run_loads_evaluates_and_exports_merged(tmp_path):
    """diffusers has no LoRA loader for PixArt: diffalign loads and merges the adapter with peft, at alpha / rank."""
    layer = "transformer_blocks.0.attn1.to_q"
    run, update = _half_scale_lora_run(tmp_path, "tiny-pixart", layer)
    base = load_pipeline(ROOT / "assets/models/tiny-pixart", random_init=True).transformer
    export_run(run, "diffusers", tmp_path / "merged", dtype="fp32")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True).transformer
    torch.testing.assert_close(merged.get_submodule(layer).weight, base.get_submodule(layer).weight + update)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    text = torch.randn(1, 5, base.config.caption_channels, generator=torch.Generator().manual_seed(1))
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        adapted = load_finetuned(run).transformer(x, encoder_hidden_states=text, timestep=t, **extra).sample
        folded = merged(x, encoder_hidden_states=text, timestep=t, **extra).sample
        plain = base(x, encoder_hidden_states=text, timestep=t, **extra).sample
    torch.testing.assert_close(folded, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapted, plain)


def test_a_published_denoiser_folder_in_the_hugging_face_cache_applies_to_its_base(runs, tmp_path, monkeypatch):
    """As the Diffusion-DPO authors publish their SDXL model: a Hub repository holding only ``unet/``."""
    import huggingface_hub.constants
    from fixtures import hub_cache_with

    run = runs["tiny-sd15", 0]
    published = tmp_path / "repo"
    shutil.copytree(run / "final" / "unet", published / "unet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache_with(tmp_path / "hub", "someone/dpo-sd15", published)
    base = tmp_path / "base"
    load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True).save_pretrained(base)
    aligned = load_finetuned("someone/dpo-sd15", base=base)
    torch.testing.assert_close(_denoiser_outputs(aligned), _denoiser_outputs(load_finetuned(run)))
    assert not torch.allclose(_denoiser_outputs(aligned), _denoiser_outputs(load_pipeline(base)))
    (published / "unet" / "diffusion_pytorch_model.safetensors").rename(published / "unet" / "weights.bin")
    with pytest.raises(UserError, match="cannot load the trained unet in"):
        load_finetuned(published, base=base)


def test_every_weights_file_diffalign_writes_is_as_readable_as_its_other_files(tmp_path):
    """safetensors 0.8 (and diffusers' and accelerate's savers through it) creates files 0600 (safetensors
    issue #782), so another user, a container or an inference server could not read the weights. Under an
    unusual umask (027: 0640 for a new file), the final weights, a checkpoint, the latent cache and every
    export get the mode of the run's config.yaml."""
    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        train(load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
            f"data.path={pickapic_parquet(tmp_path / 'pairs.parquet', 4)}", f"output_dir={run}",
            f"model.path={ROOT / 'assets/models/tiny-sd15'}", "train.max_steps=1", "train.checkpoint_every=1",
            f"data.cache_dir={tmp_path / 'cache'}"]))
        export_run(run, "kohya", tmp_path / "kohya.safetensors")
        export_run(run, "single-file", tmp_path / "single.safetensors")
        export_run(run, "diffusers", tmp_path / "merged")
    finally:
        os.umask(old)
    assert (run / "config.yaml").stat().st_mode & 0o777 == 0o640
    written = {str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777 for path in tmp_path.rglob("*.safetensors")}
    assert {"run/final/pytorch_lora_weights.safetensors", "run/checkpoints/step-0000001/model.safetensors",
            "kohya.safetensors", "single.safetensors", "merged/unet/diffusion_pytorch_model.safetensors"} <= set(written)
    assert any(name.startswith("cache/") for name in written)
    assert {name: mode for name, mode in written.items() if mode != 0o640} == {}


def test_weights_are_kept_where_the_file_system_has_no_unix_modes(tmp_path, monkeypatch):
    """Setting the mode is best effort: on a file system that refuses chmod (a mounted bucket) the file
    written stays, and nothing fails."""
    from pathlib import Path

    from diffalign.paths import with_usual_permissions

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")

    def refuse(self, mode):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "chmod", refuse)
    assert with_usual_permissions(weights) == weights and weights.read_bytes() == b"weights"


def test_an_export_refuses_to_overwrite_unless_asked_and_never_writes_into_the_run(runs, tmp_path, capsys):
    """Issue 40: ``--out EXISTING.safetensors`` was overwritten silently and ``--format lora --out`` wrote into any
    folder, the run's own included."""
    run = runs["tiny-sd15", 4]
    kohya = tmp_path / "k.safetensors"
    kohya.write_bytes(b"someone's file")
    assert main(["export", str(run), "--format", "kohya", "--out", str(kohya)]) == 2
    assert "exists; choose another file, or add --overwrite" in _unwrapped(capsys.readouterr().err)
    assert kohya.read_bytes() == b"someone's file"
    assert main(["export", str(run), "--format", "kohya", "--out", str(kohya), "--overwrite"]) == 0
    assert load_file(kohya) and not list(tmp_path.glob(".k.safetensors.tmp*"))
    for inside in (run, run / "final", run / "checkpoints" / "x", run / "final" / "k.safetensors"):
        fmt = "kohya" if inside.suffix else "lora"
        assert main(["export", str(run), "--format", fmt, "--out", str(inside), "--overwrite"]) == 2
        assert "is inside the run" in _unwrapped(capsys.readouterr().err)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--format", "lora", "--out", str(mine), "--overwrite"]) == 2
    assert "only a folder holding an earlier export" in _unwrapped(capsys.readouterr().err) and (mine / "notes.txt").exists()
    lora = tmp_path / "lora"
    assert main(["export", str(run), "--format", "lora", "--out", str(lora)]) == 0
    assert main(["export", str(run), "--format", "lora", "--out", str(lora)]) == 2
    assert "add --overwrite to replace the export in it" in _unwrapped(capsys.readouterr().err)
    assert main(["export", str(run), "--format", "lora", "--out", str(lora), "--overwrite"]) == 0
    assert sorted(p.name for p in lora.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "lora", "mine"]  # no temporary left
