"""The dataset layouts diffalign trains on, by the names objectives give them (their ``dataset``); no imports, so
the command line lists them without loading a reader."""

# the layouts, as objectives name them in their ``dataset`` attribute, and what a row of each holds
LAYOUTS = {
    "pairs": "a prompt, two images and which one is preferred (Pick-a-Pic v2)",
    "ranked": "a prompt and a list of K images with a score each (RankDPO's Syn-Pic)",
    "images": "captioned images, one per row (Self-NPO, DDO's real images)",
    "labelled_images": "captioned images, each labelled desirable or not (Diffusion-KTO)",
    "text_pairs": "a prompt, a chosen and a rejected completion (TRL's preference format)",
    "text_unpaired": "a prompt, a completion and a desirable/undesirable label (TRL's KTO format)",
    "text_ranked": "a prompt and a list of completions, with scores or best first",
    "text_completions": "a prompt and a completion (TRL's prompt-completion format: what a student is distilled on)",
}
