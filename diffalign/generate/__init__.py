"""Synthetic preference data: prompts x generators x seeds, scored by reward models (``diffalign generate-ranked``)."""

from diffalign.generate.config import GenerateConfig, GeneratorConfig
from diffalign.generate.ranked import generate_ranked

__all__ = ["GenerateConfig", "GeneratorConfig", "generate_ranked"]
