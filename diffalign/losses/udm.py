"""BCO's underlying distribution matching (Jung et al. 2024, "Binary Classifier Optimization for Large Language
Model Alignment", arXiv 2404.04656, Sec. 3.3): when the desirable and undesirable examples come from different
prompt distributions, each undesirable example is weighted by the density ratio p(x | desirable) / p(x |
undesirable) of its prompt, estimated by a classifier between the two groups' prompt embeddings:
w = P(desirable | x) / (1 - P(desirable | x)), clipped (:func:`diffalign.losses.unpaired.udm_weights`).

The classifier is TRL's (``BCOTrainer``: scikit-learn's ``LogisticRegression(class_weight="balanced")``, fitted
once before training on up to ``prompt_sample_size`` = 1024 prompts of each group), fitted here in torch: L2-regularised
logistic regression with C = 1 and balanced class weights, minimised to convergence with L-BFGS, so it needs no
scikit-learn and gives the same optimum.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class UDMClassifier:
    """P(desirable | prompt embedding), fitted by :meth:`fit`; its weights go into the checkpoints."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None
        self.bias = torch.zeros(())

    def fit(self, desirable: Tensor, undesirable: Tensor, c: float = 1.0, max_iter: int = 500) -> "UDMClassifier":
        """Minimise 0.5 |w|^2 + C sum_i s_i log(1 + exp(-y_i (w x_i + b))) over (N, D) embeddings of each group,
        s_i = N / (2 N_class) (scikit-learn's balanced weights), the bias not regularised."""
        x = torch.cat([desirable, undesirable]).double()
        y = torch.cat([torch.ones(len(desirable)), -torch.ones(len(undesirable))]).double()
        s = torch.where(y > 0, len(x) / (2 * len(desirable)), len(x) / (2 * len(undesirable)))
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def objective() -> Tensor:
            optimizer.zero_grad()
            loss = 0.5 * (w * w).sum() + c * (s * torch.nn.functional.softplus(-y * (x @ w + b))).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        self.weight, self.bias = w.detach().float(), b.detach().float()
        return self

    def prob_desirable(self, embeddings: Tensor) -> Tensor:
        """(N,) P(desirable | x) of (N, D) prompt embeddings."""
        if self.weight is None:
            raise RuntimeError("the UDM classifier is used before it was fitted")
        return torch.sigmoid(embeddings.float() @ self.weight.to(embeddings.device) + self.bias.to(embeddings.device))

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        self.weight, self.bias = state["weight"], state["bias"]
