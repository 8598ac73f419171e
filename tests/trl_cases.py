"""The DPO loss types that TRL implements, as (TRL's name, diffalign's loss and options): the parity cases
shared by the loss-level and the trainer-level TRL tests."""

from __future__ import annotations

# (TRL loss_type, TRL kwargs, diffalign name, diffalign options)
CASES = [
    ("sigmoid", {}, "dpo", {}),
    ("hinge", {}, "hinge", {}),
    ("ipo", {}, "ipo", {}),
    ("exo_pair", {"label_smoothing": 1e-3}, "exo", {"label_smoothing": 1e-3}),
    ("nca_pair", {}, "nca", {}),
    ("robust", {"label_smoothing": 0.2}, "robust", {"label_smoothing": 0.2}),
    ("bco_pair", {}, "bco_pair", {}),
    ("sppo_hard", {}, "sppo_hard", {}),
    ("apo_zero", {}, "apo_zero", {}),
    ("apo_down", {}, "apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}, "discopop", {"tau": 0.05}),
    ("sigmoid_norm", {}, "dpo_norm", {}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}, "f_dpo", {"divergence": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}, "f_dpo", {"divergence": "js"}),
    (
        "sigmoid",
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        "f_dpo",
        {"divergence": "alpha", "alpha": 0.3},
    ),
    ("sigmoid", {"f_divergence_type": "reverse_kl"}, "f_dpo", {"divergence": "reverse_kl"}),
]


BATCH_COUPLED = [("aot", "aot"), ("aot_unpaired", "aot_unpaired")]
