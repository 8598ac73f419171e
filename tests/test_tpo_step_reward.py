"""TPO's Adaptive Step Reward (Liao et al. 2024): step numbers from the text, the step weights and scores against the
authors' loops (``loss.py``: compute_step_weights, compute_weighted_logits) written out here, the loss on a model, the
gradient through the weights, and a toy config that trains with it."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from lm_helpers import tiny_gpt2
from transformers import AutoTokenizer

from diffalign import losses
from diffalign.errors import UserError
from diffalign.lm import ranked_preference_loss
from diffalign.lm.step_reward import adaptive_step_weights, step_weighted_scores
from diffalign.lm.tokenize import NoStepsError, collate, tokenize_group
from diffalign.paths import ROOT
from diffalign.train import load_config, train

TOY_LM = ROOT / "assets/models/toy-lm"
STEPS = r"\b(the|and)\b"  # the toy sentences' two clauses: " the red cat is joyful" and " and runs quickly ."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOY_LM)


def test_each_completion_token_gets_the_step_it_falls_in_and_extra_steps_fold_into_the_last_common_one(tokenizer):
    group = tokenize_group(tokenizer, "a red cat :", [" the red cat is joyful and runs quickly .",
                                                      " so the red cat is angry ."], STEPS)
    words = [tokenizer.convert_ids_to_tokens(list(ids)) for ids in group.completions]
    assert words[0] == ["the", "red", "cat", "is", "joyful", "and", "runs", "quickly", ".", "</s>"]
    # the second completion has one step (after "so"), so the first one's "and ..." step folds into step 1
    assert group.steps == ((1,) * 10, (0, 1, 1, 1, 1, 1, 1, 1))
    two = tokenize_group(tokenizer, "a red cat :", [" the red cat is joyful and runs quickly .",
                                                    " the cat and runs ."], STEPS)
    assert two.steps == ((1, 1, 1, 1, 1, 2, 2, 2, 2, 2), (1, 1, 2, 2, 2, 2))
    batch = collate([two, two], pad_token_id=tokenizer.pad_token_id, max_length=None)
    prompt = len(two.prompt)
    assert batch["step_index"][:, :prompt].eq(0).all()  # the prompt is no step
    assert batch["step_index"][2, prompt:prompt + 6].tolist() == [1, 1, 2, 2, 2, 2]
    assert batch["step_index"][2, prompt + 6:].eq(0).all()  # nor is the padding


def test_a_completion_without_a_step_and_conversations_are_refused(tokenizer):
    with pytest.raises(NoStepsError, match="completion 1 has no step") as error:
        tokenize_group(tokenizer, "a red cat :", [" the red cat .", " a red cat ."], STEPS)
    assert error.value.completion == 1
    with pytest.raises(ValueError, match="plain-text completions"):
        tokenize_group(tokenizer, [{"role": "user", "content": "hi"}], [[{"role": "assistant", "content": "the"}]],
                       STEPS)


def authors_weights_and_scores(hidden, per_token, step_index, list_size):
    """compute_step_weights and compute_weighted_logits of the authors' loss.py, loop by loop, on rank-major rows
    (their (batch, N) layout is row n * B + b here); per_token is already aligned with step_index."""
    rows, steps = hidden.shape[0], int(step_index.max())
    prompts = rows // list_size
    weights = torch.zeros(rows, steps + 1)
    scores = torch.zeros(rows)
    for b in range(prompts):
        for n in range(list_size):
            row, best = n * prompts + b, b
            for step in range(1, steps + 1):
                mask, best_mask = step_index[row] == step, step_index[best] == step
                if mask.sum() == 0 or best_mask.sum() == 0:
                    continue
                cos = F.cosine_similarity(hidden[row][mask].mean(0), hidden[best][best_mask].mean(0), dim=0)
                weights[row, step] = cos + 1
            total, weighted = 0.0, 0.0
            for step in range(1, steps + 1):
                mask = step_index[row] == step
                if mask.sum() == 0:
                    continue
                weighted = weighted + weights[row, step] * per_token[row][mask].mean()
                total = total + weights[row, step]
            scores[row] = weighted / total if total > 0 else 0.0
    return weights, scores


def test_the_step_weights_and_scores_are_the_authors_loops():
    g = torch.Generator().manual_seed(0)
    list_size, prompts, length = 3, 2, 9
    step_index = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 3, 0], [0, 0, 1, 2, 2, 3, 3, 3, 3],
                               [0, 1, 2, 2, 3, 0, 0, 0, 0], [0, 1, 1, 1, 2, 2, 3, 0, 0],
                               [0, 1, 2, 3, 3, 3, 3, 3, 0], [0, 1, 1, 2, 2, 0, 0, 0, 0]])  # the last row lacks step 3
    assert step_index.shape == (list_size * prompts, length)
    hidden = torch.randn(list_size * prompts, length, 5, generator=g)
    per_token = torch.randn(list_size * prompts, length - 1, generator=g)
    weights = adaptive_step_weights(hidden, step_index, list_size)
    scores = step_weighted_scores(per_token, step_index, weights)
    # per_token[t - 1] is token t's log-prob: the authors' loops read it against the steps of tokens 1..T-1
    expected_weights, expected_scores = authors_weights_and_scores(hidden[:, 1:], per_token, step_index[:, 1:],
                                                                   list_size)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(weights[:prompts, 1:], torch.full((prompts, 3), 2.0))  # the best is its own reference
    assert weights[5, 3] == 0  # a step the row lacks weighs nothing


def toy_lists(tokenizer, n_prompts=2):
    texts = [[" the red cat is joyful and runs quickly .", " the red cat is calm and sits .",
              " the blue dog is angry and bites ."],
             [" the blue dog is joyful and runs .", " the blue dog is sad and sits slowly .",
              " the red dog is angry and sits ."]]
    groups = [tokenize_group(tokenizer, "a red cat :" if i == 0 else "a blue dog :", texts[i], STEPS)
              for i in range(n_prompts)]
    return collate(groups, pad_token_id=tokenizer.pad_token_id, max_length=None)


def test_tpo_with_the_step_reward_on_a_model_is_the_loss_of_the_step_weighted_log_ratios(tokenizer):
    """The policy's hidden states weigh the steps of both policy and reference log-probs; the listwise tpo loss reads
    their difference; its gradient reaches the policy through the log-probs and the weights, as in the authors' code."""
    vocab = len(tokenizer)
    torch.manual_seed(0)
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    for model in (policy, reference):
        model.resize_token_embeddings(vocab)
    batch = toy_lists(tokenizer)
    loss, metrics = ranked_preference_loss(policy, reference, batch, list_size=3, loss="tpo", beta=0.5,
                                           adaptive_step_reward=True)
    out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = torch.log_softmax(out.logits, -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    ref_token = torch.log_softmax(ref_logits, -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    weights, policy_scores = authors_weights_and_scores(out.hidden_states[-1][:, 1:], per_token,
                                                        batch["step_index"][:, 1:], 3)
    _, ref_scores = authors_weights_and_scores(out.hidden_states[-1][:, 1:].detach(), ref_token,
                                               batch["step_index"][:, 1:], 3)
    expected = losses.get("tpo")(policy_scores.view(3, 2).T, ref_scores.view(3, 2).T, beta=0.5).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grads = {name: p.grad for name, p in policy.named_parameters()}
    assert grads["transformer.ln_f.weight"].abs().sum() > 0  # the last hidden states (the weights) are trained too
    assert torch.isfinite(metrics["rewards/margins"])


def test_a_step_of_tpo_with_the_step_reward_raises_the_best_completions_reward_over_the_worst(tokenizer):
    torch.manual_seed(0)
    policy, reference = tiny_gpt2(0), tiny_gpt2(0)
    for model in (policy, reference):
        model.resize_token_embeddings(len(tokenizer))
    batch = toy_lists(tokenizer)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    margins = []
    for _ in range(3):
        loss, metrics = ranked_preference_loss(policy, reference, batch, list_size=3, loss="tpo", beta=1.0,
                                               adaptive_step_reward=True)
        margins.append(metrics["rewards/margins"].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert margins[2] > margins[1] > 0


def test_the_step_reward_is_refused_without_steps_or_with_another_score(tokenizer):
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch = {k: v for k, v in toy_lists(tokenizer).items() if k != "step_index"}
    batch["input_ids"] = batch["input_ids"].clamp(max=31)
    with pytest.raises(ValueError, match="step_pattern"):
        ranked_preference_loss(policy, reference, batch, list_size=3, loss="tpo", adaptive_step_reward=True)
    with pytest.raises(ValueError, match="neither average_logps"):
        ranked_preference_loss(policy, reference, batch, list_size=3, loss="tpo", adaptive_step_reward=True,
                               average_logps=True)


CONFIG = ROOT / "configs/toy_lm_tpo.yaml"


def test_the_toy_tpo_config_refuses_settings_it_cannot_run_with():
    with pytest.raises(UserError, match="set data.step_pattern"):
        load_config(CONFIG, ["data.step_pattern=null"])
    with pytest.raises(UserError, match="only objective.options.adaptive_step_reward=true reads"):
        load_config(CONFIG, ["objective.options.adaptive_step_reward=false"])
    with pytest.raises(UserError, match="turn data.packing off"):
        load_config(CONFIG, ["data.packing=true"])
    with pytest.raises(UserError, match="not a regular expression"):
        load_config(CONFIG, ["data.step_pattern=(the"])
    with pytest.raises(UserError, match="numbers the steps of ranked text completions"):
        load_config(ROOT / "configs/toy_lm_dpo.yaml", [f"data.step_pattern={STEPS}"])


def test_the_toy_tpo_config_trains_and_skips_the_lists_with_a_completion_of_no_step(tmp_path, tokenizer):
    """Run as shipped but for its data (a table of 4 lists, one with a completion that has no step), steps and
    output; the skipped list is said in the run's summary."""
    good = [" the red cat is joyful and runs quickly .", " the red cat is calm and sits .",
            " the red dog is angry and bites .", " the blue cat is sad and sits ."]
    rows = {"prompt": ["a red cat :"] * 4,
            "completions": [good, good[::-1], good[1:] + good[:1], [*good[:3], " a red cat ."]],
            "scores": [[3.0, 2.0, 1.0, 0.0]] * 4}
    pq.write_table(pa.table(rows), tmp_path / "lists.parquet")
    run = tmp_path / "run"
    summary = train(load_config(CONFIG, [f"data.path={tmp_path / 'lists.parquet'}", f"output_dir={run}",
                                         "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=2",
                                         "train.report_to=none"]))
    assert summary["skipped_rows"] == {"completions": 1}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
