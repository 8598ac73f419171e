"""Sequence packing: the packed layout by hand, scores and gradients equal to the padded batch's on GPT-2 and
a Llama-family LM, and an LM run that trains the same losses packed as padded, on less padding."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lm_helpers import lm_config, logged, tiny_gpt2
from transformers import Qwen2Config, Qwen2ForCausalLM

from diffalign.errors import UserError
from diffalign.lm import completion_logps, preference_loss
from diffalign.lm.packing import pack, padding_share
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.toy import text_world as tw
from diffalign.train import load_config, train


def _batch(lengths: list[int], width: int | None = None) -> dict[str, torch.Tensor]:
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for n, length in enumerate(lengths):
        ids[n, :length] = 10 * (n + 1) + torch.arange(length)
        attention[n, :length] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": attention.clone()}


def test_the_sequences_go_longest_first_into_the_first_row_with_room():
    """Lengths 6, 2, 4, 3, 1 into rows of 6: [6], [4, 2], [3, 1] (first fit, longest first)."""
    batch = _batch([6, 2, 4, 3, 1])
    packed = pack(batch, pad_token_id=0)
    ids, positions = packed["packed_input_ids"], packed["packed_position_ids"]
    assert ids.tolist() == [[10, 11, 12, 13, 14, 15], [30, 31, 32, 33, 20, 21], [40, 41, 42, 50, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    # every token of every sequence is found again through the index
    flat = ids.reshape(-1)
    for n in range(5):
        length = int(batch["attention_mask"][n].sum())
        assert torch.equal(flat[packed["packed_index"][n, :length]], batch["input_ids"][n, :length])
    mask = packed["packed_attention_mask"][1, 0]  # row [30..33 | 20, 21]: causal within each block only
    assert mask[5].tolist() == [False, False, False, False, True, True]
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert padding_share(batch) == pytest.approx(1 - 16 / 30) and padding_share({**batch, **packed}) == pytest.approx(
        1 - 16 / 18)


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_qwen2], ids=["gpt2", "qwen2"])
def test_packed_scores_and_gradients_are_the_padded_batchs(make):
    model = make()
    g = torch.Generator().manual_seed(0)
    batch = _batch([14, 3, 6, 9, 4, 12, 5, 2])  # 4 pairs: chosen rows, then rejected ones
    batch["input_ids"] = torch.randint(1, 32, batch["input_ids"].shape, generator=g) * batch["attention_mask"]
    batch["completion_mask"][:, :2] = 0  # a 2-token prompt
    packed = {**batch, **pack(batch, pad_token_id=0)}
    assert packed["packed_input_ids"].shape[0] < batch["input_ids"].shape[0]
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, packed)[0], completion_logps(model, batch)[0],
                                   rtol=1e-5, atol=1e-5)
    reference = make()
    grads = []
    for inputs in (batch, packed):
        model.zero_grad()
        loss, _ = preference_loss(model, reference, inputs, loss="ipo", beta=0.1)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _uneven_pairs(path, n: int = 8):
    """Pairs of one- or two-sentence chosen completions and a short rejected one: lengths vary two-fold (the toy
    LM takes 24 positions)."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        prompt = tw.prompts("train")[i]
        colour, animal = tw.parse_prompt(prompt)
        rows["prompt"].append(prompt)
        rows["chosen"].append(" ".join([tw.sentence(colour, animal, "joyful", "runs", "slowly")] * (1 + i % 2)))
        rows["rejected"].append(f"the {colour} {animal} is angry .")
    pq.write_table(pa.table(rows), path)
    return path


def test_an_lm_run_trains_the_same_losses_packed_on_less_padding(tmp_path):
    path = _uneven_pairs(tmp_path / "pairs.parquet")
    for name, packing in (("padded", "false"), ("packed", "true")):
        train(lm_config(tmp_path, path, f"data.packing={packing}", "objective.loss=ipo", name=name))
    assert logged(tmp_path / "padded")[0] == pytest.approx(logged(tmp_path / "packed")[0], rel=1e-6)
    for a, b in zip(logged(tmp_path / "padded"), logged(tmp_path / "packed")):
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)
    padded, packed = logged(tmp_path / "padded", "padding_share"), logged(tmp_path / "packed", "padding_share")
    assert all(p < q for p, q in zip(packed, padded)) and max(padded) > 0.2


def test_packing_is_refused_for_diffusion():
    with pytest.raises(UserError, match="data.packing packs a language model's token sequences"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.path={TOY_BASE}", "data.path=x", "data.packing=true"])
