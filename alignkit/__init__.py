"""alignkit: supervised fine-tuning and preference optimisation for language models.

Folders, in the order data flows: `data/` (files → batches), `losses/` (batches → losses),
`training/` (losses → updates, checkpoints, metrics), `recipes/` (one file per training method),
`models/` (where weights come from), `cli.py` and `api.py` (how users start a run).
"""

from alignkit.api import dpo, kto, orpo, rm, sft
from alignkit.config import DPOConfig, KTOConfig, ORPOConfig, RMConfig, SFTConfig
from alignkit.errors import UserError

__version__ = "0.1.0"
__all__ = ["DPOConfig", "KTOConfig", "ORPOConfig", "RMConfig", "SFTConfig", "UserError", "__version__", "dpo",
           "kto", "orpo", "rm", "sft"]
