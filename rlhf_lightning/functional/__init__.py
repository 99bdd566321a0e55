"""Pure tensor math for RLHF: torch only, no lightning, no transformers, nothing else of the package.

Shapes follow B batch, P prompt length, R response length, T = P + R, V vocabulary. Every ``*_mask`` is bool and
True means "this token counts". Each loss returns ``(loss, stats)`` with detached stats.
"""

from .advantages import RunningMoments, gae, group_relative_advantages, rloo_advantages
from .kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3, kl_penalized_rewards
from .logprobs import (
    TruncatedResponse,
    entropy_from_logits,
    logprobs_from_logits,
    response_logprobs,
    sequence_lengths_to_mask,
    truncate_after_eos,
)
from .losses import (
    dpo_loss,
    entropy_bonus,
    entropy_loss,
    ipo_loss,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    token_nll_loss,
)
from .masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "TruncatedResponse",
    "dpo_loss",
    "entropy_bonus",
    "entropy_from_logits",
    "entropy_loss",
    "gae",
    "group_relative_advantages",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_logprobs",
    "rloo_advantages",
    "sequence_lengths_to_mask",
    "sft_loss",
    "token_nll_loss",
    "truncate_after_eos",
]
