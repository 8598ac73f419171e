"""Text-LM target: sequence log-probs from causal-LM logits, and preference losses on them."""

from diffalign.lm.logprobs import ld_scores, sequence_logps, token_logps
from diffalign.lm.preference import completion_logps, preference_loss, ranked_preference_loss
from diffalign.lm.unpaired import mismatched_completions, unpaired_preference_loss

__all__ = ["completion_logps", "ld_scores", "mismatched_completions", "preference_loss", "ranked_preference_loss", "sequence_logps",
           "token_logps", "unpaired_preference_loss"]
