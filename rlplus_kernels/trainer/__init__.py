"""Train a Hugging Face ``transformers`` causal LM with RL-PLUS, without computing its logits.

``transformers`` itself is never imported here: models are handled through their own methods
(``get_output_embeddings``, ``base_model_prefix``), so ``import rlplus_kernels.trainer`` works
without it. Install the ``train`` extra to build models.
"""

from .batch import GroupBatch, build_group_batch
from .loss import rlplus_model_loss, score_logprobs, target_mask
from .model_head import check_plain_linear_head, disable_dropout, final_hidden_states, get_lm_head, verify_head
from .trainer import RLPlusTrainer

__all__ = ["rlplus_model_loss", "score_logprobs", "RLPlusTrainer", "GroupBatch",
           "build_group_batch", "check_plain_linear_head", "verify_head", "final_hidden_states",
           "get_lm_head", "target_mask", "disable_dropout"]
