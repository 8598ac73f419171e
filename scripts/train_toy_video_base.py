"""Train the toy video world's base model and write it to assets/models/toy-video as safetensors.

The model is a Wan2.1 text-to-video pipeline at toy scale (:mod:`diffalign.toy.video_world`'s 9-frame 32x32 clips):
Wan's causal video VAE in Wan2.2's residual form over 2x2 pixel patches (``is_residual``, ``patch_size=2``: its
shortcuts carry the pixels through the down- and up-sampling, which train in minutes where the plain Wan2.1 VAE
still drew shapeless blobs after 800 steps), 4x in space and 2x in time (9 frames -> 5 latent frames of 16 x 8 x 8);
a 2-layer UMT5 text encoder over the character-level tokenizer of ``assets/models/tiny-wan``; a 4-layer Wan
transformer; UniPC on flow sigmas. Loading, sampling, training, the online rounds and export run on it exactly as on
Wan2.1.

Two stages on procedurally rendered clips of every caption (held-out ones included: alignment holds them out,
pre-training does not), every kind of motion equally often, each stage seeded:
1. the VAE as an autoencoder (L1 weighing the shape's pixels 10x, + a small KL term); the per-channel mean and
   standard deviation of its latents are then measured and written as ``latents_mean`` / ``latents_std``, as Wan's
   VAE config carries them, and the judge's reading of unseen clips after the round trip is printed;
2. the text encoder and the transformer together with the rectified-flow objective (velocity noise - clip at
   uniform sigmas), the prompt's embeddings zero-padded to the pipeline's 512 tokens as WanPipeline pads them,
   dropping 10% of captions so that classifier-free guidance works.

Re-run to reproduce the shipped weights (same torch version and CPU; about 25 minutes on 2 cores):
``python scripts/train_toy_video_base.py``
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
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from diffalign.toy.video_judge import clip_adheres, measure_clip
from diffalign.toy.video_world import FRAMES, random_clip, render_clip
from diffalign.toy.world import BACKGROUND

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = ROOT / "assets" / "models" / "tiny-wan" / "tokenizer"
CAPTION_TOKENS = 32  # every toy caption is shorter, in characters
PIPELINE_TOKENS = 512  # WanPipeline's max_sequence_length: the embeddings are zero-padded to it


def clips_dataset(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` rendered clips as uint8 (N, 3, F, 32, 32) with their captions."""
    rng = random.Random(seed)
    clips = [random_clip(rng) for _ in range(count)]
    frames = np.stack([render_clip(c) for c in clips])  # (N, F, H, W, 3)
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).contiguous(), [c.caption for c in clips]


def to_pixels(clips: torch.Tensor) -> torch.Tensor:
    return clips.float() / 127.5 - 1.0


def build_models(seed: int):
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * 16, latents_std=[1.0] * 16, is_residual=True, patch_size=2,
                           in_channels=12, out_channels=12, scale_factor_spatial=4, scale_factor_temporal=2)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_SOURCE, local_files_only=True)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        is_encoder_decoder=False))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    return vae, text_encoder, transformer, tokenizer


def train_vae(vae: AutoencoderKLWan, clips: torch.Tensor, steps: int, batch: int, seed: int) -> None:
    """Autoencoder training, then ``latents_mean`` / ``latents_std`` measured on the posterior means.

    The L1 error weighs the shape's pixels (those off the background) 10 times the background's: a shape covers about
    a tenth of a frame, and an unweighted error first settles on frames of background alone, which a few thousand
    clips do not leave."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1, 1) / 127.5 - 1.0
    vae.train()
    started = time.perf_counter()
    for step in range(steps):
        x = to_pixels(clips[torch.randint(len(clips), (batch,), generator=generator)])
        weight = 1.0 + 9.0 * ((x - background).abs().sum(dim=1, keepdim=True) > 0.1).float()
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (weight * (recon - x).abs()).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    vae.eval()
    means = encode_means(vae, clips[:1024])
    channels = means.transpose(0, 1).flatten(1)
    vae.register_to_config(latents_mean=channels.mean(1).tolist(), latents_std=channels.std(1).tolist())


@torch.no_grad()
def check_reconstructions(vae: AutoencoderKLWan, seed: int, count: int = 64) -> None:
    """Print how the toy video judge reads ``count`` unseen clips after the VAE's round trip: the share that still
    adhere (every frame a shape, the right colour and shape, moving) and the roughness it measures, beside the
    rendered clips' own."""
    clips, captions = clips_dataset(count, seed + 10**6)
    decoded = vae.decode(encode_means(vae, clips)).sample.clamp(-1, 1)
    frames = ((decoded + 1) * 127.5).permute(0, 2, 3, 4, 1).numpy()
    seen = [measure_clip(c) for c in frames]
    rendered = [measure_clip(c.astype(float)) for c in clips.permute(0, 2, 3, 4, 1).numpy()]
    adherence = np.mean([clip_adheres(m, p) for m, p in zip(seen, captions)])
    pairs = [(a.roughness, b.roughness) for a, b in zip(rendered, seen) if b.roughness is not None]
    print(f"vae round trip of {count} unseen clips: adherence {adherence:.3f}, roughness rendered "
          f"{np.mean([a for a, _ in pairs]):.2f} vs decoded {np.mean([b for _, b in pairs]):.2f}", flush=True)


@torch.no_grad()
def encode_means(vae: AutoencoderKLWan, clips: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(to_pixels(clips[i:i + 64])).latent_dist.mean for i in range(0, len(clips), 64)])


def embed(text_encoder: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WanPipeline's prompt embeddings: the encoder's states of the caption's tokens, zeros after them to 512."""
    states = text_encoder(ids, attention_mask=mask).last_hidden_state * mask[..., None]
    return F.pad(states, (0, 0, 0, PIPELINE_TOKENS - states.shape[1]))


def train_denoiser(vae, text_encoder, transformer, tokenizer, clips, captions, steps: int, batch: int,
                   seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (encode_means(vae, clips) - mean) / std
    tokens = tokenizer(captions + [""], padding="max_length", max_length=CAPTION_TOKENS, truncation=True,
                       return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200) * (1 - s / steps) ** 0.5)
    transformer.train()
    text_encoder.train()
    started = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(latents), (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < 0.1  # caption dropout for CFG: the empty prompt
        batch_ids = torch.where(dropped[:, None], ids[-1:], ids[index])
        batch_mask = torch.where(dropped[:, None], mask[-1:], mask[index])
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.rand(batch, generator=generator).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        predicted = transformer(noisy, sigma.flatten() * 1000, embed(text_encoder, batch_ids, batch_mask),
                                return_dict=False)[0]
        loss = F.mse_loss(predicted, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"transformer step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    transformer.eval()
    text_encoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "models" / "toy-video")
    parser.add_argument("--clips", type=int, default=8000)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--denoiser-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    clips, captions = clips_dataset(args.clips, args.seed)
    vae, text_encoder, transformer, tokenizer = build_models(args.seed)
    train_vae(vae, clips, args.vae_steps, 8, args.seed)
    check_reconstructions(vae, args.seed)
    train_denoiser(vae, text_encoder, transformer, tokenizer, clips, captions, args.denoiser_steps, args.batch,
                   args.seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    shutil.rmtree(args.out, ignore_errors=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out} (clips of {FRAMES} frames)")


if __name__ == "__main__":
    main()
