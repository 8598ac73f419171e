"""lm_distill: a student distilled from model.teacher with each distillation loss, the loss by hand on one row, the
teacher cache changing nothing, AlignDistil's reference, the student moving toward the teacher, and the refusals."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lm_helpers import logged

from diffalign import losses
from diffalign.errors import UserError
from diffalign.lm.loading import load_causal_lm, load_trained_lm
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM, TOY_STUDENT, write_toy_lm
from diffalign.train import load_config, train

SMALL = ["train.max_steps=3", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=0",
         "train.report_to=none"]


def one_row(path):
    prompt = tw.prompt("red", "fox")
    pq.write_table(pa.table({"prompt": [prompt], "completion": [" " + tw.sentence("red", "fox", "calm", "runs",
                                                                                    "slowly")]}), path)
    return path


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()


def row_batch(path):
    row = pq.read_table(path).to_pylist()[0]
    _, tokenizer = load_trained_lm(TOY_LM)
    return collate([tokenize_group(tokenizer, row["prompt"], [row["completion"]])], pad_token_id=0, max_length=None)


@pytest.mark.parametrize("loss", ["mimic_kd", "ls_kd", "pld"])
def test_the_first_steps_loss_is_the_losses_formula_on_the_students_and_teachers_logits(tmp_path, loss):
    data = one_row(tmp_path / "row.parquet")
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_lm_distill.yaml", [f"data.path={data}", f"objective.loss={loss}",
                                                        f"output_dir={run}", *SMALL]))
    batch = row_batch(data)
    student = load_causal_lm(TOY_STUDENT, random_init=True, seed=0)  # the run's own: train.seed 0
    teacher, _ = load_trained_lm(TOY_LM)
    expected = losses.get(loss)(logits_of(student, batch), logits_of(teacher, batch), batch["completion_mask"][:, 1:],
                                labels=batch["input_ids"][:, 1:])
    assert logged(run)[0] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_the_teacher_cache_changes_no_loss_and_the_student_moves_toward_the_teacher(tmp_path):
    runs = {}
    for cache in ("true", "false"):
        runs[cache] = tmp_path / cache
        train(load_config(CONFIGS / "toy_lm_distill.yaml", [f"objective.options.cache_teacher={cache}",
                                                            f"output_dir={runs[cache]}", *SMALL, "train.max_steps=30",
                                                            "train.batch_size=8", "train.log_every=10"]))
    assert logged(runs["true"]) == logged(runs["false"])
    kl = logged(runs["true"], "teacher_kl")
    assert kl[-1] < 0.5 * kl[0]


def test_aligndistil_extrapolates_the_teacher_past_model_reference(tmp_path):
    """AlignDistil's second model is model.reference (the paper's reverse-DPO model): step 1's loss is the formula on
    the student's, the teacher's and that model's logits."""
    data = one_row(tmp_path / "row.parquet")
    other = write_toy_lm(tmp_path / "reverse", seed=4)
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_lm_distill.yaml", [f"data.path={data}", "objective.loss=aligndistil",
                                                        f"model.reference={other}", f"output_dir={run}", *SMALL]))
    batch = row_batch(data)
    student = load_causal_lm(TOY_STUDENT, random_init=True, seed=0)
    expected = losses.get("aligndistil")(logits_of(student, batch), logits_of(load_trained_lm(TOY_LM)[0], batch),
                                         batch["completion_mask"][:, 1:],
                                         reference_logits=logits_of(load_trained_lm(other)[0], batch))
    assert logged(run)[0] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_distillation_needs_a_teacher_with_the_students_vocabulary(tmp_path):
    with pytest.raises(UserError, match="set model.teacher"):
        load_config(CONFIGS / "toy_lm_distill.yaml", ["model.teacher=null"])
    with pytest.raises(UserError, match="has no teacher"):
        load_config(CONFIGS / "toy_lm_dpo.yaml", [f"model.teacher={TOY_LM}"])
    with pytest.raises(UserError, match="model.teacher"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.teacher={TOY_BASE}"])
    with pytest.raises(UserError, match="distillation"):
        load_config(CONFIGS / "toy_lm_distill.yaml", ["objective.loss=dpo"])
    other = write_toy_lm(tmp_path / "other")
    _, tokenizer = load_trained_lm(other)
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(UserError, match="tokenizer is not the student's"):
        train(load_config(CONFIGS / "toy_lm_distill.yaml", [f"model.teacher={other}", f"output_dir={tmp_path / 'r'}",
                                                            *SMALL]))
