"""`diffalign train` on causal language models: the LM objectives through the ordinary trainer, on the toy text
world's GPT-2 (its shipped weights, or its architecture with random weights), with TRL's data formats."""

from __future__ import annotations

import json
import math
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import Started, chat_lm
from lm_helpers import lm_config, logged, text_pairs
from safetensors.torch import load_file

from diffalign.data.text import TextPairDataset
from diffalign.errors import UserError
from diffalign.lm.loading import load_trained_lm
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.paths import ROOT
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM, toy_tokenizer
from diffalign.train import load_config, train


def test_the_tokenization_is_trls_prompt_then_completion_with_eos():
    tokenizer = toy_tokenizer()
    group = tokenize_group(tokenizer, "describe the red fox :", [" the red fox is calm and runs slowly .",
                                                                 " the red fox is sad and runs slowly ."])
    words = tw.vocabulary()
    assert [words[i] for i in group.prompt] == "describe the red fox :".split()
    assert [words[i] for i in group.completions[0]] == "the red fox is calm and runs slowly . </s>".split()
    batch = collate([group, group], pad_token_id=0, max_length=12)
    # rank-major: the two chosen rows, then the two rejected ones; cut to 12 tokens, keeping the start
    assert batch["input_ids"].shape == (4, 12)
    assert batch["completion_mask"][0].tolist() == [0] * 5 + [1] * 7
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])


def test_dpo_on_an_lm_starts_at_log2_and_its_implicit_reward_grows(tmp_path):
    config = lm_config(tmp_path, text_pairs(tmp_path / "pairs.parquet"), "train.max_steps=12")
    assert config.objective.beta == 0.1 and config.train.lora_targets == ["all-linear"]  # the LM's defaults
    summary = train(config)
    losses, margins = logged(tmp_path / "run"), logged(tmp_path / "run", "rewards/margins")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
    assert losses[-1] < losses[0] - 0.1 and margins[-1] > 0.3
    assert logged(tmp_path / "run", "completion_tokens")[0] == 10.0  # 9 words and the EOS
    model, tokenizer = load_trained_lm(tmp_path / "run")  # the final folder: model and tokenizer
    assert summary["final"] == str(tmp_path / "run" / "final") and tokenizer.eos_token == tw.EOS
    group = tokenize_group(tokenizer, "describe the blue cat :", [" the blue cat is joyful and runs slowly .",
                                                                  " the blue cat is angry and runs slowly ."])
    base, _ = load_trained_lm(TOY_LM)
    from diffalign.lm import sequence_logps

    batch = collate([group], pad_token_id=0, max_length=None)
    with torch.no_grad():
        gap = [torch.sub(*sequence_logps(m(input_ids=batch["input_ids"]).logits, batch["input_ids"],
                                         batch["completion_mask"])[0]) for m in (base, model)]
    assert gap[1] > gap[0] + 1.0  # joyful over angry, on a prompt and words it never trained on


def test_a_lora_run_uses_its_base_as_the_reference_and_saves_an_adapter(tmp_path):
    config = lm_config(tmp_path, text_pairs(tmp_path / "pairs.parquet"), "train.lora_rank=4",
                       "train.learning_rate=1e-2")
    train(config)
    losses = logged(tmp_path / "run")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    final = tmp_path / "run" / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(TOY_LM)
    merged, _ = load_trained_lm(tmp_path / "run")
    base, _ = load_trained_lm(TOY_LM)
    moved = max((a - b).abs().max().item() for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert moved > 1e-3


@pytest.mark.parametrize("lora", [0, 4])
def test_an_lm_run_resumes_exactly(tmp_path, lora):
    data = text_pairs(tmp_path / "pairs.parquet", n=10)
    common = ["train.checkpoint_every=3", f"train.lora_rank={lora}"]
    train(lm_config(tmp_path, data, "train.max_steps=6", *common, name="straight"))
    train(lm_config(tmp_path, data, "train.max_steps=3", *common, name="split"))
    train(lm_config(tmp_path, data, "train.max_steps=6", *common, "train.resume=latest", name="split"))
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")  # batch of 4 over 10 pairs: epochs cross
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    if lora:  # a LoRA checkpoint keeps the adapters only, not the frozen base
        saved = load_file(tmp_path / "split" / "checkpoints" / "step-0000003" / "model.safetensors")
        assert saved and all("lora_" in key for key in saved)
    a, b = (load_file(tmp_path / run / "final" / weights) for run in ("straight", "split"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.slow
def test_two_lm_processes_compute_what_one_does_at_double_batch(tmp_path):
    """torchrun (gloo) at 2 pairs per process vs one process at 4, full and LoRA (one launch runs both, one after the
    other: tests/launch_runs.py); a LoRA run's reference is its base with the adapters disabled on each process, a
    full run's a frozen copy on each."""
    data = text_pairs(tmp_path / "pairs.parquet", n=8)
    common = ["model.path=" + str(TOY_LM), "objective.name=lm_dpo", "objective.loss=dpo", f"data.path={data}",
              "train.max_steps=3", "train.checkpoint_every=0", "train.log_every=1", "train.report_to=none",
              "train.learning_rate=1e-3", "train.adam_epsilon=1e-3"]
    runs = {f"lora{lora}": [*common, f"train.lora_rank={lora}"] for lora in (0, 4)}
    (tmp_path / "runs.json").write_text(json.dumps([[None, [*overrides, f"output_dir={tmp_path / name}_two",
                                                             "train.batch_size=2"]] for name, overrides in runs.items()]))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    two = Started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(ROOT / "tests/launch_runs.py"), str(tmp_path / "runs.json")], env=env)
    for name, overrides in runs.items():  # beside them
        train(load_config(None, [*overrides, f"output_dir={tmp_path / name}", "train.batch_size=4"]))
    two = two.result()
    assert two.returncode == 0, two.stderr[-3000:]
    for name in runs:
        for one, two_ in zip(logged(tmp_path / name), logged(tmp_path / f"{name}_two")):
            assert two_ == pytest.approx(one, rel=1e-5)
        weights = "adapter_model.safetensors" if name == "lora4" else "model.safetensors"
        a, b = (load_file(tmp_path / run / "final" / weights) for run in (name, f"{name}_two"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=0)


def test_per_pair_weights_scale_each_pairs_loss(tmp_path):
    data = text_pairs(tmp_path / "pairs.parquet", n=4, weight=[2.0, 2.0, 2.0, 2.0])
    train(lm_config(tmp_path, data, "data.weight_column=weight", "train.max_steps=1"))
    assert logged(tmp_path / "run")[0] == pytest.approx(2 * math.log(2), abs=1e-6)


def test_bad_text_rows_are_skipped_and_counted(tmp_path):
    path = text_pairs(tmp_path / "pairs.parquet", n=6)
    table = pq.read_table(path).to_pydict()
    table["chosen"][1] = ""  # empty completion
    table["prompt"][4] = " ".join(["describe"] * 40)  # fills max_length
    pq.write_table(pa.table(table), path)
    summary = train(lm_config(tmp_path, path, "data.max_length=24", "train.max_steps=2"))
    assert summary["skipped_rows"] == {"chosen": 1, "prompt": 1}
    with pytest.raises(UserError, match="row 1, column 'chosen'"):
        train(lm_config(tmp_path, path, "data.on_error=raise", name="strict"))


def test_conversational_pairs_go_through_the_chat_template_and_the_implicit_prompt(tmp_path):
    folder = chat_lm(tmp_path / "lm")
    tokenizer = load_trained_lm(folder)[1]
    user = {"role": "user", "content": "the red fox"}
    chosen = [user, {"role": "assistant", "content": "the red fox is joyful and runs slowly ."}]
    rejected = [user, {"role": "assistant", "content": "the red fox is angry and runs slowly ."}]
    path = tmp_path / "conversations.parquet"
    pq.write_table(pa.table({"chosen": [chosen] * 4, "rejected": [rejected] * 4}), path)  # no prompt column
    dataset = TextPairDataset(path, tokenizer=tokenizer)
    example = dataset.read(0)
    words = tw.vocabulary()
    assert [words[i] for i in example.group.prompt] == "describe the red fox :".split()
    assert [words[i] for i in example.group.completions[0]] == "the red fox is joyful and runs slowly . </s>".split()
    train(lm_config(tmp_path, path, "train.max_steps=2", model=folder))
    assert logged(tmp_path / "run")[0] == pytest.approx(math.log(2), abs=1e-6)


def test_kto_on_labelled_completions_starts_at_one_half(tmp_path):
    path = tmp_path / "labelled.parquet"
    pairs = pq.read_table(text_pairs(tmp_path / "pairs.parquet", n=4)).to_pydict()
    pq.write_table(pa.table({"prompt": pairs["prompt"] * 2, "completion": pairs["chosen"] + pairs["rejected"],
                             "label": [True] * 4 + [False] * 4}), path)
    config = lm_config(tmp_path, path, "objective.name=lm_kto", "objective.loss=kto", "train.batch_size=8")
    assert config.data.label_column == "label"  # TRL's column, the LM default
    train(config)
    losses = logged(tmp_path / "run")
    # at step 1 every implicit reward and the reference point are 0: each row's loss is 1 - sigma(0)
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and losses[-1] < losses[0]


def test_listwise_losses_train_on_ranked_completions(tmp_path):
    rng = random.Random(0)
    rows: dict[str, list] = {"prompt": [], "completions": [], "scores": []}
    for prompt in tw.prompts("train")[:4]:
        colour, animal = tw.parse_prompt(prompt)
        moods = rng.sample(list(tw.MOODS), 3)
        rows["prompt"].append(prompt)
        rows["completions"].append([tw.sentence(colour, animal, m, "runs", "slowly") for m in moods])
        rows["scores"].append([tw.MOODS[m] for m in moods])
    pq.write_table(pa.table(rows), tmp_path / "ranked.parquet")
    train(lm_config(tmp_path, tmp_path / "ranked.parquet", "objective.name=lm_rank", "objective.loss=plackett_luce"))
    losses = logged(tmp_path / "run")
    # Plackett-Luce over 3 equal scores: log 3! at step 1
    assert losses[0] == pytest.approx(math.log(6), abs=1e-5) and losses[-1] < losses[0]


@pytest.mark.parametrize("overrides,message", [
    (["validation.every=10"], "samples no validation"),
    (["data.cache_dir=/tmp/x"], "data.cache_dir"),
    (["objective.loss=kto"], "lm_dpo takes"),
    (["objective.name=lm_kto", "objective.loss=dpo"], "lm_kto takes"),
    (["objective.loss=z_loss"], "function of a model's logits"),
])
def test_an_lm_config_refuses_what_it_cannot_do(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        lm_config(tmp_path, tmp_path / "pairs.parquet", *overrides)


def test_a_diffusion_pipeline_as_an_lm_model_is_refused(tmp_path):
    config = lm_config(tmp_path, text_pairs(tmp_path / "pairs.parquet"), model=ROOT / "assets/models/toy-base")
    with pytest.raises(UserError, match="not a transformers model folder"):
        train(config)


@pytest.mark.parametrize("options", [{"ld_alpha": 0.5}, {"average_logps": True}])
def test_the_completion_score_options_reach_the_loss_from_the_config(options):
    """LD-DPO's ld_alpha and SimPO's averaged scores, set as objective.options, are the preference_loss keywords of
    the same name (their scoring is checked by hand in tests/test_lm.py), and change the loss."""
    from lm_helpers import preference_batch, tiny_gpt2

    from diffalign.config import ObjectiveConfig
    from diffalign.lm import preference_loss
    from diffalign.objectives import LanguageModelDPO

    policy, reference, inputs = tiny_gpt2(0), tiny_gpt2(1), preference_batch(3)
    objective = LanguageModelDPO(ObjectiveConfig(name="lm_dpo", loss="dpo", beta=0.1, options=options))
    loss, _ = objective(policy, reference, {"inputs": inputs, "targets": {}})
    by_hand, _ = preference_loss(policy, reference, inputs, loss="dpo", beta=0.1, **options)
    plain, _ = preference_loss(policy, reference, inputs, loss="dpo", beta=0.1)
    assert loss.item() == pytest.approx(by_hand.item()) and loss.item() != pytest.approx(plain.item())
    with pytest.raises(UserError, match=r"objective.options.ld_alpha=1.5 is out of range for lm_dpo"):
        load_config(ROOT / "configs/toy_lm_dpo.yaml", ["objective.options.ld_alpha=1.5"])


def test_the_ranking_accuracy_is_the_policy_s_own_ranking_of_each_pair_by_hand():
    """ranking_acc (Chen et al. 2024): the share of pairs whose chosen completion the policy scores higher, no
    reference in it; implicit_acc ranks by the log-ratios to the reference instead."""
    from lm_helpers import preference_batch, tiny_gpt2

    from diffalign.lm import preference_loss, sequence_logps

    policy, reference, inputs = tiny_gpt2(0), tiny_gpt2(1), preference_batch(8)
    _, metrics = preference_loss(policy, reference, inputs, loss="dpo", beta=0.1)
    with torch.no_grad():
        logits = policy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        scores, _ = sequence_logps(logits, inputs["input_ids"], inputs["completion_mask"])
    chosen, rejected = scores.chunk(2)
    assert metrics["ranking_acc"].item() == pytest.approx((chosen > rejected).float().mean().item())
    assert 0 < metrics["ranking_acc"].item() < 1  # the pairs of this batch are ranked both ways
