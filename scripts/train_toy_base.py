"""Train a toy world's base model and write it to assets/models/toy-base (or toy-sign) as safetensors.

The model is a Stable Diffusion 1.x pipeline at toy scale (a 32x32 -> 4x16x16 VAE, a
2-layer character-level CLIP text encoder, a two-level UNet with cross-attention, a DDIM
scheduler), so loading, sampling, training and export run on it exactly as on SD1.5.

Two stages on procedurally rendered images, each seeded: the shapes world's scenes (:mod:`diffalign.toy.world`), or
with ``--world signs`` the text-rendering world's signs (:mod:`diffalign.toy.sign_world`, every word of its
vocabulary, held-out ones included: alignment holds them out, pre-training does not):
1. the VAE as an autoencoder (L1 + a small KL term); its latent scale is then measured so that
   scaled latents have unit variance, as SD's ``scaling_factor`` does;
2. the text encoder and UNet together with the epsilon objective, dropping 10% of captions so
   that classifier-free guidance works.

Re-run to reproduce the shipped weights (same torch version and CPU; about 20 minutes on 2 cores each):
``python scripts/train_toy_base.py`` and ``python scripts/train_toy_base.py --world signs``
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffalign.toy import random_scene, render
from diffalign.toy.sign_world import random_sign, render_sign

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = ROOT / "assets" / "models" / "tiny-sd15" / "tokenizer"
MAX_TOKENS = 24
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1, prediction_type="epsilon")


WORLDS = {"shapes": (random_scene, render, "toy-base"), "signs": (random_sign, render_sign, "toy-sign")}


def scenes_dataset(count: int, seed: int, world: str = "shapes") -> tuple[torch.Tensor, list[str]]:
    """``count`` rendered scenes of ``world`` as pixels in [-1, 1] (N, 3, 32, 32) with their captions."""
    sample, draw, _ = WORLDS[world]
    rng = random.Random(seed)
    scenes = [sample(rng) for _ in range(count)]
    pixels = np.stack([draw(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes]


def build_models(seed: int):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=64, hidden_act="quick_gelu",
    ))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_SOURCE, local_files_only=True)
    tokenizer.model_max_length = MAX_TOKENS
    return vae, text_encoder, unet, tokenizer


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, batch: int, seed: int) -> float:
    """Autoencoder training; returns the latent scaling factor (1 / std of posterior means)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, min(len(pixels), 2048), 256)])
    return float(1.0 / means.std())


def train_denoiser(vae, text_encoder, unet, tokenizer, pixels, captions, steps: int, batch: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
        latents = latents * vae.config.scaling_factor
    ids = tokenizer(captions + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty = ids[-1:]
    ids = ids[:-1]
    schedule = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=7e-4, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200) * (1 - s / steps) ** 0.5)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0, tokens = latents[index], ids[index].clone()
        tokens[torch.rand(batch, generator=generator) < 0.1] = empty  # caption dropout for CFG
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = schedule.add_noise(x0, noise, t)
        states = text_encoder(tokens)[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"unet step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    unet.eval()
    text_encoder.eval()


def write_hub_key_layout(text_encoder_file: Path) -> None:
    """Rename the text encoder's weights to ``text_model.*``, as the Hub's CLIP checkpoints (SD1.5's
    among them) name them. Recent transformers save a ``CLIPTextModel`` without the prefix and read
    both; transformers 5.0 reads only the prefixed names, and loads a file without them as a text
    encoder with random weights, warning only in its load report."""
    weights = load_file(text_encoder_file)
    save_file({key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in weights.items()},
              text_encoder_file, metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=sorted(WORLDS), default="shapes")
    parser.add_argument("--out", type=Path, help="default: assets/models/toy-base (shapes) or toy-sign (signs)")
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = args.out or ROOT / "assets" / "models" / WORLDS[args.world][2]
    pixels, captions = scenes_dataset(args.scenes, args.seed, args.world)
    vae, text_encoder, unet, tokenizer = build_models(args.seed)
    scale = train_vae(vae, pixels, args.vae_steps, 32, args.seed)
    vae.register_to_config(scaling_factor=scale)
    print(f"vae scaling_factor {scale:.4f}", flush=True)
    train_denoiser(vae, text_encoder, unet, tokenizer, pixels, captions, args.unet_steps, args.batch, args.seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULE, set_alpha_to_one=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out, safe_serialization=True)
    write_hub_key_layout(out / "text_encoder" / "model.safetensors")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
