"""Write the model-config folders shipped in assets/models/ (configs and tokenizers, no weights).

Each folder is a diffusers pipeline layout (model_index.json plus one sub-folder per
component) holding only configs, so ``diffalign.diffusion.load_pipeline(folder,
random_init=True)`` builds the model with random weights and no download:

- ``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-flux-kontext``, ``tiny-zimage``, ``tiny-qwenimage``, ``tiny-qwenimage-edit``, ``tiny-qwenimage-edit-plus``, ``tiny-flux2-klein``, ``tiny-flux2-dev``, ``tiny-pixart``, ``tiny-wan``, ``tiny-wan22``, ``tiny-wan22-ti2v``, ``tiny-wan21-i2v``, ``tiny-wan22-i2v``, ``tiny-hunyuanvideo15``, ``tiny-hunyuanvideo15-i2v``: a few hundred
  thousand parameters each, for tests and CPU benchmarks (shapes follow diffusers' own test configs).
- ``sd15``, ``sdxl``, ``sd3-medium``, ``sd35-medium``, ``sd35-large``, ``flux-dev``,
  ``flux-schnell``, ``flux-kontext-dev``, ``z-image-turbo``, ``qwen-image``, ``qwen-image-edit``, ``qwen-image-edit-plus``, ``flux2-dev``, ``flux2-klein-4b``, ``flux2-klein-9b``, ``pixart-alpha-1024``, ``wan21-t2v-1.3b``, ``wan21-t2v-14b``, ``wan22-t2v-a14b``, ``wan22-ti2v-5b``, ``wan21-i2v-14b-480p``, ``wan22-i2v-a14b``, ``hunyuanvideo15-480p-t2v``, ``hunyuanvideo15-480p-i2v``: the real architectures' denoiser, VAE and text-encoder
  configs, for GPU benchmarks and memory estimates at real size with random weights.

The tokenizers are small character-level vocabularies (the real ones are not redistributed
here); prompts tokenise to one id per character. The text encoders' embedding tables are as small as those
vocabularies, so a real-size folder counts Qwen's text encoders about 0.4B (Qwen3-4B) and 1.1B (Qwen2.5-VL-7B)
parameters short of the released ones. Re-run to regenerate:
``python scripts/make_model_configs.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

ROOT = Path(__file__).resolve().parent.parent / "assets" / "models"
CHAR_VOCAB = 512 + 2  # every byte, with and without "</w>", plus start/end of text


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP BPE tokenizer with no merges: one token per character."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = 77
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    tok.save_pretrained(folder)


def t5_tokenizer(folder: Path, max_length: int = 64) -> None:
    """A T5 unigram tokenizer over single characters (pad 0, eos 1, unk 2)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(i), -2.0) for i in range(33, 127)]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    tok.save_pretrained(folder)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_char_tokenizer(folder: Path, max_length: int = 512) -> None:
    """A Qwen-style chat tokenizer over single characters (the real vocabularies are not redistributed here): one
    token per printable character, <|im_start|>/<|im_end|> and a pad token, and a ChatML template as Qwen's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]  # Qwen2.5-VL's image tokens, last
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"] + vision)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_(?:start|end)\|>|<\|endoftext\|>|[\s\S]"),
                                              behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", *vision],
                                  model_max_length=max_length)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)


QWEN_CHAR_VOCAB = 4 + 95 + 1 + 3


def reloaded_char_tokenizer(folder: Path):
    """The character tokenizer as a processor built on it saves it: written to a scratch ``folder/tokenizer``, read
    back, and the scratch removed (the processor writes its own copy)."""
    from transformers import AutoTokenizer

    qwen_char_tokenizer(folder / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer")
    return tokenizer


def qwen_vl_processor(folder: Path) -> None:
    """Qwen2.5-VL's processor as Qwen-Image-Edit's pipelines read it (the character tokenizer above, whose image
    tokens the processor expands to one per merged 28 px patch, and Qwen2-VL's image processor with the released
    settings: 14 px patches merged 2x2, between 56x56 and 3584x3584 pixels)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = reloaded_char_tokenizer(folder)
    images = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=CHAT_TEMPLATE).save_pretrained(folder)


def qwen3_text(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = QWEN_CHAR_VOCAB,
               **extra) -> dict:
    return {"architectures": ["Qwen3Model"], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, **extra}


def z_image_parts(transformer: dict, vae_config: dict, text: dict, shift: float) -> dict:
    """A ZImagePipeline's components: the Qwen3 text encoder, the single-stream transformer, the FLUX VAE."""
    return {
        "transformer": ("diffusers", "ZImageTransformer2DModel", transformer),
        "vae": ("diffusers", "AutoencoderKL", {**vae_config, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                                               "use_quant_conv": False, "use_post_quant_conv": False}),
        "text_encoder": ("transformers", "Qwen3Model", text),
        "tokenizer": ("transformers", "PreTrainedTokenizerFast", "qwen-chat-tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler",
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift,
                       "use_dynamic_shifting": False}),
    }


def qwen25_vl_text(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vision: dict) -> dict:
    """A Qwen2.5-VL config (the text model Qwen-Image encodes prompts with, and its vision tower, unused for text)
    over the character vocabulary, as transformers writes it."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": QWEN_CHAR_VOCAB,
                     "rope_scaling": {"mrope_section": [1, 1, 2] if hidden // heads == 8 else [16, 24, 24],
                                      "rope_type": "default", "type": "default"}, "rope_theta": 1000000.0,
                     "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": None},
        vision_config=vision, vocab_size=QWEN_CHAR_VOCAB, vision_start_token_id=QWEN_CHAR_VOCAB - 3,
        vision_end_token_id=QWEN_CHAR_VOCAB - 2, vision_token_id=QWEN_CHAR_VOCAB - 1, image_token_id=QWEN_CHAR_VOCAB - 1,
        video_token_id=QWEN_CHAR_VOCAB - 1, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return config.to_dict()


def qwen_image_parts(transformer: dict, vae_config: dict, text: dict, edit: bool = False) -> dict:
    """A QwenImagePipeline's components: Qwen2.5-VL, the MMDiT, its video VAE and a dynamically shifted scheduler;
    ``edit``: an edit pipeline's, whose Qwen2.5-VL also sees the source images through its processor."""
    return {
        **({"processor": ("transformers", "Qwen2VLProcessor", "qwen-vl-processor")} if edit else {}),
        "transformer": ("diffusers", "QwenImageTransformer2DModel", transformer),
        "vae": ("diffusers", "AutoencoderKLQwenImage", vae_config),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", text),
        "tokenizer": ("transformers", "PreTrainedTokenizerFast", "qwen-chat-tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler",
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                       "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                       "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"}),
    }


def flux2_parts(transformer: dict, vae_config: dict, text_encoder: tuple, tokenizer: tuple) -> dict:
    """A FLUX.2 pipeline's components: the MMDiT, the FLUX.2 VAE with its batch-norm statistics, the flow scheduler,
    and the text encoder and tokenizer of the model (klein's or dev's)."""
    return {
        "transformer": ("diffusers", "Flux2Transformer2DModel", transformer),
        "vae": ("diffusers", "AutoencoderKLFlux2", vae_config),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler",
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                       "use_dynamic_shifting": True}),
    }


def flux2_klein_parts(transformer: dict, vae_config: dict, text: dict) -> dict:
    """A Flux2KleinPipeline's components: Qwen3 (a causal LM: three of its hidden layers are read) and the rest
    of :func:`flux2_parts`."""
    return flux2_parts(transformer, vae_config,
                       ("transformers", "Qwen3ForCausalLM", {**text, "architectures": ["Qwen3ForCausalLM"]}),
                       ("transformers", "PreTrainedTokenizerFast", "qwen-chat-tokenizer"))


MISTRAL_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{% for part in m['content'] %}{{ part['text'] }}"
                    "{% endfor %}{% endfor %}")


def pixtral_processor(folder: Path) -> None:
    """Mistral Small 3's processor as Flux2Pipeline reads it (its ``tokenizer`` component): the character tokenizer
    and a chat template over the pipeline's messages (content as a list of text parts), Pixtral's image processor."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=reloaded_char_tokenizer(folder), chat_template=MISTRAL_TEMPLATE,
                     patch_size=14, spatial_merge_size=2).save_pretrained(folder)


def mistral3(text: dict | None = None, vision: dict | None = None) -> dict:
    """A Mistral3ForConditionalGeneration config (Flux2Pipeline's text encoder, Mistral Small 3.1 24B by default:
    transformers' defaults are that model) over the character vocabulary, with ``text``/``vision`` changes."""
    from transformers import Mistral3Config

    config = Mistral3Config()
    for key, value in {**(text or {}), "vocab_size": QWEN_CHAR_VOCAB, "pad_token_id": 0, "eos_token_id": 2,
                       "bos_token_id": None}.items():
        setattr(config.text_config, key, value)
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    config.image_token_index = QWEN_CHAR_VOCAB - 1
    return config.to_dict()


def flux2_dev_parts(transformer: dict, vae_config: dict, text: dict) -> dict:
    """A Flux2Pipeline's components (FLUX.2 dev): Mistral Small 3 (hidden layers 10, 20 and 30 are read) with its
    processor as the tokenizer, and the rest of :func:`flux2_parts` (its MMDiT guidance-distilled)."""
    return flux2_parts(transformer, vae_config, ("transformers", "Mistral3ForConditionalGeneration", text),
                       ("transformers", "AutoProcessor", "pixtral-processor"))


def clip_text(hidden: int, layers: int, heads: int, projection: int | None = None, **extra) -> dict:
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": CHAR_VOCAB,
        "max_position_embeddings": 77,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
        "hidden_act": "quick_gelu",
        "projection_dim": projection or hidden,
    }
    config.update(extra)
    return config


def t5_encoder(d_model: int, layers: int, heads: int, d_ff: int, d_kv: int) -> dict:
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": d_model,
        "d_ff": d_ff,
        "d_kv": d_kv,
        "num_layers": layers,
        "num_heads": heads,
        "vocab_size": 128,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "relative_attention_num_buckets": 32,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def umt5_encoder(d_model: int, layers: int, heads: int, d_ff: int, d_kv: int) -> dict:
    """Wan's text encoder: the encoder of UMT5 (google/umt5-xxl at full size)."""
    return {**t5_encoder(d_model, layers, heads, d_ff, d_kv), "architectures": ["UMT5EncoderModel"],
            "model_type": "umt5"}


def wan_scheduler(flow_shift: float) -> dict:
    """The Wan2.1 pipelines' sampler: UniPC on shifted flow-matching sigmas (480p checkpoints shift by 3, 720p by 5)."""
    return {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
            "use_flow_sigmas": True, "flow_shift": flow_shift, "solver_order": 2, "predict_x0": True,
            "solver_type": "bh2", "lower_order_final": True, "timestep_spacing": "linspace"}


def wan_parts(transformer: dict, vae_config: dict, text: dict, flow_shift: float, experts: bool = False) -> dict:
    """A WanPipeline's components (Wan2.1 text-to-video): UMT5 text encoder, the 3D transformer, Wan's causal video VAE
    (4x in time, 8x in space), UniPC on flow sigmas; with ``experts`` Wan2.2 A14B's second transformer of the same
    shape (the low-noise expert)."""
    return {
        "transformer": ("diffusers", "WanTransformer3DModel", transformer),
        **({"transformer_2": ("diffusers", "WanTransformer3DModel", transformer)} if experts else {}),
        "vae": ("diffusers", "AutoencoderKLWan", vae_config),
        "text_encoder": ("transformers", "UMT5EncoderModel", text),
        "tokenizer": ("transformers", "T5TokenizerFast", "t5-tokenizer"),
        "scheduler": ("diffusers", "UniPCMultistepScheduler", wan_scheduler(flow_shift)),
    }


def hunyuan_video15_i2v_parts(transformer: dict, vae_config: dict, text: dict, byt5: dict, shift: float,
                              siglip: dict) -> dict:
    """A HunyuanVideo15ImageToVideoPipeline's components: :func:`hunyuan_video15_parts` with the SigLIP image encoder
    whose last hidden states the transformer reads as image tokens, and its preprocessing."""
    size = siglip["image_size"]
    return {**hunyuan_video15_parts(transformer, vae_config, text, byt5, shift),
            "image_encoder": ("transformers", "SiglipVisionModel", siglip),
            "feature_extractor": ("transformers", "SiglipImageProcessor", {"size": {"height": size, "width": size}})}


def siglip_vision(hidden: int, layers: int, heads: int, intermediate: int, image_size: int, patch: int) -> dict:
    """A SigLIP ViT image encoder's config (SiglipVisionModel)."""
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate,
            "image_size": image_size, "patch_size": patch}


def wan_i2v_parts(transformer: dict, vae_config: dict, text: dict, flow_shift: float, image_encoder: dict | None,
                  experts: bool = False) -> dict:
    """A WanImageToVideoPipeline's components: :func:`wan_parts` with, for Wan2.1 I2V, the CLIP vision encoder whose
    second-to-last hidden states the transformer reads (``image_dim``) and its preprocessing; Wan2.2 I2V A14B has
    neither (its two experts read the first frame only through the latent condition)."""
    vision = {"image_encoder": ("transformers", "CLIPVisionModel", image_encoder),
              "image_processor": ("transformers", "CLIPImageProcessor",
                                  {"size": {"shortest_edge": image_encoder["image_size"]},
                                   "crop_size": {"height": image_encoder["image_size"],
                                                 "width": image_encoder["image_size"]}})} if image_encoder else \
        {"image_encoder": (None, None, None), "image_processor": (None, None, None)}
    return {**wan_parts(transformer, vae_config, text, flow_shift, experts), **vision}


def clip_vision(hidden: int, layers: int, heads: int, intermediate: int, image_size: int, patch: int) -> dict:
    """A CLIP ViT image encoder's config (CLIPVisionModel)."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate,
            "image_size": image_size, "patch_size": patch, "projection_dim": hidden, "hidden_act": "gelu"}


def hunyuan_video15_parts(transformer: dict, vae_config: dict, text: dict, byt5: dict, shift: float) -> dict:
    """A HunyuanVideo15Pipeline's components: Qwen2.5-VL's text model (its third-last hidden states) and ByT5 (the
    quoted text to render), the 3D transformer, its 32-channel video VAE (16x in space, 4x in time), the flow
    scheduler and the classifier-free guider the pipeline guides with."""
    return {
        "transformer": ("diffusers", "HunyuanVideo15Transformer3DModel", transformer),
        "vae": ("diffusers", "AutoencoderKLHunyuanVideo15", vae_config),
        "text_encoder": ("transformers", "Qwen2_5_VLTextModel", text),
        "tokenizer": ("transformers", "PreTrainedTokenizerFast", "qwen-chat-tokenizer"),
        "text_encoder_2": ("transformers", "T5EncoderModel", byt5),
        "tokenizer_2": ("transformers", "ByT5Tokenizer", "byt5-tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler",
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}),
        "guider": ("diffusers", "ClassifierFreeGuidance", {"guidance_scale": 6.0}),
    }


def qwen25_vl_text_model(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> dict:
    """Qwen2.5-VL's text model alone (HunyuanVideo 1.5's text encoder) over the character vocabulary."""
    from transformers import Qwen2_5_VLTextConfig

    config = Qwen2_5_VLTextConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=QWEN_CHAR_VOCAB,
        rope_scaling={"mrope_section": [1, 1, 2] if hidden // heads == 8 else [16, 24, 24], "rope_type": "default",
                      "type": "default"}, rope_theta=1000000.0, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return {**config.to_dict(), "architectures": ["Qwen2_5_VLTextModel"]}


def vae(channels: list[int], latent: int, sample: int, **extra) -> dict:
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "latent_channels": latent,
        "layers_per_block": 2 if len(channels) > 2 else 1,
        "norm_num_groups": 32,
        "sample_size": sample,
        "scaling_factor": 0.18215,
    }
    config.update(extra)
    return config


def ddpm_scheduler(prediction_type: str = "epsilon", **extra) -> dict:
    config = {
        "_class_name": "DDPMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
    }
    config.update(extra)
    return config


def flow_scheduler(shift: float = 3.0) -> dict:
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}


def flux_scheduler(dynamic: bool) -> dict:
    """FLUX.1-dev shifts its sampling grid by the image's token count; FLUX.1-schnell does not shift."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0 if dynamic else 1.0, "use_dynamic_shifting": dynamic, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096}


def flux_parts(transformer: dict, vae_config: dict, clip: dict, t5: dict, dynamic: bool) -> dict:
    """A FluxPipeline's components: CLIP-L (pooled) and T5 text encoders, transformer, VAE, scheduler."""
    return {
        "transformer": ("diffusers", "FluxTransformer2DModel", transformer),
        "vae": ("diffusers", "AutoencoderKL", {**vae_config, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                                               "use_quant_conv": False, "use_post_quant_conv": False}),
        "text_encoder": ("transformers", "CLIPTextModel", clip),
        "text_encoder_2": ("transformers", "T5EncoderModel", t5),
        "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast", "t5-tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", flux_scheduler(dynamic)),
    }


def index(pipeline: str, components: dict[str, tuple[str, str]]) -> dict:
    data = {"_class_name": pipeline, "_diffusers_version": "0.31.0"}
    data.update({name: list(lib_cls) for name, lib_cls in components.items()})
    return data


def write_pipeline(name: str, pipeline: str, parts: dict[str, tuple[str, str, dict | str]],
                   settings: dict | None = None) -> None:
    """parts: component -> (library, class, config dict or a tokenizer kind); settings: the pipeline's own config
    values (Wan2.2's boundary_ratio, expand_timesteps), written into model_index.json."""
    folder = ROOT / name
    shutil.rmtree(folder, ignore_errors=True)
    for component, (library, cls, config) in parts.items():
        sub = folder / component
        if library is None:  # an optional component the pipeline is built without
            continue
        if config == "clip-tokenizer":
            clip_tokenizer(sub)
        elif config == "clip-tokenizer-pad!":
            clip_tokenizer(sub, pad_token="!")
        elif config == "t5-tokenizer":  # the real architectures' limit is the released tokenizers' 512
            t5_tokenizer(sub, 64 if name.startswith("tiny-") else 512)
        elif config == "qwen-chat-tokenizer":
            qwen_char_tokenizer(sub)
        elif config == "qwen-vl-processor":
            qwen_vl_processor(sub)
        elif config == "pixtral-processor":
            pixtral_processor(sub)
        elif config == "byt5-tokenizer":
            from transformers import ByT5Tokenizer

            ByT5Tokenizer().save_pretrained(sub)
        elif component == "image_processor":  # Wan2.1 I2V's CLIP preprocessing
            from transformers import CLIPImageProcessor

            CLIPImageProcessor(**config).save_pretrained(sub)
        elif component == "feature_extractor":  # HunyuanVideo 1.5 I2V's SigLIP preprocessing
            from transformers import SiglipImageProcessor

            SiglipImageProcessor(**config).save_pretrained(sub)
        elif library == "transformers":
            write_json(sub / "config.json", config)
        elif component == "scheduler":
            write_json(sub / "scheduler_config.json", config)
        elif component == "guider":
            write_json(sub / "guider_config.json", {"_class_name": cls, **config})
        else:
            write_json(sub / "config.json", {"_class_name": cls, **config})
    write_json(folder / "model_index.json", {**index(pipeline, {c: (lib, cls) for c, (lib, cls, _) in parts.items()}),
                                             **(settings or {})})


def unet(**config) -> dict:
    base = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "norm_num_groups": 32}
    base.update(config)
    return base


def tiny() -> None:
    tiny_vae = vae([32, 64], latent=4, sample=64)
    write_pipeline(
        "tiny-sd15",
        "StableDiffusionPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel", unet(
                block_out_channels=[32, 64], layers_per_block=1, sample_size=16, cross_attention_dim=32,
                attention_head_dim=8,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])),
            "vae": ("diffusers", "AutoencoderKL", tiny_vae),
            "text_encoder": ("transformers", "CLIPTextModel", clip_text(32, 2, 4)),
            "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
            "scheduler": ("diffusers", "DDPMScheduler", ddpm_scheduler()),
            "safety_checker": (None, None, None),
            "feature_extractor": (None, None, None),
        },
    )
    write_pipeline(
        "tiny-sdxl",
        "StableDiffusionXLPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel", unet(
                block_out_channels=[32, 64], layers_per_block=1, sample_size=16, cross_attention_dim=64,
                attention_head_dim=[2, 4], use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, transformer_layers_per_block=[1, 2],
                projection_class_embeddings_input_dim=80,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])),
            "vae": ("diffusers", "AutoencoderKL", {**tiny_vae, "scaling_factor": 0.13025}),
            "text_encoder": ("transformers", "CLIPTextModel", clip_text(32, 2, 4)),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", clip_text(32, 2, 4, projection=32)),
            "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer", "clip-tokenizer-pad!"),
            "scheduler": ("diffusers", "DDPMScheduler", ddpm_scheduler()),
        },
    )
    write_pipeline(
        "tiny-sd3",
        "StableDiffusion3Pipeline",
        {
            "transformer": ("diffusers", "SD3Transformer2DModel", {
                "sample_size": 16, "patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
                "joint_attention_dim": 64, "pooled_projection_dim": 64, "pos_embed_max_size": 32}),
            "vae": ("diffusers", "AutoencoderKL", {
                **tiny_vae, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                "use_quant_conv": False, "use_post_quant_conv": False}),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", clip_text(32, 2, 4, projection=32)),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", clip_text(32, 2, 4, projection=32)),
            "text_encoder_3": ("transformers", "T5EncoderModel", t5_encoder(64, 2, 4, 128, 16)),
            "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
            "tokenizer_3": ("transformers", "T5TokenizerFast", "t5-tokenizer"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", flow_scheduler()),
        },
    )
    write_pipeline("tiny-flux", "FluxPipeline", flux_parts(
        {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
         "axes_dims_rope": [4, 6, 6]},
        tiny_vae, clip_text(32, 2, 4), t5_encoder(32, 2, 4, 64, 8), dynamic=True))
    write_pipeline("tiny-flux-kontext", "FluxKontextPipeline", flux_parts(
        {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
         "axes_dims_rope": [4, 6, 6]},
        tiny_vae, clip_text(32, 2, 4), t5_encoder(32, 2, 4, 64, 8), dynamic=True))
    write_pipeline("tiny-zimage", "ZImagePipeline", z_image_parts(
        {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 32, "n_layers": 2,
         "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 16,
         "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32]},
        {**tiny_vae, "latent_channels": 16}, qwen3_text(16, 2, 2, 2, 32), shift=3.0))
    qwen_image = (
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 3, "joint_attention_dim": 16, "guidance_embeds": False, "axes_dims_rope": [8, 4, 4]},
        {"base_dim": 24, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "temperal_downsample": [False, True],
         "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4},
        qwen25_vl_text(16, 2, 2, 2, 16, {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                                         "out_hidden_size": 16}))
    write_pipeline("tiny-qwenimage", "QwenImagePipeline", qwen_image_parts(*qwen_image))
    write_pipeline("tiny-qwenimage-edit", "QwenImageEditPipeline", qwen_image_parts(*qwen_image, edit=True))
    write_pipeline("tiny-qwenimage-edit-plus", "QwenImageEditPlusPipeline", qwen_image_parts(*qwen_image, edit=True))
    # 28 layers, as the pipeline reads hidden layers 9, 18 and 27 (16 wide each: the transformer sees 48)
    tiny_flux2 = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                  "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
                  "timestep_guidance_channels": 256, "axes_dims_rope": [4, 4, 4, 4]}
    tiny_flux2_vae = {"sample_size": 32, "in_channels": 3, "out_channels": 3,
                      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                      "block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4,
                      "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False}
    write_pipeline("tiny-flux2-klein", "Flux2KleinPipeline", flux2_klein_parts(
        {**tiny_flux2, "guidance_embeds": False}, tiny_flux2_vae, qwen3_text(16, 28, 2, 2, 32)))
    # FLUX.2 dev: 30 Mistral layers, as the pipeline reads hidden layers 10, 20 and 30; guidance-distilled
    write_pipeline("tiny-flux2-dev", "Flux2Pipeline", flux2_dev_parts(
        {**tiny_flux2, "guidance_embeds": True}, tiny_flux2_vae,
        mistral3({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 30, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "head_dim": 8},
                 {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "head_dim": 8, "image_size": 56})))
    # Wan2.1: two blocks of width 2 x 12 (diffusers' own test shapes), a 3-level video VAE (4x in time, 4x in space)
    tiny_wan = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
                "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2,
                "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
    tiny_wan_vae = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1], "num_res_blocks": 1,
                    "temperal_downsample": [True, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4,
                    "scale_factor_temporal": 4, "scale_factor_spatial": 4}
    tiny_umt5 = umt5_encoder(32, 2, 4, 64, 8)
    write_pipeline("tiny-wan", "WanPipeline", wan_parts(tiny_wan, tiny_wan_vae, tiny_umt5, flow_shift=3.0))
    # Wan2.2 TI2V-5B: Wan2.2's VAE (2x2 pixel patches, residual, 8x here in space) and one timestep per latent token
    write_pipeline("tiny-wan22-ti2v", "WanPipeline", wan_parts(
        {**tiny_wan, "in_channels": 8, "out_channels": 8},
        {**tiny_wan_vae, "z_dim": 8, "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2,
         "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8, "scale_factor_spatial": 8},
        tiny_umt5, flow_shift=5.0), settings={"expand_timesteps": True})
    # Wan2.2 A14B: two experts of tiny-wan's shape, switched at 0.875 x 1000 as the T2V model; its shift of 12
    write_pipeline("tiny-wan22", "WanPipeline", wan_parts(tiny_wan, tiny_wan_vae, tiny_umt5, flow_shift=12.0,
                                                          experts=True), settings={"boundary_ratio": 0.875})
    # Wan2.1 I2V: the noisy latents beside the first frame's condition (4 mask channels, one per frame a latent frame
    # folds, and the condition video's 4 latent channels), so 12 channels in; CLIP image tokens through the
    # transformer's image embedder and each block's added key/value projections (as wide as the blocks, 2 x 12)
    tiny_clip_vision = clip_vision(16, 2, 2, 32, 32, 4)
    write_pipeline("tiny-wan21-i2v", "WanImageToVideoPipeline", wan_i2v_parts(
        {**tiny_wan, "in_channels": 12, "image_dim": 16, "added_kv_proj_dim": 24}, tiny_wan_vae, tiny_umt5,
        flow_shift=3.0, image_encoder=tiny_clip_vision))
    # Wan2.2 I2V A14B: two experts of that shape without the image tokens, switched at 0.9 x 1000; shift 5
    write_pipeline("tiny-wan22-i2v", "WanImageToVideoPipeline", wan_i2v_parts(
        {**tiny_wan, "in_channels": 12}, tiny_wan_vae, tiny_umt5, flow_shift=5.0, image_encoder=None, experts=True),
        settings={"boundary_ratio": 0.9})
    # HunyuanVideo 1.5 (diffusers' own test shapes, a 4x-in-time VAE): its transformer reads the noisy latents, an
    # image condition's latents and mask (zeros for text to video), so 2 x 4 + 1 channels
    tiny_hunyuan = {"in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
                    "num_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1,
                    "text_embed_dim": 16, "text_embed_2_dim": 32, "image_embed_dim": 12, "rope_axes_dim": [2, 2, 4]}
    tiny_hunyuan_rest = (
        {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 16],
         "layers_per_block": 1, "spatial_compression_ratio": 4, "temporal_compression_ratio": 4,
         "downsample_match_channel": False, "upsample_match_channel": False},
        qwen25_vl_text_model(16, 2, 2, 2, 16), t5_encoder(32, 2, 4, 64, 8))
    write_pipeline("tiny-hunyuanvideo15", "HunyuanVideo15Pipeline", hunyuan_video15_parts(
        {**tiny_hunyuan, "target_size": 16, "task_type": "t2v"}, *tiny_hunyuan_rest, shift=7.0))
    # HunyuanVideo 1.5 image to video: the same transformer set to i2v (its size buckets around 32 px here, so a square
    # frame samples at 32 x 32), with a SigLIP image encoder as wide as its image embedding
    write_pipeline("tiny-hunyuanvideo15-i2v", "HunyuanVideo15ImageToVideoPipeline", hunyuan_video15_i2v_parts(
        {**tiny_hunyuan, "target_size": 32, "task_type": "i2v"}, *tiny_hunyuan_rest, shift=7.0,
        siglip=siglip_vision(12, 1, 2, 24, 32, 4)))
    write_pipeline(
        "tiny-pixart",
        "PixArtAlphaPipeline",
        {
            "transformer": ("diffusers", "PixArtTransformer2DModel", {
                "sample_size": 16, "num_layers": 2, "patch_size": 2, "attention_head_dim": 8,
                "num_attention_heads": 3, "caption_channels": 32, "in_channels": 4, "cross_attention_dim": 24,
                "out_channels": 8, "attention_bias": True, "activation_fn": "gelu-approximate",
                "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
                "norm_eps": 1e-6}),
            "vae": ("diffusers", "AutoencoderKL", tiny_vae),
            "text_encoder": ("transformers", "T5EncoderModel", t5_encoder(32, 2, 4, 64, 8)),
            "tokenizer": ("transformers", "T5TokenizerFast", "t5-tokenizer"),
            "scheduler": ("diffusers", "DDPMScheduler", ddpm_scheduler(beta_schedule="linear", beta_start=0.0001,
                                                                       beta_end=0.02)),
        },
    )


def full_size() -> None:
    """Real architectures (configs as published with SD1.5, SDXL 1.0, SD3-medium, SD3.5, FLUX.1, PixArt-alpha)."""
    sd_vae = vae([128, 256, 512, 512], latent=4, sample=512)
    clip_l = clip_text(768, 12, 12, max_position_embeddings=77)
    clip_g = clip_text(1280, 32, 20, projection=1280, hidden_act="gelu", intermediate_size=5120)
    clip_l_proj = clip_text(768, 12, 12, projection=768)
    write_pipeline(
        "sd15",
        "StableDiffusionPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel", unet(
                block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, sample_size=64,
                cross_attention_dim=768, attention_head_dim=8,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)),
            "vae": ("diffusers", "AutoencoderKL", sd_vae),
            "text_encoder": ("transformers", "CLIPTextModel", clip_l),
            "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
            "scheduler": ("diffusers", "DDPMScheduler", ddpm_scheduler()),
            "safety_checker": (None, None, None),
            "feature_extractor": (None, None, None),
        },
    )
    write_pipeline(
        "sdxl",
        "StableDiffusionXLPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel", unet(
                block_out_channels=[320, 640, 1280], layers_per_block=2, sample_size=128,
                cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                transformer_layers_per_block=[1, 2, 10], projection_class_embeddings_input_dim=2816,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])),
            "vae": ("diffusers", "AutoencoderKL", {**sd_vae, "sample_size": 1024, "scaling_factor": 0.13025,
                                                   "force_upcast": True}),
            "text_encoder": ("transformers", "CLIPTextModel", clip_l),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", clip_g),
            "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer", "clip-tokenizer-pad!"),
            "scheduler": ("diffusers", "DDPMScheduler", ddpm_scheduler()),
        },
    )
    sd3_parts = lambda transformer: {  # noqa: E731  SD3's text encoders, VAE and scheduler around an MMDiT
        "transformer": ("diffusers", "SD3Transformer2DModel", transformer),
        "vae": ("diffusers", "AutoencoderKL", {
            **sd_vae, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", clip_l_proj),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", clip_g),
        "text_encoder_3": ("transformers", "T5EncoderModel", t5_encoder(4096, 24, 64, 10240, 64)),
        "tokenizer": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer", "clip-tokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast", "t5-tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", flow_scheduler()),
    }
    write_pipeline("sd3-medium", "StableDiffusion3Pipeline", sd3_parts({
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "caption_projection_dim": 1536,
        "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}))
    sd35 = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
            "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "qk_norm": "rms_norm"}
    # SD3.5 medium: MMDiT-X (self-attention in the image stream of the first 13 blocks), 2.5B parameters
    write_pipeline("sd35-medium", "StableDiffusion3Pipeline", sd3_parts({
        **sd35, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536, "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13))}))
    # SD3.5 large: 38 blocks of width 38 x 64, 8.1B parameters
    write_pipeline("sd35-large", "StableDiffusion3Pipeline", sd3_parts({
        **sd35, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
        "pos_embed_max_size": 192}))
    # FLUX.1: 19 double-stream and 38 single-stream blocks of width 24 x 128, 11.9B parameters; dev is
    # guidance-distilled (a guidance embedding) and shifts its grid by resolution, schnell neither
    flux = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 56, 56]}
    flux_vae = {**sd_vae, "latent_channels": 16, "sample_size": 1024}
    t5_xxl = t5_encoder(4096, 24, 64, 10240, 64)
    write_pipeline("flux-dev", "FluxPipeline", flux_parts({**flux, "guidance_embeds": True}, flux_vae, clip_l, t5_xxl,
                                                          dynamic=True))
    # FLUX.1 Kontext dev: FLUX.1-dev's architecture and scheduler, trained to read a source image's tokens too
    write_pipeline("flux-kontext-dev", "FluxKontextPipeline", flux_parts({**flux, "guidance_embeds": True}, flux_vae,
                                                                         clip_l, t5_xxl, dynamic=True))
    write_pipeline("flux-schnell", "FluxPipeline", flux_parts({**flux, "guidance_embeds": False}, flux_vae, clip_l,
                                                              t5_xxl, dynamic=False))
    # Z-Image(-Turbo), Tongyi-MAI: 30 single-stream blocks of width 3840 (30 heads) after 2 noise- and 2 caption-
    # refiner blocks, 6.2B parameters, on Qwen3-4B's hidden states (2560 wide, 36 layers) and the FLUX VAE; a static
    # shift of 3 (its transformer/ and scheduler/ configs on the Hub). The tokenizer here is the character-level one.
    # Qwen-Image, Qwen: 60 MMDiT blocks of width 24 x 128, 20B parameters, on Qwen2.5-VL-7B (3584 wide, 28 layers,
    # its vision tower built too) and its 16-channel video VAE (one frame for images); dynamic exponential shift
    # Qwen-Image-Edit (QwenImageEditPipeline) and Edit-2509/2511 (QwenImageEditPlusPipeline): the same networks, the
    # text encoder also reading the source images through Qwen2.5-VL's processor
    qwen_image = (
        {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
         "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
         "axes_dims_rope": [16, 56, 56]},
        {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
         "temperal_downsample": [False, True, True]},
        qwen25_vl_text(3584, 28, 28, 4, 18944, {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                                                  "num_heads": 16, "out_hidden_size": 3584}))
    write_pipeline("qwen-image", "QwenImagePipeline", qwen_image_parts(*qwen_image))
    # Wan2.1 T2V 1.3B and 14B (Wan-AI/Wan2.1-T2V-*-Diffusers): 30 blocks of width 12 x 128 (1.3B) and 40 of 40 x 128
    # (14B) over UMT5-XXL (4096 wide, 24 layers); the VAE with AutoencoderKLWan's defaults; 480p and 720p shifts
    umt5_xxl = umt5_encoder(4096, 24, 64, 10240, 64)
    wan = {"patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
           "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
           "rope_max_seq_len": 1024}
    write_pipeline("wan21-t2v-1.3b", "WanPipeline", wan_parts(
        {**wan, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, {}, umt5_xxl, flow_shift=3.0))
    write_pipeline("wan21-t2v-14b", "WanPipeline", wan_parts(
        {**wan, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}, {}, umt5_xxl, flow_shift=5.0))
    # Wan2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers): 30 blocks of width 24 x 128 on 48-channel latents of Wan2.2's
    # VAE (16x in space: 2x2 pixel patches, then 8x); one timestep per latent token. The VAE's per-channel mean and
    # standard deviation are placeholders here (0 and 1): they change no shape, and the released folder has its own
    write_pipeline("wan22-ti2v-5b", "WanPipeline", wan_parts(
        {**wan, "in_channels": 48, "out_channels": 48, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30},
        {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
         "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
         "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48},
        umt5_xxl, flow_shift=5.0), settings={"expand_timesteps": True})
    # HunyuanVideo 1.5 480p text to video (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v): the
    # transformer's defaults in diffusers (54 blocks of width 16 x 128, 8.3B parameters) set to text to video, its
    # 32-channel VAE's defaults, Qwen2.5-VL-7B's text model and the glyph ByT5 encoder (1472 wide, 12 layers); the
    # scheduler's shift is a placeholder (5), as it changes no shape and the released folder has its own
    hunyuan_encoders = (qwen25_vl_text_model(3584, 28, 28, 4, 18944),
                        {**t5_encoder(1472, 12, 6, 3584, 64), "vocab_size": 384})
    write_pipeline("hunyuanvideo15-480p-t2v", "HunyuanVideo15Pipeline", hunyuan_video15_parts(
        {"task_type": "t2v"}, {}, *hunyuan_encoders, shift=5.0))
    # HunyuanVideo 1.5 480p image to video (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v): the same set to
    # i2v, with SigLIP so400m at 384 px (1152 wide, 27 layers, 729 image tokens)
    write_pipeline("hunyuanvideo15-480p-i2v", "HunyuanVideo15ImageToVideoPipeline", hunyuan_video15_i2v_parts(
        {"task_type": "i2v"}, {}, *hunyuan_encoders, shift=5.0, siglip=siglip_vision(1152, 27, 16, 4304, 384, 14)))
    # Wan2.2 T2V A14B (Wan-AI/Wan2.2-T2V-A14B-Diffusers): two 14B experts of Wan2.1 14B's shape, the high-noise one for
    # timesteps at or above 0.875 x 1000, on Wan2.1's VAE; its sampling shift of 12 (Wan2.2's t2v_A14B config)
    write_pipeline("wan22-t2v-a14b", "WanPipeline", wan_parts(
        {**wan, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}, {}, umt5_xxl, flow_shift=12.0,
        experts=True), settings={"boundary_ratio": 0.875})
    # Wan2.1 I2V 14B 480p (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers): the 14B T2V blocks on 16 + 4 + 16 input channels, with
    # open-clip's XLM-RoBERTa ViT-H/14 image tower (1280 wide, 32 layers, 257 tokens at 224 px) read by each block's
    # added key/value projections; Wan2.2 I2V A14B (Wan-AI/Wan2.2-I2V-A14B-Diffusers): two such experts without the
    # image tower, switched at 0.9 x 1000, sampled with shift 5 (Wan2.2's i2v_A14B config)
    write_pipeline("wan21-i2v-14b-480p", "WanImageToVideoPipeline", wan_i2v_parts(
        {**wan, "in_channels": 36, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "image_dim": 1280,
         "added_kv_proj_dim": 5120}, {}, umt5_xxl, flow_shift=3.0,
        image_encoder=clip_vision(1280, 32, 16, 5120, 224, 14)))
    write_pipeline("wan22-i2v-a14b", "WanImageToVideoPipeline", wan_i2v_parts(
        {**wan, "in_channels": 36, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}, {}, umt5_xxl,
        flow_shift=5.0, image_encoder=None, experts=True), settings={"boundary_ratio": 0.9})
    write_pipeline("qwen-image-edit", "QwenImageEditPipeline", qwen_image_parts(*qwen_image, edit=True))
    write_pipeline("qwen-image-edit-plus", "QwenImageEditPlusPipeline", qwen_image_parts(*qwen_image, edit=True))
    # FLUX.2 dev (black-forest-labs/FLUX.2-dev): 8 double- and 48 single-stream blocks of width 48 x 128, 32B
    # parameters (diffusers' Flux2Transformer2DModel defaults), on three hidden layers of Mistral Small 3.1 24B
    # (5120 wide: 15360 joint) and the FLUX.2 VAE (AutoencoderKLFlux2's defaults, 32 latent channels)
    write_pipeline("flux2-dev", "Flux2Pipeline", flux2_dev_parts(
        {}, {}, mistral3()))
    # FLUX.2 klein 4B (black-forest-labs/FLUX.2-klein-4B and -base-4B): 5 double- and 20 single-stream blocks of
    # width 24 x 128 on three hidden layers (9, 18, 27) of Qwen3-4B (2560 wide: 7680 joint), no guidance embedding
    write_pipeline("flux2-klein-4b", "Flux2KleinPipeline", flux2_klein_parts(
        {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
         "guidance_embeds": False}, {},
        qwen3_text(2560, 36, 32, 8, 9728, head_dim=128)))
    # FLUX.2 klein 9B (black-forest-labs/FLUX.2-klein-9B and -base-9B; BFL's flux2 ``Klein9BParams``): 8 double- and
    # 24 single-stream blocks of width 32 x 128 on three hidden layers of Qwen3-8B (4096 wide: 12288 joint)
    write_pipeline("flux2-klein-9b", "Flux2KleinPipeline", flux2_klein_parts(
        {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288,
         "guidance_embeds": False}, {},
        qwen3_text(4096, 36, 32, 8, 12288, head_dim=128)))
    write_pipeline("z-image-turbo", "ZImagePipeline", z_image_parts(
        {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
         "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
         "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
         "axes_lens": [1536, 512, 512]},
        flux_vae, qwen3_text(2560, 36, 32, 8, 9728, head_dim=128), shift=3.0))
    write_pipeline(
        "pixart-alpha-1024",
        "PixArtAlphaPipeline",
        {
            "transformer": ("diffusers", "PixArtTransformer2DModel", {
                "sample_size": 128, "num_layers": 28, "patch_size": 2, "attention_head_dim": 72,
                "num_attention_heads": 16, "caption_channels": 4096, "in_channels": 4, "out_channels": 8,
                "cross_attention_dim": 1152, "attention_bias": True, "activation_fn": "gelu-approximate",
                "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
                "norm_eps": 1e-6, "use_additional_conditions": True}),
            "vae": ("diffusers", "AutoencoderKL", sd_vae),
            "text_encoder": ("transformers", "T5EncoderModel", t5_encoder(4096, 24, 64, 10240, 64)),
            "tokenizer": ("transformers", "T5TokenizerFast", "t5-tokenizer"),
            "scheduler": ("diffusers", "DDPMScheduler", ddpm_scheduler(beta_schedule="linear", beta_start=0.0001,
                                                                       beta_end=0.02)),
        },
    )


if __name__ == "__main__":
    tiny()
    full_size()
    print(f"wrote {sorted(p.name for p in ROOT.iterdir())} under {ROOT}")
