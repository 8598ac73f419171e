"""Small on-disk datasets (and a Hugging Face cache) written by the tests (no downloads)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from diffalign.recipes.samples import (  # noqa: F401  (the datasets the tests write, shared with --smoke)
    chat_lm,
    conversations_parquet,
    images_parquet,
    pickapic_parquet,
    png_bytes,
    ranked_parquet,
)

if TYPE_CHECKING:
    import torch


class Started:
    """A command started in the background, its output going to files (not pipes, so a chatty process never waits
    on a reader): ``result()`` waits for it and gives what ``subprocess.run(..., capture_output=True, text=True)``
    would. The tests that compare a two-process run with a one-process one start the two processes (one thread
    each, ``OMP_NUM_THREADS=1``) and run the one process beside them, so the machine's cores are shared instead of
    one idling through a run of one thread."""

    def __init__(self, argv: list[str], *, cwd: Path | None = None, env: dict | None = None) -> None:
        self._folder = tempfile.TemporaryDirectory()
        self._out, self._err = (open(Path(self._folder.name) / name, "w+", encoding="utf-8") for name in ("out", "err"))
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=self._err, text=True)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        code = self.process.wait(timeout=timeout)
        self._out.seek(0), self._err.seek(0)
        done = subprocess.CompletedProcess(self.process.args, code, self._out.read(), self._err.read())
        self._out.close(), self._err.close()
        self._folder.cleanup()
        return done


def run_together(launches: dict[str, list[str]], *, cwd: Path | None = None, env: dict | None = None,
                 timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once (:class:`Started`) and wait for all."""
    started = {name: Started(argv, cwd=cwd, env=env) for name, argv in launches.items()}
    return {name: run.result(timeout) for name, run in started.items()}


def launch_env(accelerate_config: Path, **overrides: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file ACCELERATE_CONFIG`` gives each process (accelerate's own
    argument parsing and environment), for a torchrun of two processes with one thread each. On a machine without
    GPUs accelerate launches no distributed run from an FSDP config, so the tests start torchrun with what it
    would set; ``overrides`` replace variables (each test names those it changes, e.g. mixed precision on a CPU)."""
    import os

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(accelerate_config), "--num_processes", "2",
                                               "-m", "diffalign"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {**os.environ, **env, "OMP_NUM_THREADS": "1", **overrides}


def torchrun(*args: str) -> list[str]:
    """``python -m torch.distributed.run`` of two processes on a free port, running ``diffalign ARGS``."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffalign",
            *args]


def script_module(name: str):
    """``scripts/NAME.py`` imported as a module (the scripts are no package), for tests of their functions."""
    import importlib.util

    from diffalign.paths import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_policy_and_reference():
    """The shipped toy model as a backbone whose denoiser is nudged (seeded), and the untouched UNet as reference."""
    import torch

    from diffalign.diffusion import backbone_for, load_pipeline
    from diffalign.paths import TOY_BASE

    backbone = backbone_for(load_pipeline(TOY_BASE))
    torch.manual_seed(0)
    for p in backbone.denoiser.parameters():  # a policy that differs from the reference
        p.data.add_(0.01 * torch.randn_like(p))
    return backbone, load_pipeline(TOY_BASE).unet


def hub_cache_with(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567",
                   repo_type: str = "model") -> Path:
    """A Hugging Face cache (``HF_HUB_CACHE`` layout) holding ``folder`` as ``repo_id``'s main revision."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def tiny_clip_folder(folder: Path) -> Path:
    """A tiny random CLIPModel (32 px, projection 16) with its processor, as PickScore's or CLIP ViT-L's folder
    is laid out, over tiny-sd15's tokenizer."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.paths import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "models" / "tiny-sd15" / "tokenizer")
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=4.6052)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def tiny_open_clip(folder: Path, *, embed_dim: int, width: int = 64, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """An open_clip model config (a tiny ViT-H-14 look-alike) and a random model of it."""
    import json

    import open_clip
    import torch

    config = folder / f"tiny-clip-{embed_dim}-{width}.json"
    config.write_text(json.dumps({
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    return config, open_clip.create_model(config.stem, pretrained=None).eval()


DOG = 16  # "dog" in the COCO label order GenEval reads


def tiny_geneval_models(folder: Path) -> tuple[Path, Path, Path]:
    """GenEval's two models, tiny and random, written under ``folder``: a Mask2Former (80 COCO labels, Swin backbone)
    whose class head says "dog" for every query, with its image processor; and an open_clip ViT (its config file and
    a checkpoint). Returns the detector's folder, the CLIP checkpoint and the CLIP config."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, hidden_dim=32, num_queries=8,
                               encoder_layers=1, decoder_layers=2, feature_size=32, mask_feature_size=32,
                               dim_feedforward=64, num_attention_heads=2, encoder_feedforward_dim=64)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-20.0)
        model.class_predictor.bias[DOG] = 20.0
    model.save_pretrained(folder / "mask2former")
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(folder / "mask2former")
    arch, clip = tiny_open_clip(folder, embed_dim=32)
    torch.save(clip.state_dict(), folder / "clip.pt")
    return folder / "mask2former", folder / "clip.pt", arch


def geneval_spec(detector: Path, clip: Path, arch: Path, **options) -> str:
    """The reward spec of the tiny GenEval models, with ``options`` (rule=..., metadata=...)."""
    return ":".join([f"geneval:{detector}", f"clip={clip}", f"arch={arch}", *(f"{k}={v}" for k, v in options.items())])


def tiny_qwen2vl(base: Path, chat_template: str, *, hidden: int = 32, max_positions: int = 4096,
                 special_tokens: tuple[str, ...] = ()):
    """(processor, config) of a random 2-layer Qwen2-VL, the base of the Qwen2-VL reward models' tests (HPSv3,
    VideoAlign): Qwen-Image-Edit's tiny processor copied to ``base`` with ``chat_template`` and ``special_tokens``
    added (each one token, as Qwen's), and a config over its vocabulary with the processor's vision token ids."""
    from transformers import AutoProcessor, Qwen2VLConfig

    from diffalign.paths import ASSETS

    shutil.copytree(ASSETS / "models" / "tiny-qwenimage-edit" / "processor", base)
    processor = AutoProcessor.from_pretrained(base)
    processor.chat_template = chat_template
    if special_tokens:
        processor.tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    processor.save_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2), **ids)
    return processor, config
