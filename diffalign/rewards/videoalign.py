"""VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback", arXiv 2501.13918): a
Qwen2-VL-2B that watches a clip and reads an instruction quoting its prompt, scored at three special tokens for visual
quality (VQ), motion quality (MQ) and text alignment (TA); the reward DanceGRPO and Flow-Factory train video models
on (DanceGRPO #98 asks for it).

Read from the authors' code (github.com/KwaiVGI/VideoAlign, Apache-2.0): ``inference.py``
(``VideoVLMRewardInference``), ``trainer.py`` (``Qwen2VLRewardModelBT``), ``train_reward.py``
(``create_model_and_processor``), ``utils.py`` (``load_model_from_checkpoint``), ``vision_process.py`` (their copy of
qwen-vl-utils) and ``prompt_template.py``; the released model is ``KwaiVGI/VideoReward``:

- the folder holds ``model_config.json`` (the data, model, LoRA and inference settings it was trained and is scored
  with) and ``checkpoint-N/`` folders, the largest N read: either ``model.pth`` (the whole model) or, as released, a
  LoRA of the language model (``adapter_model.safetensors`` with its ``adapter_config.json``) and the tensors trained
  in full (``non_lora_state_dict.pth``: the vision tower, the new tokens' embeddings, the head) over the base model of
  ``model_config.model_name_or_path`` (Qwen/Qwen2-VL-2B-Instruct; ``base=`` another folder). The LoRA is merged into
  the base weights (W + alpha / r B A);
- the processor of the base with ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` added, right padding;
- the clip's frames: ``data_config.num_frames`` of them, or as many as ``data_config.fps`` gives for the clip's length
  at its own rate (``clip_fps``, diffalign's 16 unless said; at least 4, an even number, at most the clip's frames),
  spread evenly (``sample_type`` uniform), each resized bicubically (antialiased, on 8-bit frames) so that it holds
  between 128 x 28 x 28 and ``data_config.max_frame_pixels`` pixels in multiples of 28 (qwen-vl-utils'
  ``smart_resize``), then given to the processor as frames in 0-255 with ``do_rescale``;
- one user turn: the video, then the instruction (``detailed_special``: :data:`TEMPLATE`) with the prompt; the
  generation prompt added;
- the language model on the video-filled embeddings with in-order position ids (:mod:`diffalign.rewards.qwen2vl`), the
  last hidden state at each of the three tokens through ``rm_head`` (Linear(hidden, 3), no bias), each token's own
  output (the diagonal): VQ, MQ and TA, each standardised by ``inference_config``'s mean and standard deviation; the
  reward is their sum (``Overall``, ``dimension=`` one of them alone). Higher is better.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from diffalign.errors import UserError
from diffalign.paths import find_locally, how_to_get
from diffalign.rewards.checkpoints import read_state_dict
from diffalign.rewards.clip_rewards import _batches, _device
from diffalign.rewards.qwen2vl import current_name, current_names, in_order_hidden_states

Tensor = torch.Tensor
DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
PATCH = 28  # qwen-vl-utils' IMAGE_FACTOR: a merged 2 x 2 block of 14-pixel patches
VIDEO_MIN_PIXELS = 128 * PATCH * PATCH
FRAME_FACTOR = 2  # Qwen2-VL's temporal patch: frames come in pairs
MIN_FRAMES, MAX_FRAMES = 4, 768
PEFT_PREFIX = "base_model.model."
# the authors' processor call (frames in 0-255); the frames are sized already, so the processor's own resize, which
# transformers 5 would also cap per frame as qwen-vl-utils does, keeps them as they are
VIDEO_KWARGS = {"do_rescale": True, "cap_pixels_per_frame": False}
TEMPLATE = "\n".join([  # line by line: some lines end in spaces, which the model was trained with
    '',
    'You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.',
    '',
    '**Visual Quality:**  ',
    'Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:',
    '- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.',
    '- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.',
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).',
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.',
    '- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ',
    '',
    'Please provide the ratings of Visual Quality: <|VQ_reward|>',
    'END',
    '',
    '**Motion Quality:**  ',
    'Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:',
    '- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).',
    '- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).',
    '- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.',
    '- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.',
    '- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.',
    '- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.',
    '',
    'Please provide the ratings of Motion Quality: <|MQ_reward|>',
    'END',
    '',
    '**Text Alignment:**  ',
    'Assess how well the video matches the textual prompt across the following sub-dimensions:',
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.',
    '- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.',
    '- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ',
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.',
    '- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.',
    '',
    'Textual prompt - {text_prompt}',
    'Please provide the ratings of Text Alignment: <|TA_reward|>',
    'END',
    '',
])



def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' size for a frame: each side a multiple of 28 near its own, the area within [min, max] pixels."""
    h, w = max(PATCH, round(height / PATCH) * PATCH), max(PATCH, round(width / PATCH) * PATCH)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / PATCH) * PATCH, math.floor(width / beta / PATCH) * PATCH
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / PATCH) * PATCH, math.ceil(width * beta / PATCH) * PATCH
    return h, w


def frame_count(total: int, clip_fps: float, fps: float | None, num_frames: int | None) -> int:
    """How many of a clip's ``total`` frames the model watches (qwen-vl-utils' ``smart_nframes``)."""
    if num_frames is not None:
        count = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        count = round(min(max(total / clip_fps * fps, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    count = min(count, total)
    if count < FRAME_FACTOR:
        raise UserError(f"videoalign watches {FRAME_FACTOR} frames or more of a clip, and these have {total}: train "
                        "a video model with data.frames of 5 or more")
    return count


def watched_frames(clip: Tensor, clip_fps: float, fps: float | None, num_frames: int | None,
                   max_pixels: int) -> Tensor:
    """The frames of one clip (3, F, H, W) in [0, 1] the model watches, (T, 3, h, w) in 0-255: spread evenly over the
    clip, resized as qwen-vl-utils resizes a decoded video's 8-bit frames."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    total, height, width = clip.shape[1:]
    index = torch.linspace(0, total - 1, frame_count(total, clip_fps, fps, num_frames)).round().long()
    frames = (clip[:, index].transpose(0, 1).clamp(0, 1) * 255).round().to(torch.uint8)
    size = smart_resize(height, width, VIDEO_MIN_PIXELS, max_pixels)
    return resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()


def merge_lora(model: nn.Module, adapter: dict[str, Tensor], config: dict) -> None:
    """Add each LoRA pair of a PEFT adapter (saved from the authors' model, transformers 4.45's names) into the weight
    it adapts: W + s B A, s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights = dict(model.named_parameters())
    for key, down in adapter.items():
        if ".lora_A." not in key:
            continue
        name = current_name(key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]) + ".weight"
        up = adapter[key.replace(".lora_A.", ".lora_B.")]
        if name not in weights or weights[name].shape != (up.shape[0], down.shape[1]):
            raise UserError(f"videoalign: the checkpoint is not a VideoReward checkpoint of this base model: its LoRA "
                            f"{key} adapts a {up.shape[0]} x {down.shape[1]} {name}, which the base model does not have")
        with torch.no_grad():
            weights[name].add_((scale * up.float() @ down.float()).to(weights[name].dtype))


class VideoAlign:
    """VideoReward from its folder (``model_config.json`` and ``checkpoint-N/``) and the base Qwen2-VL's (``base=``:
    by default the local copy of the base the config names)."""

    name = "videoalign"
    description = ("VideoAlign's VideoReward: a Qwen2-VL-2B trained on 182k human comparisons of generated videos, "
                   "scoring visual quality, motion quality and text alignment (each standardised); the reward is "
                   "their sum, or one of them; higher is better.")
    reads_clips = True

    def __init__(self, path: str | Path, *, base: str | Path | None = None, dimension: str = "Overall",
                 clip_fps: float = 16.0, fps: float | None = None, normalise: bool = True,
                 device: str | torch.device | None = None, batch_size: int = 2) -> None:
        """``clip_fps``: the frame rate of the clips scored; ``fps``: how many frames a second of them the model
        watches (the authors' ``reward(fps=...)``; by default ``model_config.json``'s, 2). VideoAlign #21: a clip read
        at another rate than its own moves the scores; DanceGRPO's users watch all of a 16 fps clip (DanceGRPO #74)."""
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        folder = Path(path)
        settings = self._settings(folder)
        data, model_config = settings["data_config"], settings["model_config"]
        if dimension not in (*DIMENSIONS, "Overall"):
            raise UserError(f"videoalign: dimension={dimension}; choose Overall, {', '.join(DIMENSIONS)}")
        if data.get("prompt_template_type") not in ("detailed_special", "none") or model_config.get("output_dim") != 3 \
                or model_config.get("reward_token") != "special":
            raise UserError(f"videoalign: {folder / 'model_config.json'} describes a model trained otherwise than "
                            "the released VideoReward (three special reward tokens, output_dim 3, the detailed_special "
                            "or no instruction template); only that form is read")
        base = Path(base) if base is not None else self._base(model_config["model_name_or_path"])
        self.device, self.batch_size, self.dimension = _device(device), batch_size, dimension
        self.clip_fps, self.normalise = float(clip_fps), str(normalise).lower() not in ("false", "0", "no")
        if fps is not None and data.get("num_frames") is not None:
            raise UserError(f"videoalign: fps={fps}, and {folder / 'model_config.json'} watches a fixed "
                            f"{data['num_frames']} frames of each clip")
        self.fps = None if data.get("num_frames") is not None else float(fps if fps is not None else
                                                                          data.get("fps", 2.0))
        self.num_frames = None if data.get("num_frames") is None else int(data["num_frames"])
        self.max_pixels = int(data.get("max_frame_pixels", 240 * 320))
        self.template = data["prompt_template_type"]
        self.stats = settings.get("inference_config")
        processor = AutoProcessor.from_pretrained(base, local_files_only=True, padding_side="right")
        processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        self.processor = processor
        self.token_ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = Qwen2VLForConditionalGeneration.from_pretrained(base, local_files_only=True, torch_dtype=torch.float32)
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
        head = nn.Linear(model.config.text_config.hidden_size, 3, bias=False)
        self._load_checkpoint(model, head, self._checkpoint(folder))
        self.model = model.model.to(self.device, dtype).eval()  # the language model and vision tower; no LM head
        self.head = head.to(self.device, torch.float32).eval()

    @staticmethod
    def _settings(folder: Path) -> dict:
        try:
            return json.loads((folder / "model_config.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"videoalign: {folder} holds no readable model_config.json ({err}); give the folder of "
                            "KwaiVGI/VideoReward") from None

    @staticmethod
    def _base(name: str) -> Path:
        found = find_locally(name)
        if found is None:
            raise UserError(f"videoalign: its base model {name} is not on this machine (give base= its folder). "
                            f"{how_to_get(name)}.")
        return found

    @staticmethod
    def _checkpoint(folder: Path) -> Path:
        steps = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if
                       p.name.split("-")[-1].isdigit() else -1)
        if not steps:
            raise UserError(f"videoalign: {folder} holds no checkpoint-N folder")
        return steps[-1]

    @staticmethod
    def _load_checkpoint(model: nn.Module, head: nn.Linear, checkpoint: Path) -> None:
        """The whole model (``model.pth``), or the LoRA and the tensors trained in full over the base weights."""
        full = checkpoint / "model.pth"
        if full.is_file():
            state = read_state_dict(full, what="videoalign")
        else:
            state = {k.removeprefix(PEFT_PREFIX): v
                     for k, v in read_state_dict(checkpoint / "non_lora_state_dict.pth", what="videoalign").items()}
            adapter_file = checkpoint / "adapter_model.safetensors"
            if not adapter_file.is_file():
                raise UserError(f"videoalign: {checkpoint} holds neither model.pth nor adapter_model.safetensors")
            merge_lora(model, load_file(str(adapter_file)),
                       json.loads((checkpoint / "adapter_config.json").read_text()))
        weights, head_weights = current_names(state)
        try:
            head.load_state_dict(head_weights, strict=True)
            result = model.load_state_dict(weights, strict=full.is_file())
        except RuntimeError as err:
            raise UserError(f"videoalign: {checkpoint} is not a VideoReward checkpoint of this base model: {err}") \
                from None
        if not full.is_file() and result.unexpected_keys:
            raise UserError(f"videoalign: {checkpoint} holds tensors the base model does not have: "
                            f"{result.unexpected_keys[:5]}")

    def instruction(self, prompt: str) -> str:
        """The text after the video: the prompt in the instruction the model was trained with."""
        return TEMPLATE.format(text_prompt=prompt) if self.template == "detailed_special" else prompt

    def _conversation(self, prompt: str) -> str:
        message = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": self.instruction(prompt)}]}]
        return self.processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def dimensions(self, clips: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N, 3) VQ, MQ and TA of clips (N, 3, F, H, W) in [0, 1], standardised unless ``normalise`` is off."""
        if clips.dim() != 5:
            raise UserError("videoalign scores clips: train a video model with data.frames of 5 or more")
        scores = []
        for rows in _batches(len(clips), self.batch_size):
            videos = [watched_frames(clip, self.clip_fps, self.fps, self.num_frames, self.max_pixels)
                      for clip in clips[rows]]
            inputs = self.processor(text=[self._conversation(p) for p in prompts[rows]], videos=videos,
                                    padding=True, return_tensors="pt", videos_kwargs=VIDEO_KWARGS)
            inputs = inputs.to(self.device)
            ids = inputs["input_ids"]
            at = torch.stack([ids == token for token in self.token_ids], dim=1)  # (n, 3, L)
            if not at.sum(dim=2).eq(1).all():
                raise UserError(f"videoalign: a prompt holds a reward token itself or was cut short: {prompts[rows]}")
            hidden = in_order_hidden_states(self.model, inputs)
            picked = torch.stack([hidden[at[:, d]] for d in range(3)], dim=1)  # (n, 3, D): each dimension's token
            scores.append(self.head(picked.float()).diagonal(dim1=1, dim2=2).cpu())
        out = torch.cat(scores)
        if self.normalise and self.stats:
            mean = torch.tensor([self.stats[f"{d}_mean"] for d in DIMENSIONS])
            std = torch.tensor([self.stats[f"{d}_std"] for d in DIMENSIONS])
            out = (out - mean) / std
        return out

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        scores = self.dimensions(images, prompts)
        return scores.sum(dim=1) if self.dimension == "Overall" else scores[:, DIMENSIONS.index(self.dimension)]
