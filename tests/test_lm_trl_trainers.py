"""Parity with TRL's trainers, not only its loss formulas: the same tiny LM (the toy text world's GPT-2), data,
optimiser (AdamW, constant learning rate, clipping at 1) and batches give the same loss at every step in
diffalign's trainer and in TRL's DPOTrainer (every DPO loss type TRL has) or KTOTrainer.

Each batch is the whole dataset, so both trainers see the same rows at every step whatever order their
samplers draw; both run in float32 on the CPU with dropout off.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl_cases import BATCH_COUPLED, CASES

from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM, toy_tokenizer
from diffalign.train import load_config, train

STEPS, LR, BETA, ROWS = 3, 1e-3, 0.1, 4


def _rows(seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for prompt in tw.prompts("train")[:ROWS]:
        colour, animal = tw.parse_prompt(prompt)
        for key in ("chosen", "rejected"):
            rows[key].append(tw.base_completion(rng, colour, animal))
        rows["prompt"].append(prompt)
    return rows


def _ours(tmp_path: Path, objective: list[str], rows: dict[str, list]) -> list[float]:
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table(rows), data)
    run = tmp_path / "ours"
    train(load_config(None, [f"model.path={TOY_LM}", f"data.path={data}", *objective, f"objective.beta={BETA}",
                             f"train.batch_size={ROWS * (2 if 'label' in rows else 1)}", f"train.max_steps={STEPS}",
                             f"train.learning_rate={LR}", "train.lr_scheduler=constant", "train.checkpoint_every=0",
                             "train.log_every=1", "train.report_to=none", f"output_dir={run}"]))
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _recording(trainer) -> list[float]:
    """The loss of every training step, as the trainer computes it (before any rounding for its logs)."""
    seen: list[float] = []
    compute = trainer.compute_loss

    def recorded(*args, **kwargs):
        out = compute(*args, **kwargs)
        seen.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recorded
    return seen


def _common_args(tmp_path: Path, batch: int) -> dict:
    return dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=batch, max_steps=STEPS,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, beta=BETA, report_to="none", save_strategy="no",
                logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0, disable_dropout=True, max_length=None)


def _trl_dpo(tmp_path: Path, rows: dict[str, list], loss_type: str, trl_kwargs: dict) -> list[float]:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(tmp_path, ROWS), loss_type=[loss_type], **trl_kwargs)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(TOY_LM)), args=args,
                         processing_class=toy_tokenizer(), train_dataset=Dataset.from_dict(rows))
    seen = _recording(trainer)
    trainer.train()
    return seen


# every loss type of TRL 1.x's DPOTrainer: the per-example ones, the batch-coupled ones and `sft` (the chosen
# completion's per-token NLL alone)
DPO_CASES = [*CASES, *((trl, {}, ours, {}) for trl, ours in BATCH_COUPLED), ("sft", {}, "sft", {})]


@pytest.mark.slow
@pytest.mark.parametrize("trl_type,trl_kwargs,name,options", DPO_CASES,
                         ids=[f"{c[0]}-{c[2]}-{'-'.join(map(str, c[3].values()))}" for c in DPO_CASES])
def test_per_step_losses_match_trls_dpo_trainer(tmp_path, trl_type, trl_kwargs, name, options):
    rows = _rows()
    ours = _ours(tmp_path, ["objective.name=lm_dpo", f"objective.loss={name}",
                            *(f"objective.loss_options.{k}={v}" for k, v in options.items())], rows)
    theirs = _trl_dpo(tmp_path, rows, trl_type, trl_kwargs)
    assert len(theirs) == STEPS
    assert ours == pytest.approx(theirs, rel=2e-5, abs=2e-6)
    assert len(set(round(v, 4) for v in ours)) > 1  # the weights moved: not three copies of step 1


def test_per_step_losses_match_trls_kto_trainer(tmp_path):
    from trl import KTOConfig, KTOTrainer

    pairs = _rows(seed=1)
    rows = {"prompt": pairs["prompt"] * 2, "completion": pairs["chosen"] + pairs["rejected"],
            "label": [True] * ROWS + [False] * ROWS}
    ours = _ours(tmp_path, ["objective.name=lm_kto", "objective.loss=kto"], rows)
    args = KTOConfig(**_common_args(tmp_path, 2 * ROWS))
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(str(TOY_LM)), args=args,
                         processing_class=toy_tokenizer(), train_dataset=Dataset.from_dict(rows))
    theirs = _recording(trainer)
    trainer.train()
    assert ours == pytest.approx(theirs, rel=2e-5, abs=2e-6)
