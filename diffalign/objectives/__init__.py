"""One file per method: likelihood proxy + core loss. ``OBJECTIVES`` maps config names to them."""

from diffalign.objectives.d3po import D3PO
from diffalign.objectives.ddo import DDO
from diffalign.objectives.diffusion_dpo import DiffusionDPO
from diffalign.objectives.disco import DisCO
from diffalign.objectives.diffusion_kto import DiffusionKTO
from diffalign.objectives.grpo import FlowGRPO
from diffalign.objectives.inpo import InPO
from diffalign.objectives.nft import DiffusionNFT
from diffalign.objectives.rank_dpo import RankDPO
from diffalign.objectives.self_npo import SelfNPO
from diffalign.objectives.smpo import SmPO

OBJECTIVES = {
    "d3po": D3PO,
    "ddo": DDO,
    "diffusion_dpo": DiffusionDPO,
    "diffusion_kto": DiffusionKTO,
    "disco": DisCO,
    "grpo": FlowGRPO,
    "inpo": InPO,
    "nft": DiffusionNFT,
    "rank_dpo": RankDPO,
    "self_npo": SelfNPO,
    "smpo": SmPO,
}

__all__ = ["OBJECTIVES", "D3PO", "DDO", "DiffusionDPO", "DiffusionKTO", "DiffusionNFT", "DisCO", "FlowGRPO", "InPO", "RankDPO", "SelfNPO", "SmPO"]
