"""Text-LM target: sequence log-probs, LD-DPO, DPO end to end, and KTO/BCO/NPO on labelled completions, on a
tiny GPT-2 (KTO against TRL's KTOTrainer)."""

import pytest
import torch
from lm_helpers import preference_batch, tiny_gpt2
from trl.trainer.utils import selective_log_softmax
from trl_reference import trl_dpo_loss_from_token_logps, trl_kto_loss

from diffalign import losses
from diffalign.lm import (
    mismatched_completions,
    preference_loss,
    ranked_preference_loss,
    sequence_logps,
    token_logps,
    unpaired_preference_loss,
)


def test_token_logps_match_log_softmax():
    logits = torch.randn(3, 5, 7)
    ids = torch.randint(0, 7, (3, 5))
    expected = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, ids), expected)


def test_sequence_logps_sum_mean_and_ld():
    """Tokens' log-probs fixed by hand: chosen has 3 completion tokens, rejected 1."""
    logits = torch.zeros(2, 5, 4)  # uniform: every token log p = -log 4
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
    lp = -torch.log(torch.tensor(4.0))
    total, lengths = sequence_logps(logits, ids, mask)
    torch.testing.assert_close(total, torch.stack([3 * lp, lp]))
    torch.testing.assert_close(lengths, torch.tensor([3.0, 1.0]))
    mean, _ = sequence_logps(logits, ids, mask, average=True)
    torch.testing.assert_close(mean, torch.stack([lp, lp]))
    # LD-DPO: shared length 1; the chosen's 2 extra tokens count with alpha = 0.5
    ld, _ = sequence_logps(logits, ids, mask, ld_alpha=0.5)
    torch.testing.assert_close(ld, torch.stack([lp + 0.5 * 2 * lp, lp]))


@pytest.mark.parametrize("loss_type,name", [("sigmoid", "dpo"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_loss_on_model_matches_trl(loss_type, name):
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch = preference_batch(4)
    ours, _ = preference_loss(policy, reference, batch, loss=name, beta=0.1)

    with torch.no_grad():
        def trl_token_logps(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:])

        ref_seq = (trl_token_logps(reference) * batch["completion_mask"][:, 1:]).sum(1)
        rc, rr = ref_seq.chunk(2)
        theirs = trl_dpo_loss_from_token_logps(
            loss_type, trl_token_logps(policy), batch["completion_mask"], rc, rr, beta=0.1
        )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_dpo_training_raises_implicit_accuracy():
    torch.manual_seed(0)
    policy, reference = tiny_gpt2(0), tiny_gpt2(0)
    batch = preference_batch(16, seed=1)
    _, before = preference_loss(policy, reference, batch, loss="dpo", beta=0.1)
    assert before["implicit_acc"].item() == pytest.approx(0.5)  # policy == reference: all ties
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(15):
        loss, _ = preference_loss(policy, reference, batch, loss="dpo", beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    loss_after, after = preference_loss(policy, reference, batch, loss="dpo", beta=0.1)
    assert after["implicit_acc"].item() >= 0.9
    assert loss_after.item() < 0.5 < torch.log(torch.tensor(2.0)).item()


def test_lora_policy_uses_disabled_adapters_as_reference():
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(tiny_gpt2(0), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    batch = preference_batch(4)
    loss, metrics = preference_loss(policy, None, batch, loss="dpo", beta=0.1)
    # LoRA starts as the identity (B = 0), so policy == reference: loss log 2, zero rewards
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)))
    assert metrics["rewards/margins"].item() == 0.0


def test_reference_free_loss_needs_no_reference():
    loss, _ = preference_loss(tiny_gpt2(0), None, preference_batch(2), loss="simpo", beta=2.0, average_logps=True)
    assert torch.isfinite(loss)


def test_missing_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="reference model"):
        preference_loss(tiny_gpt2(0), None, preference_batch(2), loss="dpo")


def test_a_ranked_batch_of_two_is_a_pair_batch_and_plackett_luce_of_two_is_dpo():
    """Rank-major rows: K = 2 is exactly preference_loss's chosen-then-rejected layout."""
    policy, reference, batch = tiny_gpt2(0), tiny_gpt2(1), preference_batch(4)
    pair, pair_metrics = preference_loss(policy, reference, batch, loss="dpo", beta=0.5)
    ranked, ranked_metrics = ranked_preference_loss(policy, reference, batch, list_size=2, loss="plackett_luce",
                                                    beta=0.5)
    torch.testing.assert_close(ranked, pair)
    torch.testing.assert_close(ranked_metrics["rewards/margins"], pair_metrics["rewards/margins"])


def test_ranked_lists_of_three_feed_the_listwise_loss_one_row_per_prompt():
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    first, second = preference_batch(2, seed=0), preference_batch(2, seed=1)
    # three completions per prompt, best first, rank-major: block k holds every prompt's k-th completion
    batch = {k: torch.cat([first[k][:2], second[k][2:], first[k][2:]]) for k in first}
    gains = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0]])
    loss, _ = ranked_preference_loss(policy, reference, batch, list_size=3, loss="lambda_dpo", beta=0.5, scores=gains)

    def per_prompt(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        scores, _ = sequence_logps(out.logits, batch["input_ids"], batch["completion_mask"])
        return scores.view(3, 2).T

    with torch.no_grad():
        expected = losses.get("lambda_dpo")(per_prompt(policy), per_prompt(reference), beta=0.5, scores=gains).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the policy is trained through it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_losses_of_the_other_signature_are_pointed_to_the_right_function():
    with pytest.raises(ValueError, match="listwise loss: use ranked_preference_loss"):
        preference_loss(tiny_gpt2(0), tiny_gpt2(1), preference_batch(2), loss="plackett_luce")
    with pytest.raises(ValueError, match="pairwise loss: use preference_loss"):
        ranked_preference_loss(tiny_gpt2(0), tiny_gpt2(1), preference_batch(2), list_size=2, loss="dpo")
    with pytest.raises(ValueError, match="list_size"):
        ranked_preference_loss(tiny_gpt2(0), tiny_gpt2(1), preference_batch(2), list_size=3)


def labelled_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Six completions labelled one by one, unbalanced and interleaved: three counting (desirable) and
    three random ones, from preference_batch's chosen rows 0-3 and rejected rows 4-7."""
    pairs = preference_batch(4, seed=2)
    rows = torch.tensor([0, 5, 6, 1, 7, 2])
    return {k: v[rows] for k, v in pairs.items()}, rows < 4


def _trl_token_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:])


def test_mismatched_completions_are_the_kl_rows_trl_builds():
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    examples = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
                {"prompt_ids": [7, 8], "completion_ids": [9], "label": False},
                {"prompt_ids": [6], "completion_ids": [10, 11, 12], "label": False}]
    completions = [e["completion_ids"] for e in examples]
    for example, kl_completion in zip(examples, completions[-1:] + completions[:-1]):  # TRL's add_kl_completion_ids
        example["KL_completion_ids"] = kl_completion
    theirs = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    ours = mismatched_completions({k: theirs[k] for k in ("input_ids", "attention_mask", "completion_mask")})
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[f"KL_{key}"]), key


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
def test_unpaired_losses_on_labelled_completions_match_trl(loss):
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch, labels = labelled_batch()
    kl_batch = mismatched_completions(batch)
    weights = {"desirable_weight": 1.3, "undesirable_weight": 0.8}
    ours, metrics = unpaired_preference_loss(policy, reference, batch, labels=labels, loss=loss, beta=0.5,
                                             kl_batch=kl_batch, **weights)
    assert loss != "kto" or metrics["kl"] > 0.2  # KTO's reference point is not clamped to 0, so it matters here
    with torch.no_grad():
        ref = (_trl_token_logps(reference, batch) * batch["completion_mask"][:, 1:]).sum(1)
        ref_kl = (_trl_token_logps(reference, kl_batch) * kl_batch["completion_mask"][:, 1:]).sum(1)
        theirs = trl_kto_loss(_trl_token_logps(policy, batch), batch["completion_mask"], labels, ref,
                              _trl_token_logps(policy, kl_batch), kl_batch["completion_mask"], ref_kl, beta=0.5,
                              loss_type=loss, **weights)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_without_a_kl_batch_kto_takes_its_reference_point_from_the_rows_as_on_diffusion():
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch, labels = labelled_batch()
    _, own = unpaired_preference_loss(policy, reference, batch, labels=labels, loss="kto", beta=0.5)
    r = _log_ratios(policy, reference, batch)
    torch.testing.assert_close(own["kl"], r.mean().clamp(min=0))
    torch.testing.assert_close(own["rewards/chosen"], 0.5 * r[labels].mean())
    # on several processes the estimate is the global batch's: here a stand-in second process whose mean is 1
    _, shared = unpaired_preference_loss(policy, reference, batch, labels=labels, loss="kto", beta=0.5,
                                         mean_over_processes=lambda value: (value + 1.0) / 2)
    torch.testing.assert_close(shared["kl"], ((r.mean() + 1.0) / 2).clamp(min=0))


def _log_ratios(policy, reference, batch):
    """log pi_policy - log pi_ref of each row's completion, by sequence_logps."""
    with torch.no_grad():
        scores = [sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["input_ids"], batch["completion_mask"])[0] for model in (policy, reference)]
    return scores[0] - scores[1]


def test_bco_keeps_its_running_shift_and_npo_scores_only_the_undesirable_completions():
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch, labels = labelled_batch()
    r = _log_ratios(policy, reference, batch)
    shift = losses.RewardShift()
    shift.update(torch.tensor([0.25]))  # an earlier batch's mean reward
    loss, metrics = unpaired_preference_loss(policy, reference, batch, labels=labels, loss="bco", beta=0.5,
                                             reward_shift=shift)
    delta = (0.25 + 0.5 * r.mean()) / 2
    assert shift.count == 2 and metrics["delta"].item() == pytest.approx(delta.item(), abs=1e-6)
    by_hand = torch.cat([-torch.nn.functional.logsigmoid(0.5 * r[labels] - delta),
                         -torch.nn.functional.logsigmoid(-(0.5 * r[~labels] - delta))]).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-6, rtol=1e-5)

    loss, metrics = unpaired_preference_loss(policy, reference, batch, labels=labels, loss="npo", beta=0.5)
    torch.testing.assert_close(loss, (-(2 / 0.5) * torch.nn.functional.logsigmoid(-0.5 * r[~labels])).mean(),
                               atol=1e-6, rtol=1e-5)


def test_kto_training_raises_the_desirable_completions_reward_above_the_others():
    torch.manual_seed(0)
    policy, reference = tiny_gpt2(0), tiny_gpt2(0)
    batch, labels = labelled_batch()
    kl_batch = mismatched_completions(batch)
    first, _ = unpaired_preference_loss(policy, reference, batch, labels=labels, beta=0.1, kl_batch=kl_batch)
    assert first.item() == pytest.approx(0.5)  # policy == reference: every value is 1 - sigma(0)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(15):
        loss, metrics = unpaired_preference_loss(policy, reference, batch, labels=labels, beta=0.1, kl_batch=kl_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    loss, metrics = unpaired_preference_loss(policy, reference, batch, labels=labels, beta=0.1, kl_batch=kl_batch)
    assert loss.item() < 0.45 and metrics["rewards/chosen"] > 0 > metrics["rewards/rejected"]


def test_unpaired_loss_refuses_other_losses_and_misshapen_labels():
    batch, labels = labelled_batch()
    with pytest.raises(ValueError, match="pairwise loss: use preference_loss"):
        unpaired_preference_loss(tiny_gpt2(0), tiny_gpt2(1), batch, labels=labels, loss="dpo")
    with pytest.raises(ValueError, match="one flag per row"):
        unpaired_preference_loss(tiny_gpt2(0), tiny_gpt2(1), batch, labels=labels[:4])


def test_sampling_says_no_false_attention_mask_warning(capsys):
    """transformers drops the all-ones mask we pass and then reads the pad tokens it appends to finished
    sequences as padding; that warning is filtered while diffalign generates, and only that one."""
    import logging

    from transformers.utils import logging as hf_logging

    from diffalign.lm.loading import load_trained_lm
    from diffalign.lm.sampling import sample_completions
    from diffalign.toy.text_model import TOY_LM

    hf_logging.get_logger("transformers.modeling_utils").warning_once.cache_clear()  # said once per process
    model, tokenizer = load_trained_lm(TOY_LM)
    completions = sample_completions(model, tokenizer, ["describe the red fox :"] * 8, seed=0, max_new_tokens=12,
                                     progress="sampling the test's completions")
    err = capsys.readouterr().err
    assert len(completions) == 8 and "sampling the test's completions" in err
    assert "attention_mask" not in err
    logger = logging.getLogger("transformers.modeling_utils")
    assert not logger.filters  # the filter is gone after sampling
