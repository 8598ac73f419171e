"""What a run keeps besides accelerate's checkpoint files, in formats that cannot run code, and checks that
nothing non-finite is reported or saved as a result.

accelerate checkpoints objects registered with ``register_for_checkpointing`` as
``custom_checkpoint_N.pkl`` and reads them back with ``torch.load(weights_only=False)``: a file planted
in a checkpoint folder then runs its code on resume. diffalign's own state (the EMA of the weights, an
objective's shadow weights and running statistics) goes instead into one safetensors file, its tensors
as tensors and everything else as JSON in the file's metadata (:class:`ExtraState`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from diffalign.errors import UserError
from diffalign.sharded import local
from diffalign.train.fsdp2 import gathered, sharded_like

STATE_FILE = "diffalign_state.safetensors"
# the only pickles a checkpoint may hold: accelerate's RNG states, which it reads with weights_only=True
ALLOWED_PICKLES = re.compile(r"random_states_\d+\.pkl")


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, each tensor replaced by ``{"tensor": key}`` and stored in ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": {str(k): _flatten(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_flatten(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot keep a {type(value).__name__} in a checkpoint's state")


def _unflatten(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_unflatten(v, tensors) for v in node["list"]]
    return node["value"]


class ExtraState:
    """Named objects with ``state_dict``/``load_state_dict`` (the EMA, an objective's state), saved with every
    checkpoint into :data:`STATE_FILE` and restored on resume."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        self.objects[name] = obj

    def save(self, folder: Path, write: bool = True) -> None:
        """Every process calls it (sharded state, an EMA of FSDP2-sharded weights, is gathered whole by all); the
        process with ``write`` writes the file."""
        if not self.objects:
            return
        states = {name: gathered(obj.state_dict()) for name, obj in self.objects.items()}
        if not write:
            return
        tensors: dict[str, torch.Tensor] = {}
        skeleton = {name: _flatten(state, tensors) for name, state in states.items()}
        save_file(tensors, str(folder / STATE_FILE), metadata={"state": json.dumps(skeleton)})

    def load(self, folder: Path) -> None:
        if not self.objects:
            return
        path = folder / STATE_FILE
        if not path.is_file():
            raise UserError(f"{folder} holds no {STATE_FILE} (the EMA or the objective's own state this run keeps): it "
                            "was written by a run with other settings, or by a diffalign before 0.1 that kept that "
                            "state as a pickle; resume from a checkpoint of this run's settings")
        saved = read_state(folder)
        for name, obj in self.objects.items():
            if name not in saved:
                raise UserError(f"{path} holds no state for {name}; resume with the settings of the run that wrote it")
            obj.load_state_dict(sharded_like(saved[name], obj.state_dict()))  # whole tensors, sharded as the live ones


def read_state(folder: Path) -> dict[str, Any]:
    """The state a checkpoint folder keeps beside accelerate's files, by name ("ema", "objective_0", ...), as the
    objects' ``state_dict`` gave it."""
    path = folder / STATE_FILE
    with safe_open(str(path), "pt") as f:
        skeleton = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    return {name: _unflatten(node, tensors) for name, node in skeleton.items()}


def refuse_pickles(folder: Path) -> None:
    """A checkpoint folder holding a pickle other than accelerate's RNG states is refused before anything in it is
    read: diffalign writes none, and loading one could run code that was put there."""
    planted = sorted(p.name for p in folder.rglob("*.pkl") if not ALLOWED_PICKLES.fullmatch(p.name))
    if planted:
        raise UserError(f"checkpoint {folder} holds {', '.join(planted)}, which diffalign never writes (its state is "
                        "safetensors and JSON) and will not read: a pickle can run code when loaded. Remove the file if "
                        "you know where it came from, or resume from another checkpoint")


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor (no host sync): whether every value of ``tensors`` is finite. The max-norm, so huge finite
    values do not overflow into a false alarm as a sum of squares would."""
    # a sharded tensor: this process's shard, which may be empty (the callers agree over all processes)
    tensors = [part for part in map(local, tensors) if part.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf, foreach=True))


def json_safe(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every NaN or infinity replaced by None (JSON has no such numbers), and the dotted keys of the
    values replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "value"]
    if isinstance(value, dict):
        out, replaced = {}, []
        for key, item in value.items():
            out[key], more = json_safe(item, f"{path}.{key}" if path else str(key))
            replaced += more
        return out, replaced
    if isinstance(value, (list, tuple)):
        pairs = [json_safe(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return [v for v, _ in pairs], [k for _, keys in pairs for k in keys]
    return value, []
