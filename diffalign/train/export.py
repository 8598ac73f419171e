"""``diffalign export``: a run's trained weights in the formats people load.

- ``lora``: the LoRA as ``pytorch_lora_weights.safetensors`` in a folder, for ``pipe.load_lora_weights``.
- ``kohya``: the LoRA of an SD 1.x/2.x, SDXL or FLUX.1 run as one ``.safetensors`` file in kohya-ss names
  (``lora_unet_<module>.lora_down/lora_up.weight`` and ``.alpha``), the layout A1111/Forge and
  ComfyUI's LoRA loaders read (and diffusers' ``load_lora_weights`` too); FLUX's in the original
  block names with fused projections (:mod:`diffalign.train.flux_keys`).
- ``diffusers``: the whole pipeline with the trained weights merged in (LoRA fused), a folder for
  ``DiffusionPipeline.from_pretrained``.
- ``single-file``: one ``.safetensors`` checkpoint in the original layout, which ComfyUI's
  checkpoint loader, A1111/Forge and diffusers' ``from_single_file`` read: SD 1.x/2.x and SDXL
  (:mod:`diffalign.train.ldm_keys`), SD3 and SD3.5 (:mod:`diffalign.train.mmdit_keys`). For FLUX.1 it is
  the transformer alone, as Black Forest Labs ship ``flux1-dev.safetensors`` (:mod:`diffalign.train.flux_keys`;
  ComfyUI's diffusion-model loader, ``FluxTransformer2DModel.from_single_file``, ``model.denoiser_file``); so for
  FLUX.2 dev and klein (:mod:`diffalign.train.flux2_keys`), Z-Image (:mod:`diffalign.train.zimage_keys`) and
  Qwen-Image, whose release names are diffusers' own.

The source is a finished run (its ``final/`` weights) or one of its checkpoints
(``run/checkpoints/step-N``), so the step that ``diffalign eval`` picked exports in every format;
a checkpoint's LoRA is written exactly as the run writes its final one (scale folded in), and a
checkpoint of a run with an EMA exports its raw weights, as ``eval`` evaluates them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from diffusers import (DiffusionPipeline, Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel,
                       SD3Transformer2DModel, ZImageTransformer2DModel)
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from diffalign.diffusion import backbone_for
from diffalign.diffusion.finetuned import LORA_FILE, is_checkpoint, is_finished_run, load_finetuned
from diffalign.diffusion.loading import DTYPES
from diffalign.diffusion.lora import merge_lora
from diffalign.errors import UserError
from diffalign.paths import resolve_model_path, with_usual_permissions
from diffalign.train import flux2_keys, flux_keys, ldm_keys, mmdit_keys, zimage_keys
from diffalign.train.weights import save_final_weights

FORMATS = ("lora", "kohya", "diffusers", "single-file")


def trained_lora(source: Path) -> bool:
    """Whether the run (or the run of the checkpoint) ``source`` trained a LoRA rather than the full denoiser."""
    if is_checkpoint(source):
        return yaml.safe_load((source.parent.parent / "config.yaml").read_text())["train"]["lora_rank"] > 0
    return (source / "final" / LORA_FILE).is_file()


def lora_file(source: Path, scratch: Path) -> Path:
    """The LoRA file of a run (``final/``), or of a checkpoint: written into ``scratch`` as the run writes its final
    one, from the run's base with the checkpoint's adapters on it."""
    if not is_checkpoint(source):
        return source / "final" / LORA_FILE
    expert = yaml.safe_load((source.parent.parent / "config.yaml").read_text())["model"].get("expert")
    backbone = backbone_for(load_finetuned(source), expert=expert)  # a Wan2.2 run's expert, or both
    return save_final_weights(backbone, backbone.denoiser, backbone.denoiser.state_dict(), scratch, lora=True) / LORA_FILE


def merged_pipeline(source: Path) -> DiffusionPipeline:
    """The pipeline of a run or checkpoint with a LoRA (if any) fused into the base weights and the adapters removed."""
    pipe = load_finetuned(source)
    if trained_lora(source):
        if hasattr(pipe, "fuse_lora"):
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:  # PixArt: no diffusers LoRA loader, so peft merges it
            merge_lora(pipe.transformer)
    return pipe


def base_folder(source: Path) -> Path:
    """The diffusers folder of the base model a run (or the run of a checkpoint) trained on."""
    run = source.parent.parent if is_checkpoint(source) else source
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    return resolve_model_path(model.get("config") or model["path"], what="the run's model.path")


def kohya_lora_state(lora_file: Path, base: Path) -> dict[str, torch.Tensor]:
    """A run's LoRA file in kohya-ss names (its scale is folded in, so alpha = rank); ``base`` is the run's base
    model folder, whose pipeline class says which naming applies."""
    layers = load_file(str(lora_file))
    if json.loads((base / "model_index.json").read_text())["_class_name"] == "FluxPipeline":
        transformer = json.loads((base / "transformer" / "config.json").read_text())
        return flux_keys.flux_lora_to_kohya(layers, transformer["num_attention_heads"] * transformer["attention_head_dim"])
    if not all(k.startswith("unet.") for k in layers):
        raise UserError("kohya export covers SD 1.x/2.x, SDXL and FLUX LoRAs; use --format lora or diffusers")
    return convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(layers))


def single_file_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every component of an SD 1.x/2.x, SDXL or SD3 pipeline under its original-layout key; the transformer alone
    of FLUX.1, FLUX.2, Z-Image and Qwen-Image (and its edit models), as their releases ship it."""
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, SD3Transformer2DModel):
        return _sd3_single_file_state(pipe)
    if isinstance(transformer, FluxTransformer2DModel):
        return flux_keys.flux_transformer_to_original(transformer.state_dict())
    if isinstance(transformer, Flux2Transformer2DModel):
        return flux2_keys.flux2_transformer_to_original(transformer.state_dict())
    if isinstance(transformer, ZImageTransformer2DModel):
        return zimage_keys.z_image_transformer_to_original(transformer.state_dict())
    if isinstance(transformer, QwenImageTransformer2DModel):  # Qwen's release names are diffusers' own
        return dict(transformer.state_dict())
    if getattr(pipe, "unet", None) is None:
        raise UserError(f"single-file export covers SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2, Z-Image and Qwen-Image pipelines, "
                        f"not {type(pipe).__name__}; use --format diffusers (ComfyUI loads diffusers folders too)")
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


def _provenance(source: Path) -> dict[str, str]:
    """What a single-file export records of where it came from: the run, and the step of a checkpoint."""
    if is_checkpoint(source):
        step = json.loads((source / "trainer_state.json").read_text()).get("step")
        return {"diffalign_run": str(source.parent.parent.resolve()), "diffalign_step": str(step)}
    return {"diffalign_run": str(source.resolve())}


def export_run(source: str | Path, fmt: str, out: str | Path, *, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write the trained weights of ``source`` (a finished run or one of its checkpoints) to ``out`` in format
    ``fmt``; returns what was written. An existing ``out`` is refused unless ``overwrite`` (:func:`check_target`)."""
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not is_checkpoint(source) and not is_finished_run(source):
        raise UserError(f"{source} is not a finished run directory (it needs config.yaml and final/) or one of its "
                        "checkpoints (RUN/checkpoints/step-N)")
    check_target(out, source, fmt, overwrite)
    if fmt in ("lora", "kohya"):
        if not trained_lora(source):
            raise UserError(f"{source} trained the full model, not a LoRA; use --format diffusers or single-file")
        if fmt == "kohya":
            _check_suffix(out, "a kohya LoRA")
        with tempfile.TemporaryDirectory() as scratch:
            lora = lora_file(source, Path(scratch))
            if fmt == "kohya":
                out.parent.mkdir(parents=True, exist_ok=True)
                state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in
                         kohya_lora_state(lora, base_folder(source)).items()}
                return _save_file_whole(state, out, {"format": "pt", **_provenance(source)})
            low = lora.parent / "transformer_2" / LORA_FILE  # a run of both Wan2.2 experts: the low-noise one's
            with _folder_whole(out) as folder:
                shutil.copyfile(lora, folder / LORA_FILE)
                if low.is_file():
                    (folder / "transformer_2").mkdir()
                    shutil.copyfile(low, folder / "transformer_2" / LORA_FILE)
            return with_usual_permissions(out) / LORA_FILE
    if fmt == "single-file":
        _check_suffix(out, "a single-file checkpoint")
    pipe = merged_pipeline(source)
    pipe.to(dtype=DTYPES[dtype])
    if fmt == "diffusers":
        with _folder_whole(out) as folder:
            pipe.save_pretrained(folder, safe_serialization=True)
        return with_usual_permissions(out)
    return save_single_file(pipe, out, _provenance(source))


def _check_suffix(out: Path, what: str) -> None:
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors for {what}")


def save_single_file(pipe: DiffusionPipeline, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint (:func:`single_file_state`)."""
    state = _untied({k: v.detach().contiguous().cpu() for k, v in single_file_state(pipe).items()})
    return _save_file_whole(state, out, {"format": "pt", **(metadata or {})})


# what an earlier export left in a folder: --overwrite replaces such a folder, never another one
EXPORT_MARKERS = (LORA_FILE, "model_index.json")


def check_target(out: Path, source: Path, fmt: str, overwrite: bool) -> None:
    """Refuse to write where it would destroy something: into the run itself (its folder, ``final/`` or
    ``checkpoints/``), over an existing file, or into a non-empty folder; ``overwrite`` allows replacing a file or
    a folder that holds an earlier export, nothing else."""
    run = (source.parent.parent if is_checkpoint(source) else source).resolve()
    target = out.resolve()
    if target == run or any(target.is_relative_to(run / part) for part in ("final", "checkpoints")):
        raise UserError(f"--out {out} is inside the run {run} (its folder, final/ or checkpoints/), which the export "
                        "would overwrite; write it elsewhere")
    if fmt in ("kohya", "single-file"):
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; {fmt} writes one .safetensors file")
        if out.exists() and not overwrite:
            raise UserError(f"--out {out} exists; choose another file, or add --overwrite to replace it")
        return
    if out.is_file():
        raise UserError(f"--out {out} is a file; {fmt} writes a folder")
    if out.is_dir() and any(out.iterdir()):
        earlier = any((out / marker).exists() for marker in EXPORT_MARKERS)
        if not overwrite or not earlier:
            raise UserError(f"--out {out} is a folder that is not empty; choose a new folder"
                            + (", or add --overwrite to replace the export in it" if earlier else
                               " (--overwrite replaces only a folder holding an earlier export)"))


def _save_file_whole(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    """``save_file`` through a temporary file beside ``out``: the file is complete or absent, never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return with_usual_permissions(out)


@contextmanager
def _folder_whole(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into, which then replaces ``out`` (an earlier export, when
    allowed) in one rename; on failure nothing of it is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # mkdir, not mkdtemp: the usual mode, not 0700
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
