"""Where batches become losses: pure functions of per-token or per-sequence log-probabilities."""

from alignkit.losses.dpo import pair_losses
from alignkit.losses.logprobs import token_logprobs
from alignkit.losses.reward import bradley_terry_loss
from alignkit.losses.sft import mean_nll

__all__ = ["bradley_terry_loss", "pair_losses", "mean_nll", "token_logprobs"]
