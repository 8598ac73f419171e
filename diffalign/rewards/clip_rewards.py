"""CLIP-based reward models: PickScore, HPS v2 / v2.1, CLIP score and the LAION aesthetic predictor.

Each is loaded from local files the user points to (no downloads) and scores a batch of images
in [0, 1] against their prompts:

- PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic, through transformers.
  score = exp(logit_scale) * cos(image embedding, text embedding), as in the model card.
- HPS v2 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 with the HPS checkpoint.
  score = cos(image embedding, text embedding), as in ``hpsv2.score`` (no logit scale).
- CLIP score (Hessel et al. 2021): any open_clip model; score = 100 * max(cos, 0).
- LAION aesthetic predictor v2 (improved-aesthetic-predictor): an MLP over the L2-normalised
  CLIP ViT-L/14 image embedding; the prompt is not used.

Preprocessing is each model's own: the transformers processor saved with PickScore, and
open_clip's evaluation transform (resize the shorter side, centre crop, CLIP mean/std) for the
others. On CUDA the towers run in float16 under autocast; similarities are taken in float32.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffalign.diffusion.loading import default_device
from diffalign.errors import UserError
from diffalign.rewards.checkpoints import load_strict, read_state_dict

Tensor = torch.Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """Float (N, 3, H, W) images in [0, 1] as 8-bit PIL images (what the models' processors expect)."""
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def tensor_preprocess(images: Tensor, shorter_side: int, crop: tuple[int, int], mean: Sequence[float],
                      std: Sequence[float]) -> Tensor:
    """The CLIP evaluation transform (bicubic resize of the shorter side with antialiasing, centre crop, mean/std
    normalisation) on float (N, 3, H, W) images in [0, 1], in torchvision's tensor ops, so gradients reach the
    images: the path of the methods that follow a reward's gradient, where the scoring path's 8-bit PIL images
    would cut them."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    pixels = TF.resize(images.float(), [shorter_side], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(pixels, list(crop)), list(mean), list(std))


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else default_device()


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def _batches(n: int, size: int):
    return (slice(i, i + size) for i in range(0, n, size))


class PickScore:
    """PickScore from a local folder holding the CLIPModel (and its processor, or ``processor=`` another folder)."""

    name = "pickscore"
    description = ("PickScore: how much people on Pick-a-Pic would prefer the image for its prompt (a CLIP-H "
                   "similarity trained on their choices, about 18-24); higher is better.")

    def __init__(self, path: str | Path, *, processor: str | Path | None = None,
                 device: str | torch.device | None = None, batch_size: int = 32) -> None:
        from transformers import AutoProcessor, CLIPModel

        path = Path(path)
        processor_path = Path(processor) if processor is not None else path
        for folder, wanted, what in ((path, ("config.json",), "a CLIPModel config"),
                                     (processor_path, ("preprocessor_config.json", "processor_config.json"),
                                      "a CLIP processor")):
            if not any((folder / name).is_file() for name in wanted):
                raise UserError(f"pickscore: {folder / wanted[0]} not found; expected {what} there "
                                "(the folder of yuvalkirstain/PickScore_v1, and processor= the folder of "
                                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K if it has no processor files)")
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(self.device).requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(processor_path, local_files_only=True)
        self.batch_size = batch_size

    differentiable = True

    def score_with_gradient(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) scores on the model's device, differentiable in ``images`` (:func:`tensor_preprocess` with the
        processor's sizes and statistics; the model's weights are frozen)."""
        ip = self.processor.image_processor
        crop = (ip.crop_size["height"], ip.crop_size["width"])
        return self._score(tensor_preprocess(images.to(self.device), ip.size["shortest_edge"], crop, ip.image_mean,
                                             ip.image_std), prompts)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = []
        for chunk in _batches(len(prompts), self.batch_size):
            pixels = self.processor(images=to_pil(images[chunk]), return_tensors="pt")["pixel_values"]
            out.append(self._score(pixels.to(self.device), prompts[chunk]).cpu())
        return torch.cat(out)

    def _score(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) exp(logit scale) x the cosine of the preprocessed ``pixels``' and the prompts' embeddings."""
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        with _autocast(self.device):
            image_features = _features(self.model.get_image_features(pixel_values=pixels))
            text_features = _features(self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)))
        cosine = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
        return self.model.logit_scale.exp().float() * cosine


class ClipImageTower:
    """A transformers CLIPModel folder with its processor, of which only the vision tower runs: the image embeddings
    the rewards that compare images with images read (``image_similarity``, ``temporal_consistency``)."""

    name = ""

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None, batch_size: int = 32) -> None:
        from transformers import AutoProcessor, CLIPModel

        path = Path(path)
        processor_files = ("preprocessor_config.json", "processor_config.json")
        if not (path / "config.json").is_file() or not any((path / name).is_file() for name in processor_files):
            raise UserError(f"{self.name}: {path} needs a CLIPModel's config.json and its processor's "
                            "preprocessor_config.json (the folder of openai/clip-vit-large-patch14, say)")
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.batch_size = batch_size

    def _embed(self, images: Tensor) -> Tensor:
        """The (N, D) float32 image embeddings of (N, 3, H, W) images in [0, 1], in one call."""
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        with _autocast(self.device):
            return _features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()


class ImageSimilarity(ClipImageTower):
    """How much an edit keeps of its source: the cosine of the CLIP image embeddings of the edited image and its
    source (the mean over the sources of an edit of several), as Flow-GRPO's ``image_similarity`` reward that its
    Kontext and Qwen-Image-Edit runs weigh against the instruction's reward (``ClipScorer.image_similarity``,
    CLIP ViT-L/14). A transformers CLIPModel folder with its processor; only its vision tower runs."""

    name = "image_similarity"
    description = ("Image similarity: the cosine of CLIP's embeddings of the edit and its source image, from about "
                   "0.5 (unrelated) to 1 (unchanged); higher keeps more of the source.")
    reads_sources = True  # called with each image's sources: (N, S, 3, H, W) in [0, 1]

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], sources: Tensor | None = None) -> Tensor:
        if sources is None:
            raise UserError("image_similarity scores edits against their source images; it needs edit prompts "
                            "(data.source_columns)")
        out = []
        for chunk in _batches(len(images), self.batch_size):
            edited = self._embed(images[chunk])
            source = self._embed(sources[chunk].flatten(0, 1)).view(*sources[chunk].shape[:2], -1)
            out.append(F.cosine_similarity(edited[:, None], source, dim=-1).mean(dim=1).cpu())
        return torch.cat(out)


def _features(output) -> Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output whose pooler_output holds them)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def open_clip_arch(arch: str | Path, *, what: str) -> str:
    """The open_clip model name of ``arch``: a registered name like ``ViT-H-14``, or a model-config
    JSON file, which is registered under its file stem."""
    import open_clip

    name = str(arch)
    if name.endswith(".json"):
        config = Path(name)
        if not config.is_file():
            raise UserError(f"{what}: model config {config} does not exist")
        json.loads(config.read_text())  # a clear JSON error before open_clip's
        open_clip.add_model_config(config)
        name = config.stem
    if name not in open_clip.list_models():
        raise UserError(f"{what}: unknown open_clip architecture {name!r}")
    return name


def open_clip_model(arch: str | Path, checkpoint: str | Path, *, what: str) -> nn.Module:
    """An open_clip model of ``arch`` (see :func:`open_clip_arch`) with the weights of ``checkpoint``, in eval mode."""
    import open_clip

    name = open_clip_arch(arch, what=what)
    model = open_clip.create_model(name, pretrained=None)
    load_strict(model, read_state_dict(checkpoint, what=what), path=checkpoint, what=what,
                expected=f"open_clip {name}")
    return model.eval()


# OpenAI's CLIP ViT-L/14 (the aesthetic predictor's and GenEval's) was trained with QuickGELU; open_clip's plain
# ViT-L-14 builds GELU (right for LAION's weights), so OpenAI's weights need the quickgelu variant or every
# embedding drifts (open_clip's pretrained config for ("ViT-L-14", "openai") sets quick_gelu for the same reason).
OPENAI_VIT_L = "ViT-L-14-quickgelu"


class _OpenClipReward(ABC):
    """Shared by the open_clip rewards: model, its evaluation transform and tokenizer, batched features."""

    name = "open_clip"
    default_arch = "ViT-L-14"

    def __init__(self, path: str | Path, *, arch: str | Path | None = None, device: str | torch.device | None = None,
                 batch_size: int = 32) -> None:
        import open_clip

        arch = open_clip_arch(arch or self.default_arch, what=self.name)
        self.device = _device(device)
        self.model = open_clip_model(arch, path, what=self.name).to(self.device).requires_grad_(False)
        self.preprocess = open_clip.image_transform(self.model.visual.image_size, is_train=False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.batch_size = batch_size

    def image_features(self, images: Tensor) -> Tensor:
        pixels = torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device)
        with _autocast(self.device):
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        with _autocast(self.device):
            return F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)

    differentiable = True

    def score_with_gradient(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) scores on the model's device, differentiable in ``images``: open_clip's evaluation transform as
        tensor ops (:func:`tensor_preprocess`), the text side without gradients."""
        import open_clip

        size = self.model.visual.image_size
        crop = (size, size) if isinstance(size, int) else tuple(size)
        pixels = tensor_preprocess(images.to(self.device), min(crop), crop, open_clip.OPENAI_DATASET_MEAN,
                                   open_clip.OPENAI_DATASET_STD)
        with _autocast(self.device):
            image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        with torch.no_grad():
            text_features = self.text_features(prompts)
        return self.score(image_features, text_features)

    @abstractmethod
    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """(N,) scores from L2-normalised (N, D) image and text features."""

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.cat([self.score(self.image_features(images[c]), self.text_features(prompts[c])).cpu()
                          for c in _batches(len(prompts), self.batch_size)])


class HPSv2(_OpenClipReward):
    """HPS v2 or v2.1 from its checkpoint file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``)."""

    name = "hps_v2"
    description = ("HPS v2: human preference for the image given its prompt (a CLIP-H similarity trained on HPD "
                   "choices, about 0.2-0.35); higher is better.")
    default_arch = "ViT-H-14"

    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return (image_features * text_features).sum(dim=-1)


class ClipScore(_OpenClipReward):
    """CLIP score, 100 * max(cos, 0), with any open_clip checkpoint (``arch`` names its architecture, ViT-L-14 by
    default: LAION's weights; OpenAI's need ``arch=ViT-L-14-quickgelu``)."""

    name = "clip_score"
    description = "CLIP score: how well the image matches its prompt, 100 x cosine similarity; higher is better."

    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return 100 * (image_features * text_features).sum(dim=-1).clamp(min=0)


def mlp_head(embed_dim: int = 768) -> nn.Sequential:
    """The 5-layer MLP of the LAION aesthetic predictor v2 and of ImageReward (``layers.0`` ... ``layers.7``
    in their checkpoints; linear layers with dropout, no activations, as published)."""
    return nn.Sequential(nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class Aesthetic(_OpenClipReward):
    """LAION aesthetic predictor v2: ``path`` is the MLP (``sac+logos+ava1-l14-linearMSE.pth``),
    ``clip`` the CLIP ViT-L/14 checkpoint whose image embeddings it reads."""

    name = "aesthetic"
    description = ("LAION aesthetic score: how beautiful the image looks, whatever the prompt (about 1-10); "
                   "higher is better.")
    default_arch = OPENAI_VIT_L

    def __init__(self, path: str | Path, *, clip: str | Path | None = None, arch: str | Path | None = None,
                 device: str | torch.device | None = None, batch_size: int = 32) -> None:
        if clip is None:
            raise UserError("aesthetic: give clip= the CLIP ViT-L/14 checkpoint file the predictor was trained on")
        super().__init__(clip, arch=arch, device=device, batch_size=batch_size)
        state = {k.removeprefix("layers."): v for k, v in read_state_dict(path, what=self.name).items()}
        self.head = mlp_head(self.model.visual.output_dim).eval().requires_grad_(False)
        load_strict(self.head, state, path=path, what=self.name,
                    expected=f"the aesthetic MLP over {self.model.visual.output_dim}-d CLIP embeddings")
        self.head.to(self.device)

    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return self.head(image_features).squeeze(-1).float()

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        return torch.empty(len(prompts), 0)  # the aesthetic score ignores the prompt
