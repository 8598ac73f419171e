"""Stop an online run when it starts to game its reward: a held-out "gold" reward falls while the
training reward rises (reward hacking, flow_grpo #233; collapse, DanceGRPO #55), or the validation images drift
from the base's (:class:`DriftWatch`).

The gold reward is one of ``validation.rewards`` that the run does not train on, scored on the fixed
validation prompts at every validation; the training reward is the mean ``train_reward`` the online
objective logged since the previous validation (its round samples' rewards). After ``patience``
validations in a row at which gold fell and the training reward rose, the run stops, keeping the
checkpoint it saves then; the message names the validation step where gold was best, and the run's final weights
are that step's (the trainer keeps a copy of the trained weights at each watch's best step).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GoldWatch:
    """What the watch saw: (step, gold, training reward) at each validation, and the stopping rule."""

    reward: str
    patience: int = 2
    seen: list[tuple[int, float, float | None]] = field(default_factory=list)

    def observe(self, step: int, gold: float, train_reward: float | None) -> str | None:
        """Record one validation; a message saying why to stop, or None to go on."""
        self.seen.append((step, gold, train_reward))
        recent = self.seen[-(self.patience + 1):]
        if len(recent) <= self.patience:
            return None
        pairs = list(zip(recent, recent[1:]))
        gamed = all(after[1] < before[1] and before[2] is not None and after[2] is not None and after[2] > before[2]
                    for before, after in pairs)
        if not gamed:
            return None
        best_step, best_gold, _ = max(self.seen, key=lambda seen: seen[1])
        return (f"stopping at step {step}: the gold reward val_{self.reward} fell at {self.patience} validations in a "
                f"row ({' -> '.join(f'{g:.4f}' for _, g, _ in recent)}) while the training reward rose "
                f"({' -> '.join(f'{t:.4f}' for _, _, t in recent)}): the run is gaming its reward. Gold was best "
                f"({best_gold:.4f}) at step {best_step}.")

    @property
    def best_step(self) -> int | None:
        """The validation step where gold was highest (the first of equals)."""
        return max(self.seen, key=lambda seen: seen[1])[0] if self.seen else None

    def state(self) -> list[list[float | None]]:
        return [list(seen) for seen in self.seen]

    def load(self, state: list[list[float | None]]) -> None:
        self.seen = [(int(s), float(g), None if t is None else float(t)) for s, g, t in state]


@dataclass
class DriftWatch:
    """Stop when an image statistic of the validation samples (:mod:`diffalign.eval.image_stats`) moves further from
    its value at step 0, the base's, than its limit: ``limits`` maps statistic names to the largest change allowed
    (``validation.drift_limits``, e.g. ``{dark_share: 0.15}``). The best step is the last validation within every
    limit."""

    limits: dict[str, float]
    seen: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def _within(self, stats: dict[str, float]) -> bool:
        base = self.seen[0][1]
        return all(abs(stats[name] - base[name]) <= limit for name, limit in self.limits.items())

    def observe(self, step: int, stats: dict[str, float]) -> str | None:
        """Record one validation's statistics; a message saying why to stop, or None to go on."""
        self.seen.append((step, {name: float(stats[name]) for name in self.limits}))
        if self._within(self.seen[-1][1]):
            return None
        base = self.seen[0][1]
        moved = ", ".join(f"{name} {base[name]:.4f} -> {stats[name]:.4f} (limit +-{limit})"
                          for name, limit in self.limits.items() if abs(stats[name] - base[name]) > limit)
        return (f"stopping at step {step}: the validation images drifted from the base's beyond "
                f"validation.drift_limits: {moved}. The run is likely gaming its reward; the last step within every "
                f"limit was step {self.best_step}.")

    @property
    def best_step(self) -> int | None:
        """The last validation step within every limit."""
        within = [step for step, stats in self.seen if self._within(stats)]
        return within[-1] if within else None

    def state(self) -> list[list]:
        return [[step, stats] for step, stats in self.seen]

    def load(self, state: list[list]) -> None:
        self.seen = [(int(step), {name: float(v) for name, v in stats.items()}) for step, stats in state]
