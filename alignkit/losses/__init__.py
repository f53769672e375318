"""Where batches become losses: pure functions of per-token log-probabilities."""

from alignkit.losses.logprobs import token_logprobs
from alignkit.losses.sft import sft_loss

__all__ = ["sft_loss", "token_logprobs"]
