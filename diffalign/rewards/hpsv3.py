"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score", arXiv 2508.03789): Qwen2-VL-7B
reading the image and an instruction that quotes the prompt, scored at a special ``<|Reward|>`` token by a small MLP.

Read from the authors' package (``hpsv3`` 1.0.0 on PyPI, MIT; it pins transformers 4.45, so it is not a dependency
here): ``hpsv3/model/qwen2vl_trainer.py`` (``Qwen2VLRewardModelBT``), ``hpsv3/inference.py``
(``HPSv3RewardInferencer``), ``hpsv3/dataset/data_collator_qwen.py`` (the instruction) and
``hpsv3/config/HPSv3_7B.yaml``:

- the tokenizer of Qwen2-VL-7B-Instruct with ``<|Reward|>`` added as a special token, the embeddings resized to it;
- one user turn: the image (resized so that it holds 256 x 28 x 28 pixels: ``min_pixels = max_pixels = 200704``,
  Qwen's ``smart_resize`` to multiples of 28), then ``INSTRUCTION.format(text_prompt=prompt)`` followed by
  "Please provide the overall ratings of this image: <|Reward|>" and "END", with the generation prompt added;
- the language model run on the image-filled embeddings with position ids 0..L-1 on each of M-RoPE's three axes
  (their forward passes no position ids, and transformers 4.45's text model then counts the tokens in order; it
  does not compute Qwen2-VL's image-aware rope index);
- the last hidden state at ``<|Reward|>`` through ``rm_head`` (their default "ranknet" head: Linear(hidden, 1024),
  ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)) in float32: (mu, sigma) of the score; the reward is
  mu, as their README uses it. Higher is better; about 0-15 on real images.

The checkpoint (``MizzenAI/HPSv3``, ``HPSv3.safetensors``) holds the whole model under transformers 4.45's names
(``model.*`` the language model, ``visual.*`` the vision tower, ``rm_head.*``); they are renamed to today's
(``model.language_model.*``, ``model.visual.*``) and loaded strictly (:mod:`diffalign.rewards.qwen2vl`). The image is resized by the processor's own
``smart_resize`` (theirs resizes with PIL first, to the same size, so the two differ only by resampling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from diffalign.errors import UserError
from diffalign.rewards.checkpoints import read_state_dict
from diffalign.rewards.clip_rewards import _batches, _device, to_pil
from diffalign.rewards.qwen2vl import current_names, in_order_hidden_states

Tensor = torch.Tensor
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # HPSv3_7B.yaml: min_pixels = max_pixels
INSTRUCTION = "\n".join([  # line by line: two lines end in a space, which the model was trained with
    '',
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. ',
    '',
    '**Visual Quality:**  ',
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:',
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.',
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.',
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).',
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.',
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ',
    '',
    '**Text Alignment:**  ',
    'Assess how well the image matches the textual prompt across the following sub-dimensions:',
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.',
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.',
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.',
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.',
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.',
    'Textual prompt - {text_prompt}',
    '',
    '',
    '',
])
RATING = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def reward_head(hidden: int) -> nn.Sequential:
    """HPSv3's ``rm_head`` ("ranknet" with no ``rm_head_kwargs``): hidden -> 1024 -> 16 -> (mu, sigma)."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


class HPSv3:
    """HPSv3 from its checkpoint file and the folder of Qwen2-VL-7B-Instruct's configs and processor (``base=``)."""

    name = "hps_v3"
    description = ("HPSv3: a Qwen2-VL-7B preference model trained on 1.08M text-image pairs and 1.17M human "
                   "comparisons, scored at its <|Reward|> token (the mean of its score); higher is better.")

    def __init__(self, path: str | Path, *, base: str | Path, device: str | torch.device | None = None,
                 batch_size: int = 8) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

        base = Path(base)
        if not (base / "config.json").is_file():
            raise UserError(f"hps_v3: base={base} holds no config.json; give the folder of Qwen/Qwen2-VL-7B-Instruct "
                            "(its configs and processor; the weights come from the HPSv3 checkpoint)")
        self.device, self.batch_size = _device(device), batch_size
        processor = AutoProcessor.from_pretrained(base, local_files_only=True, padding_side="right",
                                                  min_pixels=PIXELS, max_pixels=PIXELS)
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.processor, self.reward_id = processor, processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        config = Qwen2VLConfig.from_pretrained(base, local_files_only=True)
        with init_empty_weights(include_buffers=False):  # the weights come from the checkpoint; buffers are built
            model = Qwen2VLForConditionalGeneration(config)
            model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
            head = reward_head(config.text_config.hidden_size)
        weights, head_weights = current_names(read_state_dict(path, what="hps_v3"))
        try:
            model.load_state_dict(weights, strict=True, assign=True)
            head.load_state_dict(head_weights, strict=True, assign=True)
        except RuntimeError as err:
            raise UserError(f"hps_v3: {path} is not an HPSv3 checkpoint for the Qwen2-VL in {base}: {err}") from None
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.model.to(self.device, dtype).eval()  # the language model and vision tower; no LM head
        self.head = head.to(self.device, torch.float32).eval()

    def _conversation(self, prompt: str) -> str:
        message = [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + RATING}]}]
        return self.processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        scores = []
        for rows in _batches(len(images), self.batch_size):
            inputs = self.processor(images=to_pil(images[rows]), text=[self._conversation(p) for p in prompts[rows]],
                                    return_tensors="pt", padding=True).to(self.device)
            ids = inputs["input_ids"]
            at_reward = ids == self.reward_id
            if not at_reward.sum(dim=1).eq(1).all():
                raise UserError(f"hps_v3: a prompt holds {REWARD_TOKEN} itself or was cut short: {prompts[rows]}")
            hidden = in_order_hidden_states(self.model, inputs)
            scores.append(self.head(hidden[at_reward].float())[:, 0].cpu())
        return torch.cat(scores)
