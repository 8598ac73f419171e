"""The toy text world's tokenizer and model architecture: one token per word, a two-layer GPT-2.

``assets/models/toy-lm`` holds the shipped base model, trained by ``scripts/train_toy_lm.py`` on the
base corpus of :mod:`diffalign.toy.text_world`; :func:`write_toy_lm` writes the same folder with random
weights (tests). ``assets/models/toy-gpm`` is a general preference model on the same body
(:mod:`diffalign.rewards.general_preference`), trained on ``toy:text_pairs`` by ``python scripts/train_gpm.py
--data toy:text_pairs --base assets/models/toy-lm --out assets/models/toy-gpm``. ``assets/models/toy-lm-student``
holds only the configuration and tokenizer of a smaller student (:func:`toy_student_config`), which
``configs/toy_lm_distill.yaml`` builds with random weights and distils from the toy LM.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.paths import ASSETS
from diffalign.toy.text_world import EOS, PAD, UNK, vocabulary

TOY_LM = ASSETS / "models" / "toy-lm"
TOY_GPM = ASSETS / "models" / "toy-gpm"
TOY_STUDENT = ASSETS / "models" / "toy-lm-student"  # config and tokenizer only: built with model.random_init


def toy_tokenizer():
    """A word-level fast tokenizer over :func:`~diffalign.toy.text_world.vocabulary`, EOS ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def toy_lm_config():
    """The architecture: 2 layers, width 64, 4 heads, 24 positions (a prompt and a sentence are 15 words)."""
    from transformers import GPT2Config

    words = vocabulary()
    return GPT2Config(vocab_size=len(words), n_positions=24, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=words.index(EOS), eos_token_id=words.index(EOS), pad_token_id=words.index(PAD),
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def toy_student_config():
    """A smaller architecture for distillation from the toy LM: 1 layer, width 32, 2 heads, the same vocabulary."""
    config = toy_lm_config()
    config.n_embd, config.n_layer, config.n_head = 32, 1, 2
    return config


def write_toy_lm(folder: Path, seed: int = 0) -> Path:
    """Write the toy LM's folder (config, tokenizer, seeded random weights) to ``folder``; returns it."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(toy_lm_config()).save_pretrained(str(folder))
    toy_tokenizer().save_pretrained(str(folder))
    return folder
