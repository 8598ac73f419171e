"""One file per method: likelihood proxy + core loss. ``OBJECTIVES`` maps config names to them."""

from diffalign.objectives.alignprop import AlignProp
from diffalign.objectives.awm import AWM
from diffalign.objectives.d3po import D3PO
from diffalign.objectives.ddo import DDO
from diffalign.objectives.dgpo import DGPO
from diffalign.objectives.diffusion_dpo import DiffusionDPO
from diffalign.objectives.disco import DisCO
from diffalign.objectives.diffusion_distill import DiffusionDistill
from diffalign.objectives.diffusion_kto import DiffusionKTO
from diffalign.objectives.diffusion_sparse_po import DiffusionSparsePO
from diffalign.objectives.dno import DNO
from diffalign.objectives.draft import DRaFT
from diffalign.objectives.drift import DRIFT
from diffalign.objectives.gpo import GPO
from diffalign.objectives.grpo import FlowGRPO
from diffalign.objectives.grpo_guard import GRPOGuard
from diffalign.objectives.inpo import InPO
from diffalign.objectives.inpo_nash import INPONash
from diffalign.objectives.lm_disco import LanguageModelDisCO
from diffalign.objectives.lm_distill import LanguageModelDistill
from diffalign.objectives.lm_dno import LanguageModelDNO
from diffalign.objectives.lm_dpo import LanguageModelDPO
from diffalign.objectives.lm_drift import LanguageModelDRIFT
from diffalign.objectives.lm_gpo import LanguageModelGPO
from diffalign.objectives.lm_inpo import LanguageModelINPO
from diffalign.objectives.lm_kto import LanguageModelKTO
from diffalign.objectives.lm_online import LanguageModelOnline
from diffalign.objectives.lm_rank import LanguageModelRank
from diffalign.objectives.lm_rso import LanguageModelRSO
from diffalign.objectives.lm_sparse_po import LanguageModelSparsePO
from diffalign.objectives.lm_sppo import LanguageModelSPPO
from diffalign.objectives.nft import DiffusionNFT
from diffalign.objectives.rank_dpo import RankDPO
from diffalign.objectives.refl import ReFL
from diffalign.objectives.rso import RSO
from diffalign.objectives.self_npo import SelfNPO
from diffalign.objectives.smpo import SmPO
from diffalign.objectives.sppo import SPPO
from diffalign.objectives.tempflow_grpo import TempFlowGRPO

OBJECTIVES = {
    "alignprop": AlignProp,
    "awm": AWM,
    "d3po": D3PO,
    "ddo": DDO,
    "dgpo": DGPO,
    "diffusion_dpo": DiffusionDPO,
    "diffusion_distill": DiffusionDistill,
    "diffusion_kto": DiffusionKTO,
    "diffusion_sparse_po": DiffusionSparsePO,
    "disco": DisCO,
    "dno": DNO,
    "draft": DRaFT,
    "drift": DRIFT,
    "gpo": GPO,
    "grpo": FlowGRPO,
    "grpo_guard": GRPOGuard,
    "tempflow_grpo": TempFlowGRPO,
    "inpo": InPO,
    "inpo_nash": INPONash,
    "lm_disco": LanguageModelDisCO,
    "lm_distill": LanguageModelDistill,
    "lm_dno": LanguageModelDNO,
    "lm_dpo": LanguageModelDPO,
    "lm_drift": LanguageModelDRIFT,
    "lm_gpo": LanguageModelGPO,
    "lm_inpo": LanguageModelINPO,
    "lm_kto": LanguageModelKTO,
    "lm_online_dpo": LanguageModelOnline,
    "lm_rank": LanguageModelRank,
    "lm_rso": LanguageModelRSO,
    "lm_sparse_po": LanguageModelSparsePO,
    "lm_sppo": LanguageModelSPPO,
    "nft": DiffusionNFT,
    "rank_dpo": RankDPO,
    "refl": ReFL,
    "rso": RSO,
    "self_npo": SelfNPO,
    "smpo": SmPO,
    "sppo": SPPO,
}

__all__ = ["OBJECTIVES", "AWM", "AlignProp", "D3PO", "DDO", "DGPO", "DNO", "DRIFT", "DRaFT", "DiffusionDPO",
           "DiffusionDistill", "DiffusionKTO", "DiffusionNFT", "DisCO", "FlowGRPO", "GPO", "GRPOGuard", "TempFlowGRPO", "INPONash", "InPO",
           "LanguageModelDNO", "LanguageModelDPO", "LanguageModelINPO", "LanguageModelKTO", "LanguageModelOnline",
           "LanguageModelRank", "LanguageModelSPPO", "RSO", "RankDPO", "ReFL", "SelfNPO", "SmPO", "SPPO"]
