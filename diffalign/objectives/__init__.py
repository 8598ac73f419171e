"""One file per method: likelihood proxy + core loss. ``OBJECTIVES`` maps config names to them."""

from diffalign.objectives.diffusion_dpo import DiffusionDPO

OBJECTIVES = {
    "diffusion_dpo": DiffusionDPO,
}

__all__ = ["OBJECTIVES", "DiffusionDPO"]
