"""The toy text world: a procedural language small enough for a tiny causal LM to learn on a CPU.

A prompt names an animal and its colour ("describe the red fox :"); a well-formed completion is one
sentence of the grammar

    the <colour> <animal> is <mood> and <verb> <adverb> .

The prompt fixes the colour and the animal; the mood, verb and adverb are free, and that freedom is
what the toy preference acts on, as the image world's preference acts on size and position:
:func:`preference_score` is the mood's valence (joyful 1.0 ... angry -1.0). A separate judge,
:func:`judge_score`, scores correctness and fluency: 1 for a grammatical sentence that names the
prompt's colour and animal, 0.5 for a grammatical one that names another, 0 for anything else. An
aligned model should raise the preference while the judge score holds.

The base corpus (:func:`base_completion`, what ``scripts/train_toy_lm.py`` trains the shipped model on)
names the prompt's colour and animal 85% of the time each, draws mood, verb and adverb uniformly and
garbles one sentence in twenty (a repeated or dropped word), so the base model makes the mistakes
that the judge catches.
"""

from __future__ import annotations

import random

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
ANIMALS = ("fox", "cat", "owl", "bear", "frog", "deer")
MOODS = {"joyful": 1.0, "happy": 0.6, "calm": 0.2, "bored": -0.2, "sad": -0.6, "angry": -1.0}
VERBS = ("runs", "sleeps", "sings", "jumps")
ADVERBS = ("slowly", "quickly", "quietly", "loudly")
GLUE = ("describe", "the", ":", "is", "and", ".")
EOS, PAD, UNK = "</s>", "<pad>", "<unk>"
# prompts never used for the demo's training pairs; evaluation runs on these
HELDOUT = (("red", "owl"), ("blue", "deer"), ("green", "fox"), ("yellow", "bear"), ("purple", "cat"),
           ("orange", "frog"))
MATCH = 0.85  # how often the base corpus names the prompt's colour (and, apart, its animal)
GARBLED = 0.05  # share of base sentences with a repeated or dropped word


def vocabulary() -> list[str]:
    """Every word of the language, special tokens first (ids 0, 1, 2)."""
    return [PAD, EOS, UNK, *GLUE, *COLOURS, *ANIMALS, *MOODS, *VERBS, *ADVERBS]


def prompt(colour: str, animal: str) -> str:
    return f"describe the {colour} {animal} :"


def prompts(split: str = "all") -> list[str]:
    """``train`` (the demo's pairs), ``heldout`` (evaluation) or ``all`` prompts."""
    pairs = [(c, a) for c in COLOURS for a in ANIMALS]
    if split == "heldout":
        pairs = [p for p in pairs if p in HELDOUT]
    elif split == "train":
        pairs = [p for p in pairs if p not in HELDOUT]
    elif split != "all":
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    return [prompt(c, a) for c, a in pairs]


def parse_prompt(text: str) -> tuple[str, str] | None:
    """(colour, animal) a prompt names, or None."""
    words = text.split()
    colours, animals = [w for w in words if w in COLOURS], [w for w in words if w in ANIMALS]
    return (colours[0], animals[0]) if colours and animals else None


def sentence(colour: str, animal: str, mood: str, verb: str, adverb: str) -> str:
    return f" the {colour} {animal} is {mood} and {verb} {adverb} ."


def base_completion(rng: random.Random, colour: str, animal: str) -> str:
    """One completion of the base corpus for the prompt naming ``colour`` and ``animal``; see the module docstring."""
    colour = colour if rng.random() < MATCH else rng.choice([c for c in COLOURS if c != colour])
    animal = animal if rng.random() < MATCH else rng.choice([a for a in ANIMALS if a != animal])
    words = sentence(colour, animal, rng.choice(list(MOODS)), rng.choice(VERBS), rng.choice(ADVERBS)).split()
    if rng.random() < GARBLED:
        i = rng.randrange(1, len(words) - 1)
        words = words[:i] + words[i + 1:] if rng.random() < 0.5 else words[:i] + [words[i]] + words[i:]
    return " " + " ".join(words)


def grammatical(completion: str) -> bool:
    """Whether the completion is exactly one sentence of the grammar (module docstring)."""
    words = completion.replace(EOS, " ").split()
    slots = (("the",), COLOURS, ANIMALS, ("is",), tuple(MOODS), ("and",), VERBS, ADVERBS, (".",))
    return len(words) == len(slots) and all(word in allowed for word, allowed in zip(words, slots))


def preference_score(completion: str) -> float:
    """The toy preference: the valence of the first mood word the completion uses (0 with none)."""
    for word in completion.replace(EOS, " ").split():
        if word in MOODS:
            return MOODS[word]
    return 0.0


def judge_score(completion: str, prompt_text: str) -> float:
    """The judge: 1 grammatical and naming the prompt's colour and animal, 0.5 grammatical naming others, else 0."""
    if not grammatical(completion):
        return 0.0
    words = completion.split()
    return 1.0 if (words[1], words[2]) == parse_prompt(prompt_text) else 0.5
