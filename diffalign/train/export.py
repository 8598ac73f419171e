"""``diffalign export``: a run's trained weights in the formats people load.

- ``lora``: the LoRA as ``pytorch_lora_weights.safetensors`` in a folder, for ``pipe.load_lora_weights``.
- ``diffusers``: the whole pipeline with the trained weights merged in (LoRA fused), a folder for
  ``DiffusionPipeline.from_pretrained``.
- ``single-file``: one ``.safetensors`` checkpoint in the original Stable Diffusion layout
  (:mod:`diffalign.train.ldm_keys`), which ComfyUI's checkpoint loader and A1111 read; SD 1.x/2.x
  and SDXL UNet pipelines.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from diffalign.diffusion.finetuned import LORA_FILE, load_finetuned
from diffalign.diffusion.loading import DTYPES
from diffalign.errors import UserError
from diffalign.train import ldm_keys

FORMATS = ("lora", "diffusers", "single-file")


def merged_pipeline(run_dir: Path) -> DiffusionPipeline:
    """The run's pipeline with a LoRA (if any) fused into the base weights and the adapters removed."""
    pipe = load_finetuned(run_dir)
    if (run_dir / "final" / LORA_FILE).is_file():
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def single_file_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every component of an SD1.x/2.x or SDXL pipeline under its original-layout key."""
    if getattr(pipe, "unet", None) is None:
        raise UserError(f"single-file export covers SD 1.x/2.x and SDXL UNet pipelines, not {type(pipe).__name__}; "
                        "use --format diffusers (ComfyUI loads diffusers folders too)")
    state = {ldm_keys.UNET_PREFIX + k: v for k, v in
             ldm_keys.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    state.update({ldm_keys.VAE_PREFIX + k: v for k, v in
                  ldm_keys.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    text = ldm_keys.clip_text_keys(pipe.text_encoder.state_dict())
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update({ldm_keys.SD1_TEXT_PREFIX + k: v for k, v in text.items()})
    else:
        first, second = ldm_keys.SDXL_TEXT_PREFIXES
        state.update({first + k: v for k, v in text.items()})
        state.update({second + k: v for k, v in ldm_keys.clip_to_open_clip(pipe.text_encoder_2.state_dict()).items()})
    return state


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, dtype: str = "fp16") -> Path:
    """Write ``run_dir``'s trained weights to ``out`` in format ``fmt``; returns what was written."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (run_dir / "final").is_dir() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a finished run directory (it needs config.yaml and final/)")
    if fmt == "lora":
        lora = run_dir / "final" / LORA_FILE
        if not lora.is_file():
            raise UserError(f"{run_dir} trained the full model, not a LoRA; use --format diffusers or single-file")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lora, out / LORA_FILE)
        return out / LORA_FILE
    pipe = merged_pipeline(run_dir)
    pipe.to(dtype=DTYPES[dtype])
    if fmt == "diffusers":
        pipe.save_pretrained(out, safe_serialization=True)
        return out
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors for a single-file checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in single_file_state(pipe).items()}
    save_file(state, out, metadata={"format": "pt", "diffalign_run": str(run_dir.resolve())})
    return out
