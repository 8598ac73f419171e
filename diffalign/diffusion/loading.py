"""Load a diffusers pipeline from a local folder or a single file, or build it with random weights.

Nothing here downloads: folders are read with ``local_files_only=True``, and a single-file
checkpoint needs a local diffusers folder (``config=``) that says what architecture it is. A
Hugging Face Hub id (``stabilityai/stable-diffusion-xl-base-1.0``) names the copy already in the
local Hugging Face cache (:func:`resolve_model_path`). Weights are read from safetensors only
(``use_safetensors=True``): nothing is unpickled.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline

from diffalign.errors import UserError
from diffalign.paths import resolve_model_path

MODEL_INDEX = "model_index.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _names_modules_to_keep_in_fp32(record: logging.LogRecord) -> bool:
    """False for diffusers' "should be kept in float32: []" warning, which ``ModelMixin.to`` logs on every dtype
    cast of a model that keeps no module in fp32 (its check reads ``_keep_in_fp32_modules or []`` and then
    tests for None; diffusers PR #13872): a user would see it for the VAE and the denoiser of every run.
    The warning for a model that does name such modules is kept."""
    return "should be kept in float32: []." not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_names_modules_to_keep_in_fp32)


def _processor_kwargs(record: logging.LogRecord) -> bool:
    """False for transformers' "Kwargs passed to `processor.__call__` have to be in `processor_kwargs`" warning,
    which Flux2Pipeline's ``apply_chat_template(..., padding=..., max_length=...)`` call (diffusers' own) raises at
    every prompt it encodes: a FLUX.2 dev run would print it at every step."""
    return "have to be in `processor_kwargs`" not in record.getMessage()


logging.getLogger("transformers.processing_utils").addFilter(_processor_kwargs)


def _no_text_encoder_lora(record: logging.LogRecord) -> bool:
    """False for diffusers' "No LoRA keys associated to CLIPTextModel found ..." message: diffalign trains the
    denoiser alone, so none of its LoRAs holds text-encoder weights, and loading one says so for each encoder."""
    return "No LoRA keys associated to" not in record.getMessage()


def cast_to(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` cast to ``dtype`` in place, except the sub-modules its model keeps in fp32 (``_keep_in_fp32_modules``:
    Wan's rotary embedding, time embedder, modulation tables and norms; T5's ``wo``), as ``from_pretrained(...,
    torch_dtype=dtype)`` leaves them. A plain ``.to(dtype)`` casts them too (diffusers warns) and costs precision
    where the model needs it."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, sub in module.named_modules():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        sub._apply(lambda t, target=target: t.to(target) if t.is_floating_point() else t, recurse=False)
    return module


@contextmanager
def without_diffusers_noise() -> Iterator[None]:
    """Inside: diffusers does not warn about what diffalign's own calls do on purpose, and only there (a user's
    own calls in the same process still get the warnings). That is the text-encoder LoRA message above, and
    the ``torch_dtype`` deprecation of diffusers 0.42, whose new ``dtype`` keyword the oldest diffusers this
    package supports (0.36) does not take."""
    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft",
                                                    "diffusers.loaders.lora_pipeline")]
    for logger in loggers:
        logger.addFilter(_no_text_encoder_lora)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(_no_text_encoder_lora)


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU. Under accelerate launch or torchrun, once
    :func:`process_state` has run, "cuda" is this process's own GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def process_state() -> PartialState:
    """This process's place among those of ``accelerate launch`` or ``torchrun`` (or the only one): each
    process then works on its own GPU; without CUDA they join one gloo group, as the trainer's do.

    Processes that finish their share of a long generation first wait for the others in a collective;
    the wait may last much longer than torch's NCCL default of 10 minutes allows, so it is given 6 hours
    (a process that fails ends the others at once through the launcher, not through this timeout).
    """
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=6))


def mixed_precision_dtype(name: str) -> torch.dtype:
    """The compute dtype of a ``train.mixed_precision`` setting: fp32 for "no", else fp16 or bf16."""
    return torch.float32 if name == "no" else DTYPES[name]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype by config name (fp32, fp16, bf16); ``auto`` is bf16 on GPUs and fp32 on CPUs, where bf16 matmuls are slow."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _read_index(folder: Path) -> dict:
    path = folder / MODEL_INDEX
    if not path.is_file():
        raise UserError(
            f"{folder} is not a diffusers model folder: it has no {MODEL_INDEX}. Point model.path at "
            "a folder saved with pipeline.save_pretrained(), or at a .safetensors file together with "
            "model.config (a diffusers folder of the same architecture)."
        )
    return json.loads(path.read_text())


def _component_class(library: str, class_name: str):
    module = importlib.import_module(library)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise UserError(f"{library} has no class {class_name!r} named in {MODEL_INDEX}") from None


# parameters a diffusers class makes with torch.empty and never initialises (its released weights set them): any
# value, NaN included, would be in memory there; random weights give them N(0, 0.02) under the seed instead
EMPTY_PARAMETERS = {"ZImageTransformer2DModel": ("x_pad_token", "cap_pad_token")}


def _initialise_empty(module: torch.nn.Module) -> None:
    for name in EMPTY_PARAMETERS.get(type(module).__name__, ()):
        with torch.no_grad():
            getattr(module, name).normal_(0.0, 0.02)


def build_random_pipeline(folder: str | Path, *, seed: int = 0, torch_dtype: torch.dtype | None = None):
    """Build the pipeline described by ``folder``'s configs, with random weights.

    Each model component is constructed from its config (diffusers ``from_config`` or a
    transformers config class); tokenizers and schedulers load from their files. Weights are
    initialised under ``torch.manual_seed(seed)`` in component order, so a seed gives the
    same model every time.
    """
    folder = Path(folder)
    index = _read_index(folder)
    pipeline_cls = _component_class("diffusers", index["_class_name"])
    components = {}
    torch.manual_seed(seed)
    for name, spec in sorted(index.items()):
        if name.startswith("_"):
            continue
        if not isinstance(spec, (list, tuple)):  # a pipeline setting (SDXL's force_zeros_for_empty_prompt): as is
            components[name] = spec
            continue
        library, class_name = spec
        if library is None:
            components[name] = None
            continue
        cls = _component_class(library, class_name)
        sub = folder / name
        if any(kind in name.lower() for kind in ("tokenizer", "scheduler", "processor", "feature_extractor", "guider")):  # no weights
            with torch.device("cpu"):  # real tables even while the models are built on the meta device (UniPC's
                components[name] = cls.from_pretrained(sub, local_files_only=True)  # sigmas move to the CPU)
        elif library == "diffusers":
            components[name] = cls.from_config(cls.load_config(sub))
            _initialise_empty(components[name])
        else:
            from transformers import AutoConfig

            components[name] = cls(AutoConfig.from_pretrained(sub, local_files_only=True))
        if isinstance(components[name], torch.nn.Module):
            components[name].eval()  # as from_pretrained leaves them: no dropout until a trainer asks
    # optional components the pipeline accepts but the folder does not name
    for optional in getattr(pipeline_cls, "_optional_components", []):
        components.setdefault(optional, None)
    # random weights are no Stable Diffusion release: no safety checker to miss (diffusers warns otherwise)
    components.setdefault("requires_safety_checker", False)
    accepted = set(inspect.signature(pipeline_cls.__init__).parameters)
    pipe = pipeline_cls(**{k: v for k, v in components.items() if k in accepted})
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    return pipe


def load_pipeline(
    source: str | Path,
    *,
    config: str | Path | None = None,
    denoiser_file: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> DiffusionPipeline:
    """A diffusers pipeline from a local folder, a single file, or configs with random weights.

    Args:
        source: a diffusers folder (``model_index.json`` inside) or a ``.safetensors`` file, or
            the Hub id of a model in the local Hugging Face cache.
        config: for a single file, the local diffusers folder (or cached Hub id) giving its architecture.
        denoiser_file: a single ``.safetensors`` file with only the UNet/transformer (a
            community fine-tune, or an exported one), in diffusers or original key names;
            it replaces the pipeline's denoiser.
        random_init: build from the folder's configs with random weights (tests, benchmarks).
        seed: seed of the random weights.
        torch_dtype: dtype to load the weights in.
        variant: the folder's weights variant (``"fp16"`` reads ``*.fp16.safetensors``).
    """
    source = resolve_model_path(source)
    config = None if config is None else resolve_model_path(config, what="model.config")
    with without_diffusers_noise():
        pipe = _load(source, config, random_init, seed, torch_dtype, variant)
        if denoiser_file is not None:
            _replace_denoiser(pipe, source if config is None else config, Path(denoiser_file), torch_dtype)
    return pipe


def _replace_denoiser(pipe, folder: Path, file: Path, torch_dtype) -> None:
    if not file.is_file() or file.suffix != ".safetensors":
        raise UserError(f"denoiser file {file} must be an existing .safetensors file")
    attr = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    cls = type(getattr(pipe, attr))
    if not hasattr(cls, "from_single_file"):
        raise UserError(f"diffusers cannot load {cls.__name__} from a single file; save it as a diffusers folder")
    model = cls.from_single_file(
        str(file), config=str(folder), subfolder=attr, local_files_only=True, torch_dtype=torch_dtype
    )
    setattr(pipe, attr, model.eval())
    pipe.register_modules(**{attr: model})


def _load(source: Path, config: Path | None, random_init: bool, seed: int, torch_dtype,
          variant: str | None) -> DiffusionPipeline:
    if random_init:
        return build_random_pipeline(source, seed=seed, torch_dtype=torch_dtype)
    if source.is_file():
        if source.suffix != ".safetensors":
            raise UserError(
                f"{source} is not a .safetensors file; diffalign never unpickles .ckpt/.bin weights. "
                "Convert it to safetensors first."
            )
        if config is None:
            raise UserError(
                f"loading the single file {source} needs model.config: a local diffusers folder of the "
                "same architecture (its configs say how to read the file; nothing is downloaded)."
            )
        index = _read_index(config)
        pipeline_cls = _component_class("diffusers", index["_class_name"])
        return pipeline_cls.from_single_file(
            str(source), config=str(config), local_files_only=True, torch_dtype=torch_dtype
        )
    _read_index(source)
    try:
        return DiffusionPipeline.from_pretrained(
            source, local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype, variant=variant
        )
    except OSError as err:  # a component's weights are missing, or only another variant's are there
        raise UserError(f"cannot load the pipeline in {source}: {err}{_variant_hint(source, variant)}") from None


def _variant_hint(folder: Path, variant: str | None) -> str:
    """Which weight variants the folder holds, when the one asked for is not among them."""
    found = sorted({p.suffixes[-2][1:].split("-")[0] for p in folder.glob("*/*.safetensors") if len(p.suffixes) > 1})
    if not found or variant in found:
        return ""
    return (f". The folder holds {'/'.join(found)} weights: load them with model.variant={found[0]} "
            "(eval: --variant; generate-ranked: the generator's variant)")
