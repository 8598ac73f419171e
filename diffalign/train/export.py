"""``diffalign export``: a run's trained weights in the formats people load.

- ``lora``: the LoRA as ``pytorch_lora_weights.safetensors`` in a folder, for ``pipe.load_lora_weights``.
- ``kohya``: the LoRA of an SD 1.x/2.x or SDXL run as one ``.safetensors`` file in kohya-ss names
  (``lora_unet_<module>.lora_down/lora_up.weight`` and ``.alpha``), the layout A1111/Forge and
  ComfyUI's LoRA loaders read (and diffusers' ``load_lora_weights`` too).
- ``diffusers``: the whole pipeline with the trained weights merged in (LoRA fused), a folder for
  ``DiffusionPipeline.from_pretrained``.
- ``single-file``: one ``.safetensors`` checkpoint in the original layout, which ComfyUI's
  checkpoint loader, A1111/Forge and diffusers' ``from_single_file`` read: SD 1.x/2.x and SDXL
  (:mod:`diffalign.train.ldm_keys`), SD3 and SD3.5 (:mod:`diffalign.train.mmdit_keys`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, SD3Transformer2DModel
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from diffalign.diffusion.finetuned import LORA_FILE, load_finetuned
from diffalign.diffusion.loading import DTYPES
from diffalign.diffusion.lora import merge_lora
from diffalign.errors import UserError
from diffalign.paths import with_usual_permissions
from diffalign.train import ldm_keys, mmdit_keys

FORMATS = ("lora", "kohya", "diffusers", "single-file")


def merged_pipeline(run_dir: Path) -> DiffusionPipeline:
    """The run's pipeline with a LoRA (if any) fused into the base weights and the adapters removed."""
    pipe = load_finetuned(run_dir)
    if (run_dir / "final" / LORA_FILE).is_file():
        if hasattr(pipe, "fuse_lora"):
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:  # PixArt: no diffusers LoRA loader, so peft merges it
            merge_lora(pipe.transformer)
    return pipe


def kohya_lora_state(lora_file: Path) -> dict[str, torch.Tensor]:
    """A run's UNet LoRA file in kohya-ss names (its scale is folded in, so alpha = rank)."""
    layers = load_file(str(lora_file))
    if not all(k.startswith("unet.") for k in layers):
        raise UserError("kohya export covers SD 1.x/2.x and SDXL UNet LoRAs; use --format lora or diffusers")
    return convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(layers))


def single_file_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every component of an SD 1.x/2.x, SDXL or SD3 pipeline under its original-layout key."""
    if isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel):
        return _sd3_single_file_state(pipe)
    if getattr(pipe, "unet", None) is None:
        raise UserError(f"single-file export covers SD 1.x/2.x, SDXL and SD3 pipelines, not {type(pipe).__name__}; "
                        "use --format diffusers (ComfyUI loads diffusers folders too)")
    state = {ldm_keys.DENOISER_PREFIX + k: v for k, v in
             ldm_keys.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    state.update(_vae_state(pipe))
    text = ldm_keys.clip_text_keys(pipe.text_encoder.state_dict())
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update({ldm_keys.SD1_TEXT_PREFIX + k: v for k, v in text.items()})
    else:
        first, second = ldm_keys.SDXL_TEXT_PREFIXES
        state.update({first + k: v for k, v in text.items()})
        state.update({second + k: v for k, v in ldm_keys.clip_to_open_clip(pipe.text_encoder_2.state_dict()).items()})
    return state


def _vae_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The VAE in LDM names, as SD 1.x/2.x, SDXL and SD3 files all store it."""
    return {ldm_keys.VAE_PREFIX + k: v for k, v in ldm_keys.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}


def _sd3_single_file_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """SD3's layout: the MMDiT, the VAE and the text encoders present (T5 is optional in SD3 pipelines)."""
    state = {ldm_keys.DENOISER_PREFIX + k: v for k, v in
             mmdit_keys.sd3_transformer_to_mmdit(pipe.transformer.state_dict(), pipe.transformer.config).items()}
    state.update(_vae_state(pipe))
    projection = pipe.text_encoder.text_projection.weight
    if not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype, device=projection.device)):
        raise UserError("this SD3 pipeline projects CLIP-L's pooled output (its text_projection is not the identity), "
                        "but the SD3 single-file layout's loaders (the reference code, ComfyUI, diffusers' "
                        "from_single_file) use it unprojected, so the file would sample differently; "
                        "use --format diffusers")
    for name, prefix in mmdit_keys.TEXT_ENCODER_PREFIXES.items():
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            text = encoder.state_dict() if name == "text_encoder_3" else ldm_keys.clip_text_keys(encoder.state_dict())
            state.update({prefix + k: v for k, v in text.items()})
    return state


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights (T5's input embedding is its ``shared`` table) as separate tensors, one per name.

    safetensors refuses tensors that share memory. Each name gets its own copy, so a loader finds
    whichever name it looks for (diffusers' single-file T5 loader does not tie them again).
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for key, value in state.items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        out[key] = value.clone() if where in seen else value
        seen.add(where)
    return out


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, dtype: str = "fp16") -> Path:
    """Write ``run_dir``'s trained weights to ``out`` in format ``fmt``; returns what was written."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (run_dir / "final").is_dir() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a finished run directory (it needs config.yaml and final/)")
    if fmt in ("lora", "kohya"):
        lora = run_dir / "final" / LORA_FILE
        if not lora.is_file():
            raise UserError(f"{run_dir} trained the full model, not a LoRA; use --format diffusers or single-file")
        if fmt == "kohya":
            _check_suffix(out, "a kohya LoRA")
            out.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in kohya_lora_state(lora).items()}
            save_file(state, out, metadata={"format": "pt", "diffalign_run": str(run_dir.resolve())})
            return with_usual_permissions(out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lora, out / LORA_FILE)
        return out / LORA_FILE
    pipe = merged_pipeline(run_dir)
    pipe.to(dtype=DTYPES[dtype])
    if fmt == "diffusers":
        pipe.save_pretrained(out, safe_serialization=True)
        return with_usual_permissions(out)
    _check_suffix(out, "a single-file checkpoint")
    return save_single_file(pipe, out, {"diffalign_run": str(run_dir.resolve())})


def _check_suffix(out: Path, what: str) -> None:
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors for {what}")


def save_single_file(pipe: DiffusionPipeline, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint (:func:`single_file_state`)."""
    state = _untied({k: v.detach().contiguous().cpu() for k, v in single_file_state(pipe).items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out, metadata={"format": "pt", **(metadata or {})})
    return with_usual_permissions(out)
