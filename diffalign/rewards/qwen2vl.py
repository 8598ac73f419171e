"""What the Qwen2-VL reward models (HPSv3, VideoAlign's VideoReward) share: both subclass transformers 4.45's
``Qwen2VLForConditionalGeneration`` with a reward head (``Qwen2VLRewardModelBT``), save their checkpoints under that
version's names, and run the language model on the vision-filled embeddings without position ids, which transformers
4.45's text model then counts in order (0..L-1 on each of M-RoPE's three axes) instead of computing Qwen2-VL's
image-aware rope index."""

from __future__ import annotations

import re

import torch

Tensor = torch.Tensor


def current_name(key: str) -> str:
    """A transformers 4.45 ``Qwen2VLForConditionalGeneration`` tensor name under today's (``model.*`` the language
    model -> ``model.language_model.*``, ``visual.*`` -> ``model.visual.*``; ``lm_head`` stays)."""
    return re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", key))


def current_names(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the Qwen2-VL model's tensors under today's transformers names, the reward head's ``rm_head.*`` tensors) from a
    checkpoint in transformers 4.45's layout."""
    model, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        else:
            model[current_name(key)] = value
    return model, head


def in_order_hidden_states(model, inputs: dict[str, Tensor]) -> Tensor:
    """The last hidden states (N, L, D) of ``model`` (a ``Qwen2VLModel``) on ``inputs`` from its processor: the token
    embeddings with the image's or the video's features put at their placeholder tokens, then the language model with
    in-order position ids, as the authors' forward runs it."""
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    for pixels, grid, features, token in (
            ("pixel_values", "image_grid_thw", model.get_image_features, model.config.image_token_id),
            ("pixel_values_videos", "video_grid_thw", model.get_video_features, model.config.video_token_id)):
        if pixels in inputs:
            found = features(inputs[pixels].to(embeds.dtype), inputs[grid])
            found = torch.cat(list(getattr(found, "pooler_output", found)))
            embeds = embeds.masked_scatter((ids == token)[..., None], found.to(embeds))
    positions = torch.arange(ids.shape[1], device=ids.device).expand(3, *ids.shape)
    return model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                position_ids=positions).last_hidden_state
