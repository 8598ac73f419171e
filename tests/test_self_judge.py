"""The self judge (OSP's self-judged preference strengths): its table against the judge's log-odds computed by hand,
its use by online DPO's soft-label losses, and the loud failures of a judge that cannot judge."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from diffalign.errors import UserError
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS
from diffalign.rewards.self_judge import DEFAULT_TEMPLATE, SelfJudge, parse_self_judge
from diffalign.rewards.text import load_text_reward
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

SMALL = ["online.groups_per_round=3", "online.steps_per_round=2", "train.batch_size=4", "train.max_steps=2",
         "train.checkpoint_every=0", "train.log_every=1", "train.report_to=none", "objective.options.max_new_tokens=6"]


@pytest.fixture(scope="module")
def judge_lm(tmp_path_factory):
    """A tiny random GPT-2 that reads long prompts, with the toy tokenizer and the default labels 1 and 2."""
    folder = tmp_path_factory.mktemp("judge-lm")
    tokenizer = AutoTokenizer.from_pretrained(TOY_LM)
    tokenizer.add_tokens(["1", "2"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def _first_better_by_hand(model, tokenizer, prompt, first, second):
    """log p("1") - log p("2") after the filled-in default template, one unpadded sequence."""
    text = DEFAULT_TEMPLATE.format(prompt=prompt, first=first, second=second)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
    one, two = (tokenizer.convert_tokens_to_ids(label) for label in ("1", "2"))
    return float(logp[one] - logp[two])


def test_the_table_is_the_order_averaged_log_odds_computed_by_hand(judge_lm):
    _, model, tokenizer = judge_lm
    prompts = [tw.prompt("red", "fox"), tw.prompt("blue", "owl")]
    groups = [[" " + tw.sentence("red", "fox", mood, "runs", "slowly") for mood in ("joyful", "calm", "angry")],
              [" the blue owl is sad .", " owl owl", " the blue owl is happy and sings loudly ."]]
    judge = SelfJudge(model, tokenizer, batch_size=4)  # batches of 4 right-padded prompts of different lengths
    tables = judge.tables(groups, prompts)
    assert tables.shape == (2, 3, 3)
    for g, (prompt, group) in enumerate(zip(prompts, groups)):
        for i in range(3):
            for j in range(3):
                if i == j:
                    assert float(tables[g, i, j]) == 0.0
                    continue
                by_hand = (_first_better_by_hand(model, tokenizer, prompt, group[i], group[j])
                           - _first_better_by_hand(model, tokenizer, prompt, group[j], group[i])) / 2
                assert float(tables[g, i, j]) == pytest.approx(by_hand, abs=1e-5)
    torch.testing.assert_close(tables, -tables.transpose(1, 2))


def test_a_chat_tokenizer_reads_the_question_as_a_user_turn(judge_lm):
    _, model, tokenizer = judge_lm
    chat = AutoTokenizer.from_pretrained(TOY_LM)
    chat.add_tokens(["1", "2"])
    chat.chat_template = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}<|assistant|>"
    text = SelfJudge(model, chat).judging_prompt("P", "A", "B")
    assert text == "<|user|> " + DEFAULT_TEMPLATE.format(prompt="P", first="A", second="B") + " <|assistant|>"


def test_online_dpo_ranks_by_the_table_and_takes_each_pairs_entry_as_its_strength():
    """A (G, K, K) table: completions ranked by their row means; a soft-label loss's strength is sigma(s(w, l) / T)."""
    s01, s02, s12 = 0.4, 1.0, 0.8  # row means (-0.467, -0.133, 0.6): 0 < 1 < 2
    table = torch.tensor([[[0.0, -s01, -s02], [s01, 0.0, -s12], [s02, s12, 0.0]]])
    online = OBJECTIVES["lm_online_dpo"](ObjectiveConfig(loss="soft_dpo", options={"pairs": "all",
                                                                                  "preference_temperature": 2.0}))
    groups, items, inputs = online.pairs(table, None)
    assert groups.tolist() == [0, 0, 0] and items.tolist() == [[1, 0], [2, 0], [2, 1]]
    torch.testing.assert_close(inputs["preference"], torch.sigmoid(torch.tensor([s01, s02, s12]) / 2.0))
    extremes = OBJECTIVES["lm_online_dpo"](ObjectiveConfig(loss="soft_dpo"))
    assert extremes.pairs(table, None)[1].tolist() == [[2, 0]]


def test_online_dpo_trains_on_the_policys_own_judgement(tmp_path, judge_lm):
    """Round 0's tables are the policy's judgement at the start (the saved model's); step 1's soft-DPO loss, with
    the policy still the reference, is log 2 whatever the strengths."""
    folder, model, tokenizer = judge_lm
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_lm_online_dpo.yaml", [
        f"model.path={folder}", "online.reward=self_judge", "objective.loss=soft_dpo", "objective.options.pairs=all",
        f"output_dir={run}", *SMALL]))
    record = json.loads((run / "rounds" / "round-00000" / "groups.json").read_text())
    assert record["reward"] == "self_judge"
    tables = torch.tensor(record["preferences"])
    assert tables.shape == (3, 4, 4)
    torch.testing.assert_close(SelfJudge(model, tokenizer).tables(record["completions"], record["prompts"]), tables,
                               atol=1e-5, rtol=0)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_under_fsdp2_both_processes_judge_the_round_in_step(tmp_path, judge_lm):
    """Two FSDP2 processes (configs/accelerate/fsdp2.yaml's environment): the policy's forwards need both, so both
    sample and judge the round; the main process's tables are one process's, to float rounding."""
    import sys

    from fixtures import Started, launch_env

    from diffalign.paths import ROOT

    folder = judge_lm[0]
    common = [f"model.path={folder}", "online.reward=self_judge", "objective.loss=soft_dpo",
              "objective.options.pairs=all", "train.lora_rank=0", *SMALL]
    two = Started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "diffalign", "train", str(CONFIGS / "toy_lm_online_dpo.yaml"), *common, "train.batch_size=2",
                   f"output_dir={tmp_path / 'two'}"], env=launch_env(ROOT / "configs/accelerate/fsdp2.yaml"))
    train(load_config(CONFIGS / "toy_lm_online_dpo.yaml", [*common, f"output_dir={tmp_path / 'one'}"]))
    done = two.result()
    assert done.returncode == 0, done.stderr[-3000:]
    one, sharded = (json.loads((tmp_path / run / "rounds" / "round-00000" / "groups.json").read_text())
                    for run in ("one", "two"))
    assert sharded["completions"] == one["completions"]
    torch.testing.assert_close(torch.tensor(sharded["preferences"]), torch.tensor(one["preferences"]), atol=1e-4,
                               rtol=0)


def test_a_judge_that_cannot_judge_says_why(tmp_path, judge_lm):
    folder, model, tokenizer = judge_lm
    with pytest.raises(UserError, match="one known token"):
        SelfJudge(model, tokenizer, labels=("yes", "2"))  # "yes" is not in the toy vocabulary
    with pytest.raises(UserError, match="lacks {second}"):
        bad = tmp_path / "judge.txt"
        bad.write_text("{prompt} {first}")
        parse_self_judge(f"self_judge:template={bad}")
    with pytest.raises(UserError, match="labels=A/B"):
        parse_self_judge("self_judge:labels=1")
    with pytest.raises(UserError, match="write self_judge"):
        parse_self_judge("self_judge:size=3")
    with pytest.raises(UserError, match="policy being trained"):
        load_text_reward("self_judge")
    with pytest.raises(UserError, match="lm_online_dpo or lm_gpo"):
        load_config(CONFIGS / "toy_lm_sppo.yaml", ["online.reward=self_judge"])
    toy = AutoTokenizer.from_pretrained(TOY_LM)
    short = GPT2LMHeadModel(GPT2Config(vocab_size=len(toy), n_positions=24, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UserError, match="reads at most 24"):
        SelfJudge(short, toy, labels=("joyful", "angry")).tables([["a b c", "d e f"]], ["describe the red fox :"])
