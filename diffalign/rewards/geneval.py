"""The GenEval reward (Ghosh et al. 2023): does the image show the objects, counts, colours and positions its prompt
asks for, judged by :mod:`diffalign.rewards.geneval_rules` on what two local models see.

- **Objects**: a Mask2Former COCO instance segmenter through transformers (``path``: a folder holding
  ``Mask2FormerForUniversalSegmentation`` and its image processor, e.g. ``facebook/mask2former-swin-small-coco-instance``,
  the Swin-S model GenEval runs through mmdetection; the transformers port comes from the Mask2Former authors'
  release, so a score can differ slightly from GenEval's own). Every query's mask is kept with its score (class
  probability times mean mask probability, as both implementations compute it) and its box is the mask's extent, as
  mmdetection's ``mask2bbox`` draws it (right and bottom edges one past the last pixel).
- **Colours**: open_clip's ViT-L-14 with OpenAI's weights (``clip``: the checkpoint file, e.g.
  ``open_clip_pytorch_model.bin`` of ``timm/vit_large_patch14_clip_224.openai``; built with QuickGELU, as OpenAI
  trained it; ``arch`` another architecture for tests), as zero-shot classifiers over GenEval's ten colours with its three templates ("a photo of
  a {colour} {object}", "a photo of a {colour}-colored {object}", "a photo of a {colour} object"; each template's
  text embedding normalised, averaged, normalised again, as CLIP_benchmark builds them), read on each object's
  crop with everything outside its mask painted grey (#999).
- **Metadata**: GenEval judges a prompt by its metadata, looked up by the prompt's text: by default in the 553
  prompts GenEval publishes (``assets/prompts/geneval.jsonl``, MIT licence, also the prompt set ``geneval``), or in
  ``metadata=FILE.jsonl`` of the same layout (Flow-GRPO's ``dataset/geneval/train_metadata.jsonl``, say, which is
  also a prompt file for ``online.prompts``). A prompt it has no metadata for is an error.

``rule`` chooses the score (see :mod:`diffalign.rewards.geneval_rules`): ``official`` (1 if GenEval counts the image
correct, else 0; the default), ``strict`` (Flow-GRPO's exact-count 0/1) or ``partial`` (Flow-GRPO's partial credit,
the reward its GenEval runs train on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.errors import UserError
from diffalign.paths import PROMPTS
from diffalign.rewards.clip_rewards import (OPENAI_VIT_L, _autocast, _batches, _device, open_clip_arch, open_clip_model,
                                           to_pil)
from diffalign.rewards.geneval_rules import (CLASSES, COLORS, RULES, Detection, Verdict, check_metadata, judge,
                                             keep_detections, score)

METADATA = PROMPTS / "geneval.jsonl"
COLOUR_TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
BACKGROUND = "#999"  # what GenEval paints outside an object's mask before reading its colour
INSTALL = "pip install 'diffalign[geneval]'  (scipy, which transformers' Mask2Former needs)"


def read_metadata(path: str | Path) -> dict[str, dict[str, Any]]:
    """Each prompt's GenEval metadata from a ``.jsonl`` file of one object per line, keyed by the prompt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"geneval: metadata file {path} does not exist")
    table: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            metadata = check_metadata(row, f"{path}:{number}")
            table[metadata["prompt"]] = metadata
    if not table:
        raise UserError(f"geneval: {path} holds no metadata")
    return table


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, 4) boxes x1, y1, x2, y2 around (K, H, W) boolean masks, the right and bottom edges one past the last
    pixel (mmdetection's ``mask2bbox``); zeros for an empty mask."""
    from torchvision.ops import masks_to_boxes

    boxes = torch.zeros(len(masks), 4)
    filled = masks.flatten(1).any(dim=1)
    if filled.any():
        boxes[filled] = masks_to_boxes(masks[filled]).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


class InstanceDetector:
    """A COCO instance segmenter (Mask2Former through transformers) that lists every object it finds by class."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        try:
            import scipy  # noqa: F401 - transformers' Mask2Former builds its training loss with scipy
        except ImportError as error:
            raise UserError(f"the geneval reward needs scipy: {INSTALL}") from error
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        path = Path(path)
        for name, what in (("config.json", "a Mask2Former config"), ("preprocessor_config.json", "its image processor")):
            if not (path / name).is_file():
                raise UserError(f"geneval: {path / name} not found; expected {what} there (the folder of "
                                "facebook/mask2former-swin-small-coco-instance, say)")
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path, local_files_only=True).eval().to(device)
        if self.model.config.num_labels != len(CLASSES):
            raise UserError(f"geneval: {path} predicts {self.model.config.num_labels} classes; GenEval reads the "
                            f"{len(CLASSES)} COCO classes (a COCO instance-segmentation checkpoint)")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, list[Detection]]]:
        images = list(images)
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width) for image in images],
            return_binary_maps=True)
        found = []
        for result in results:
            by_class: dict[str, list[Detection]] = {}
            segments = result["segments_info"]
            if segments:
                masks = result["segmentation"].bool().cpu()
                for segment, mask, box in zip(segments, masks, mask_boxes(masks)):
                    by_class.setdefault(CLASSES[segment["label_id"]], []).append(
                        Detection(tuple(box.tolist()), float(segment["score"]), mask.numpy()))
            found.append(by_class)
        return found


class ColourClassifier:
    """GenEval's colour reading: open_clip zero-shot classifiers over :data:`COLORS`, one per object class."""

    def __init__(self, checkpoint: str | Path, arch: str | Path, device: torch.device) -> None:
        import open_clip

        name = open_clip_arch(arch, what="geneval")
        self.model = open_clip_model(name, checkpoint, what="geneval").to(device)
        self.preprocess = open_clip.image_transform(self.model.visual.image_size, is_train=False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self._classifiers: dict[str, torch.Tensor] = {}

    def classifier(self, name: str) -> torch.Tensor:
        """(D, len(COLORS)): each colour's mean normalised template embedding for objects of class ``name``."""
        if name not in self._classifiers:
            weights = []
            for colour in COLORS:
                texts = [template.format(c=colour, name=name) for template in COLOUR_TEMPLATES]
                with _autocast(self.device):
                    embedded = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                weights.append(F.normalize(F.normalize(embedded, dim=-1).mean(dim=0), dim=0))
            self._classifiers[name] = torch.stack(weights, dim=1)
        return self._classifiers[name]

    def crop(self, image: Image.Image, detection: Detection) -> Image.Image:
        """The object alone: its mask over a grey background, cropped to its box."""
        if detection.mask is not None:
            image = Image.composite(image, Image.new("RGB", image.size, BACKGROUND),
                                    Image.fromarray(detection.mask.astype("uint8") * 255))
        return image.crop(detection.box)

    @torch.no_grad()
    def __call__(self, image: Image.Image, name: str, detections: Sequence[Detection]) -> list[str]:
        pixels = torch.stack([self.preprocess(self.crop(image, d)) for d in detections]).to(self.device)
        with _autocast(self.device):
            features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return [COLORS[i] for i in (features @ self.classifier(name)).argmax(dim=1).tolist()]


class GenEval:
    """GenEval as a reward: 1 or 0 per image by GenEval's rule, or Flow-GRPO's strict or partial score."""

    name = "geneval"
    description = ("GenEval: whether the image shows the objects, counts, colours and positions its prompt asks "
                   "for (Mask2Former detections, CLIP colours), 1 or 0 per image; higher is better.")

    def __init__(self, path: str | Path, *, clip: str | Path | None = None, arch: str | Path = OPENAI_VIT_L,
                 metadata: str | Path = METADATA, rule: str = "official", device: str | torch.device | None = None,
                 batch_size: int = 16) -> None:
        if rule not in RULES:
            raise UserError(f"geneval: rule {rule!r} is not one of {', '.join(RULES)}")
        if clip is None:
            raise UserError("geneval: give clip= the CLIP ViT-L/14 checkpoint file (OpenAI's weights) that reads "
                            "colours")
        self.rule = rule
        self.metadata = read_metadata(metadata)
        self.metadata_source = Path(metadata)
        self.device = _device(device)
        self.detector = InstanceDetector(path, self.device)
        self.colours = ColourClassifier(clip, arch, self.device)
        self.batch_size = batch_size

    def metadata_of(self, prompt: str) -> dict[str, Any]:
        """The metadata GenEval judges ``prompt`` by; an error for a prompt it has none for."""
        if prompt not in self.metadata:
            raise UserError(f"geneval has no metadata for the prompt {prompt!r}: it scores the prompts of "
                            f"{self.metadata_source} ({len(self.metadata)} of them; the prompt set geneval is "
                            "GenEval's own), or give metadata=FILE.jsonl with one line per prompt")
        return self.metadata[prompt]

    def verdicts(self, images: torch.Tensor, prompts: Sequence[str]) -> list[Verdict]:
        """Each image's verdict under this reward's rule (its reasons say what failed)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        metadata = [self.metadata_of(p) for p in prompts]  # every prompt checked before any image is read
        verdicts = []
        for chunk in _batches(len(prompts), self.batch_size):
            pictures = to_pil(images[chunk])
            for picture, found, meta in zip(pictures, self.detector(pictures), metadata[chunk]):
                detected = keep_detections(found, meta["tag"])
                verdicts.append(judge(detected, meta, lambda name, objects: self.colours(picture, name, objects),
                                      self.rule))
        return verdicts

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([score(v, self.rule) for v in self.verdicts(images, prompts)])
