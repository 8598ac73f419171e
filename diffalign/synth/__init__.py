"""Synthetic preference data (``diffalign generate-ranked``): prompts x generators x seeds, scored by reward models."""

from diffalign.synth.config import GenerateConfig, GeneratorConfig
from diffalign.synth.ranked import generate_ranked

__all__ = ["GenerateConfig", "GeneratorConfig", "generate_ranked"]
