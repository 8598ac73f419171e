"""Stop an online run when it starts to game its reward: a held-out "gold" reward falls while the
training reward rises (reward hacking, flow_grpo #233; collapse, DanceGRPO #55).

The gold reward is one of ``validation.rewards`` that the run does not train on, scored on the fixed
validation prompts at every validation; the training reward is the mean ``train_reward`` the online
objective logged since the previous validation (its round samples' rewards). After ``patience``
validations in a row at which gold fell and the training reward rose, the run stops, keeping the
checkpoint it saves then; the message names the validation step where gold was best, whose checkpoint
(``train.checkpoint_every``) is the one to keep.
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

    def state(self) -> list[list[float | None]]:
        return [list(seen) for seen in self.seen]

    def load(self, state: list[list[float | None]]) -> None:
        self.seen = [(int(s), float(g), None if t is None else float(t)) for s, g, t in state]
