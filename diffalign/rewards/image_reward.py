"""ImageReward (Xu et al. 2023, NeurIPS), loaded from its ``ImageReward.pt`` without the
``image-reward`` package (which pins old transformers versions).

The model is BLIP: a ViT (ViT-L/16 at 224 px) encodes the image, a BERT text encoder reads the
prompt with cross-attention to the image tokens, and an MLP maps the [CLS] feature to a reward,
standardised with the training set's statistics:

    reward = (MLP(BERT(prompt | ViT(image))[CLS]) - 0.16717362830052426) / 1.0333394966054072

as in ``ImageReward.score`` (prompt padded to 35 tokens; CLIP preprocessing at 224 px). The
BLIP modules are transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the same layers as
BLIP's ``med.py``), built with the sizes read off the checkpoint (head size 64, as in ViT-L and
BERT-base) and loaded from its tensors under transformers' names. The tokenizer is BERT's
(``tokenizer=`` a local bert-base-uncased folder) with BLIP's two added tokens, [DEC] and [ENC].
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torchvision import transforms

from diffalign.errors import UserError
from diffalign.rewards.checkpoints import load_strict, read_state_dict
from diffalign.rewards.clip_rewards import _autocast, _batches, _device, mlp_head, to_pil

Tensor = torch.Tensor
MEAN, STD = 0.16717362830052426, 1.0333394966054072
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64
VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _split(state: dict[str, Tensor], path: Path) -> tuple[dict, dict, dict]:
    """The checkpoint's vision, text and MLP tensors under transformers' / our names."""
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in VISION_RENAMES:
                name = re.sub(pattern, replacement, name)
            parts["vision"][name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            parts["mlp"][key.removeprefix("mlp.layers.")] = value
    missing = [k for k, v in parts.items() if not v]
    if missing:
        raise UserError(f"image_reward: {path} is not an ImageReward checkpoint: it has no "
                        f"{', '.join(missing)} weights (expected keys blip.visual_encoder.*, blip.text_encoder.*, "
                        "mlp.layers.*)")
    return parts["vision"], parts["text"], parts["mlp"]


def _count(state: dict[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _blip_modules(vision_state: dict, text_state: dict) -> tuple[nn.Module, nn.Module]:
    """BlipVisionModel and BlipTextModel with the checkpoint's sizes."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    width = vision_state["embeddings.class_embedding"].shape[-1]
    patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision_state["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(vision_state, r"encoder\.layers\.(\d+)\."), num_attention_heads=width // HEAD_DIM,
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6))
    vocab, hidden = text_state["embeddings.word_embeddings.weight"].shape
    text = BlipTextModel(BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
        intermediate_size=text_state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(text_state, r"encoder\.layer\.(\d+)\."), num_attention_heads=hidden // HEAD_DIM,
        max_position_embeddings=text_state["embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=1e-12, is_decoder=True), add_pooling_layer=False)
    return vision.eval(), text.eval()


class ImageReward:
    """ImageReward from ``ImageReward.pt``; ``tokenizer`` is a local bert-base-uncased folder."""

    name = "image_reward"
    description = ("ImageReward: human preference for the image given its prompt, standardised (0 is the "
                   "average image of its training set); higher is better.")

    def __init__(self, path: str | Path, *, tokenizer: str | Path | None = None,
                 device: str | torch.device | None = None, batch_size: int = 32) -> None:
        from transformers import BertTokenizer

        path = Path(path)
        vocab_folder = Path(tokenizer) if tokenizer is not None else path.parent
        if not (vocab_folder / "vocab.txt").is_file():
            raise UserError(f"image_reward: {vocab_folder / 'vocab.txt'} not found; give tokenizer= a local "
                            "bert-base-uncased folder (ImageReward uses BERT's tokenizer)")
        vision_state, text_state, mlp_state = _split(read_state_dict(path, what=self.name), path)
        self.vision, self.text = _blip_modules(vision_state, text_state)
        self.head = mlp_head(text_state["embeddings.word_embeddings.weight"].shape[1]).eval()
        for module, state, expected in ((self.vision, vision_state, "BLIP's ViT"), (self.text, text_state, "BLIP's BERT"),
                                        (self.head, mlp_state, "the ImageReward MLP")):
            load_strict(module, state, path=path, what=self.name, expected=expected)
        self.tokenizer = BertTokenizer.from_pretrained(vocab_folder, local_files_only=True)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        size = self.vision.config.image_size
        self.preprocess = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
            transforms.ToTensor(), transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
        self.device = _device(device)
        for module in (self.vision, self.text, self.head):
            module.to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = []
        for chunk in _batches(len(prompts), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in to_pil(images[chunk])]).to(self.device)
            tokens = self.tokenizer(list(prompts[chunk]), padding="max_length", truncation=True, max_length=35,
                                    return_tensors="pt").to(self.device)
            with _autocast(self.device):
                image_embeds = self.vision(pixel_values=pixels).last_hidden_state
                features = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                     encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long,
                                                                       device=self.device)).last_hidden_state[:, 0]
            out.append(((self.head(features.float()).squeeze(-1) - MEAN) / STD).cpu())
        return torch.cat(out)
