"""Train a general preference model (GPM, arXiv 2410.02197: preference embeddings on a sequence model) on a pairs
table and save it where ``online.reward=gpm:PATH`` reads it.

    python scripts/train_gpm.py --data toy:text_pairs --base assets/models/toy-lm --out runs/toy-gpm

``--data``: a table with prompt, chosen, rejected text (parquet, .jsonl, a datasets folder, or a toy dataset);
``--base``: a transformers model folder whose body is trained with the heads (a causal LM's works). Prints the pairs
used, the rows skipped and the final loss and accuracy on the training pairs.
"""

from __future__ import annotations

import argparse

from diffalign.rewards.general_preference import train_general_preference
from diffalign.toy.datasets import is_toy_dataset, toy_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dim", type=int, default=4, help="the embedding's dimension 2k (even)")
    parser.add_argument("--no-prompt-gate", action="store_true", help="every block weight 1 (no prompt head)")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = toy_dataset(args.data) if is_toy_dataset(args.data) else args.data
    result = train_general_preference(data, args.base, args.out, dim=args.dim, prompt_gate=not args.no_prompt_gate,
                                      tau=args.tau, steps=args.steps, batch_size=args.batch_size,
                                      learning_rate=args.learning_rate, max_length=args.max_length, seed=args.seed)
    print(f"trained on {result['pairs']} pairs ({result['skipped_rows']} rows skipped): loss {result['loss']:.4f}, "
          f"accuracy {result['accuracy']:.3f} over the last tenth of the steps; saved to {args.out}")


if __name__ == "__main__":
    main()
