"""Where batches become losses: pure functions of per-token or per-sequence log-probabilities."""

from alignkit.losses.dpo import pair_losses
from alignkit.losses.logprobs import token_logprobs
from alignkit.losses.sft import sft_loss

__all__ = ["pair_losses", "sft_loss", "token_logprobs"]
