"""Training throughput of diffalign's LM DPO step against TRL's DPOTrainer, on the same model, data and settings.

Both train DPO (sigmoid loss, beta 0.1) on the toy text world's pairs with a GPT-2 of ``--width`` x
``--layers`` built with random weights from the toy LM's config (its word-level tokenizer), AdamW at a
constant learning rate, fp32, dropout off, a full fine-tune with a frozen reference copy (``--lora R``: a
LoRA of rank R whose base is the reference). Throughput is pairs per second of the training loop alone:
diffalign's logged ``pairs_per_s`` and TRL's ``train_samples_per_second`` (model loading excluded for both).
Each trainer runs ``--repeats`` times in alternation; the median is printed. ``--uneven`` gives the chosen
completions one to four sentences (lengths vary four-fold, as real preference data does) and ``--packing`` adds
diffalign with ``data.packing=true`` (the sequences of a micro-batch packed into as few rows as fit).

    python scripts/bench_lm.py                       # CPU, a 19 M-parameter GPT-2
    python scripts/bench_lm.py --uneven --packing    # what packing saves on uneven lengths
    python scripts/bench_lm.py --width 1024 --layers 12 --batch-size 32    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file


def write_model(folder: Path, width: int, layers: int, positions: int | None = None) -> Path:
    from transformers import GPT2LMHeadModel

    from diffalign.toy.text_model import toy_lm_config, toy_tokenizer

    config = toy_lm_config()
    config.n_embd, config.n_layer, config.n_head = width, layers, max(1, width // 64)
    config.n_positions = positions or config.n_positions
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    toy_tokenizer().save_pretrained(str(folder))
    return folder


def write_pairs(path: Path, n: int, uneven: bool = False) -> dict[str, list]:
    from diffalign.toy import text_world as tw

    rng = random.Random(0)
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        prompt = tw.prompts("all")[i % 36]
        colour, animal = tw.parse_prompt(prompt)
        rows["prompt"].append(prompt)
        sentences = rng.randint(1, 4) if uneven else 1
        rows["chosen"].append(" ".join(tw.base_completion(rng, colour, animal) for _ in range(sentences)))
        rows["rejected"].append(tw.base_completion(rng, colour, animal))
    pq.write_table(pa.table(rows), path)
    return rows


def diffalign_pairs_per_s(model: Path, data: Path, out: Path, args, packing: bool = False) -> float:
    from diffalign.train import load_config, train

    train(load_config(None, [f"model.path={model}", "objective.name=lm_dpo", "objective.loss=dpo",
                             f"data.packing={str(packing).lower()}",
                             f"data.path={data}", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                             "train.learning_rate=1e-5", "train.lr_scheduler=constant", "train.checkpoint_every=0",
                             f"train.log_every={args.steps}", "train.report_to=none", f"train.lora_rank={args.lora}",
                             f"output_dir={out}"]))
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["pairs_per_s"]


def trl_pairs_per_s(model: Path, rows: dict[str, list], out: Path, args) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from diffalign.toy.text_model import toy_tokenizer

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora, lora_alpha=args.lora, target_modules="all-linear", task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, report_to="none",
                       save_strategy="no", logging_steps=args.steps, use_cpu=not torch.cuda.is_available(),
                       bf16=False, fp16=False, seed=0, max_length=None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(model)), args=config,
                         processing_class=toy_tokenizer(), train_dataset=Dataset.from_dict(rows), peft_config=peft_config)
    return trainer.train().metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uneven", action="store_true", help="chosen completions of 1-4 sentences")
    parser.add_argument("--packing", action="store_true", help="also run diffalign with data.packing=true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_model(root / "model", args.width, args.layers, positions=64 if args.uneven else None)
        rows = write_pairs(root / "pairs.parquet", max(64, args.batch_size * args.steps), uneven=args.uneven)
        parameters = sum(t.numel() for t in load_file(model / "model.safetensors").values())
        runs: dict[str, list[float]] = {"diffalign": [], "TRL DPOTrainer": []}
        if args.packing:
            runs["diffalign, data.packing=true"] = []
        for i in range(args.repeats):
            runs["diffalign"].append(diffalign_pairs_per_s(model, root / "pairs.parquet", root / f"ours-{i}", args))
            runs["TRL DPOTrainer"].append(trl_pairs_per_s(model, rows, root / f"trl-{i}", args))
            if args.packing:
                runs["diffalign, data.packing=true"].append(
                    diffalign_pairs_per_s(model, root / "pairs.parquet", root / f"packed-{i}", args, packing=True))
    print(f"\nDPO, GPT-2 {args.width} x {args.layers} ({parameters / 1e6:.1f} M parameters), batch {args.batch_size}, "
          f"{args.steps} steps, {'LoRA rank ' + str(args.lora) if args.lora else 'full fine-tune'}, "
          f"{'uneven lengths (1-4 sentences), ' if args.uneven else ''}"
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, median of {args.repeats}")
    print("| trainer | pairs/s |\n|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
