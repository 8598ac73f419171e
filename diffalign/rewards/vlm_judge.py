"""A vision-language model as the judge: the probability that it answers "Yes" to "Does this figure show
"{prompt}"?" (VQAScore, Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text
Generation", arXiv 2404.01291, Eq. 1).

Any local transformers image-text-to-text model with a chat template serves (LLaVA, Qwen2-VL, InternVL,
...): its processor turns the image and the question into the model's conversation, and the score is
P(answer | image, question), the product over the answer's tokens of their probabilities under teacher
forcing (one token for "Yes" with most tokenizers). The question is VQAScore's default template; both it
and the answer are options. In [0, 1]; higher is better. Batches are padded on the left, so every row's
answer follows its own question directly. On CUDA the model runs in bfloat16, the probabilities in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.rewards.clip_rewards import _batches, _device, to_pil

Tensor = torch.Tensor
QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'


class VLMJudge:
    """VQAScore with a local vision-language model folder (its weights, processor and chat template)."""

    name = "vlm_judge"
    description = ("VLM judge (VQAScore): the probability a vision-language model answers Yes to whether the image "
                   "shows its prompt, in [0, 1]; higher is better.")

    def __init__(self, path: str | Path, *, question: str = QUESTION, answer: str = "Yes",
                 device: str | torch.device | None = None, batch_size: int = 8) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"vlm_judge: {path / 'config.json'} not found; expected the folder of a transformers "
                            "vision-language model (e.g. llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct)")
        if "{prompt}" not in question:
            raise UserError(f"vlm_judge: question={question!r} must contain {{prompt}}, where the prompt goes")
        self.device = _device(device)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if not getattr(self.processor, "chat_template", None):
            raise UserError(f"vlm_judge: the processor in {path} has no chat template, so the question cannot be "
                            "put to the model in its own conversation format")
        self.processor.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model = self.model.eval().to(self.device)
        self.question, self.batch_size = question, batch_size
        self.answer_ids = self.processor.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(self.answer_ids) == 0:
            raise UserError(f"vlm_judge: answer={answer!r} has no tokens")

    def _conversation(self, prompt: str) -> str:
        """The model's own chat text of one question about one image, up to where its answer starts."""
        message = [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": self.question.format(prompt=prompt)}]}]
        return self.processor.apply_chat_template(message, add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        scores = []
        n = len(self.answer_ids)
        for rows in _batches(len(images), self.batch_size):
            texts = [self._conversation(p) for p in prompts[rows]]
            inputs = self.processor(images=to_pil(images[rows]), text=texts, return_tensors="pt", padding=True)
            answer = self.answer_ids.expand(len(texts), n)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            logits = self.model(**inputs).logits[:, -n - 1:-1].float()  # the positions that predict the answer
            log_probs = logits.log_softmax(dim=-1).gather(2, answer.to(self.device)[..., None])[..., 0]
            scores.append(log_probs.sum(dim=1).exp().cpu())
        return torch.cat(scores)
