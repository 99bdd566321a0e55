"""The networks of the PPO stage, loaded from stage checkpoints with dropout switched off.

- policy and reference: the same SFT (or PPO) checkpoint; the reference is frozen (:func:`policy_and_reference`,
  meant for every stage that trains against a reference). A LoRA policy (Hugging Face backbone with a peft adapter)
  has no second copy: the checkpoint's adapter is merged into the base weights, a fresh adapter trains on top, and
  the reference is the policy with that fresh adapter disabled (``models.hf.reference_of``), i.e. exactly the SFT
  model (not the pretrained base: KL is 0 and the ratio 1 at the first minibatch). The PPO checkpoint then stores the
  merged base weights and the PPO adapter under the same names and spec, so ``generate``, ``export`` and resume
  rebuild the PPO policy,
- reward model: a reward checkpoint (frozen, with its stored score mean/std for normalisation). It may use another
  tokenizer than the policy (e.g. a Hugging Face reward model): then ``reward_tokenizer`` is set and the scorer
  re-renders each decoded response with the reward model's template before scoring (``stages/rewards.py``),
- critic: its own copy of ``value_from``'s backbone (the reward model by default) and, when that is a reward
  checkpoint, a value head initialised from the reward head (separate weights; ``PPOModule`` then folds the score
  normalisation into it, ``stages/score_calibration.py``); or, with
  ``share_value_trunk``, a fresh value head on the policy's trunk.

Dropout: every dropout rate in the stored architecture (``dropout``, ``attn_dropout``, ...) is set to 0 before the
network is built, and any ``nn.Dropout`` or attention dropout rate left in the built network is zeroed too, so the
first minibatch of each PPO iteration sees ratio == 1 exactly even in train mode (PPO checklist, "Dropout off in
policy, reference, value and reward models"). Split out of ``stages/ppo.py`` to keep that file about the algorithm.

Frozen networks (:func:`freeze`): eval mode, ``requires_grad`` False, never in an optimizer (``PPOModule`` gives its
optimizers the policy's and the critic's parameters only) and left out of PPO checkpoints (rebuilt from
``policy_from`` / ``reward_from``). Under ``bf16-mixed`` precision (:func:`cast_frozen_for_precision`):

- the reward model's backbone is stored in bfloat16 (half the memory; its matmuls run in bf16 under autocast
  anyway), while its scalar head and score statistics stay float32 so a score is not rounded to bf16's three
  significant digits;
- the reference deliberately stays in the policy's dtype (float32). Autocast runs the policy's matmuls in bf16 but
  keeps its embeddings, residual stream and norms in float32; a bf16 reference would round those too, so its
  log-probs of the very same weights would differ from the policy's and KL would not be 0 at the first iteration
  (``tests/test_ppo_frozen.py`` checks KL == 0 at step 0 under bf16 autocast). A LoRA reference is the policy
  itself with the adapter off and has no weights of its own to cast.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf_lightning.models.factory import model_from_spec
from rlhf_lightning.models.heads import RewardModel, ValueModel
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_checkpoint, submodule_state
from rlhf_lightning.stages.reward import reward_model_from_checkpoint
from rlhf_lightning.stages.tokenizer_link import reconcile_tokenizers, same_tokenizer, tokenizer_from_payload

log = logging.getLogger(__name__)


def no_dropout_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored ``model_spec`` with every ``*dropout*`` rate set to 0."""
    spec = copy.deepcopy(spec)
    config = spec.get("config", {})
    for key in config:
        if "dropout" in key and config[key] is not None:
            config[key] = 0.0
    return spec


def disable_dropout(module: nn.Module) -> nn.Module:
    """Zero every dropout rate inside ``module`` (``nn.Dropout`` layers and float ``attn_dropout`` attributes)."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.p = 0.0
        if isinstance(getattr(sub, "attn_dropout", None), float):
            sub.attn_dropout = 0.0
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _backbone(spec: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
    """A stored backbone with dropout off; ``trust_remote_code`` is the user's flag (never the spec's)."""
    return disable_dropout(model_from_spec(no_dropout_spec(spec), trust_remote_code=trust_remote_code))


def policy_and_reference(
    spec: dict[str, Any], state: dict[str, Any], trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """A trainable policy and its frozen reference, both the network ``spec`` with weights ``state``, dropout off.

    A LoRA policy gets no second copy: its adapter is merged and restarted and the reference is the policy with the
    fresh adapter disabled (``models.hf.reference_of``); any other policy gets a frozen copy as the reference.
    """
    policy = _backbone(spec, trust_remote_code)
    policy.load_state_dict(state)
    if getattr(policy, "is_lora", False):
        from rlhf_lightning.models.hf import reference_of

        reference = reference_of(policy)
        disable_dropout(policy)  # the fresh adapter has the spec's lora dropout again
        return policy, reference
    reference = freeze(_backbone(spec, trust_remote_code))
    reference.load_state_dict(state)
    return policy, reference


def cast_frozen_for_precision(reward_model: nn.Module | None, precision: str | None) -> None:
    """Under ``bf16-mixed`` store the frozen reward model's backbone in bfloat16, its head and score statistics
    left in float32 (see the module docstring; the reference keeps the policy's dtype). Other precisions: no-op."""
    if reward_model is None or str(precision) != "bf16-mixed":
        return
    reward_model.backbone.to(torch.bfloat16)


@dataclass
class PPONetworks:
    """What :func:`load_networks` returns."""

    policy: nn.Module
    reference: nn.Module
    reward_model: RewardModel | None
    value_model: ValueModel | None  # None when ``value_from`` is None (critic-free stages: GRPO/RLOO)
    tokenizer: Any
    reward_tokenizer: Any = None  # set only when the reward model's tokenizer differs from the policy's
    critic_from_reward_head: bool = False  # the value head is a copy of the reward head (raw score scale)


def load_networks(
    policy_from: str,
    reward_from: str | None,
    value_from: str | None,
    share_value_trunk: bool,
    provided_tokenizer: Any,
    trust_remote_code: bool = False,
) -> PPONetworks:
    """Build the policy, reference, reward model and critic (see the module docstring); no critic when
    ``value_from`` is None. ``trust_remote_code`` is the user's flag for Hugging Face backbones that need their
    folder's own code; a stored one is never honoured."""
    backbone_of = functools.partial(_backbone, trust_remote_code=trust_remote_code)
    loaded: dict[str, dict[str, Any]] = {}

    def checkpoint(
        path: str,
    ) -> dict[str, Any]:  # the critic often starts from the reward (or SFT) checkpoint
        if path not in loaded:
            loaded[path] = load_checkpoint(path)
        return loaded[path]

    sft = checkpoint(policy_from)
    payload = sft[PAYLOAD_KEY]
    policy_state = submodule_state(
        sft["state_dict"], payload.get("policy_prefix", payload["backbone_prefix"])
    )
    policy, reference = policy_and_reference(payload["model_spec"], policy_state, trust_remote_code)
    tokenizer = reconcile_tokenizers(provided_tokenizer, tokenizer_from_payload(payload), policy_from)

    reward_model, reward_tokenizer = None, None
    if reward_from is not None:
        reward_ckpt = checkpoint(reward_from)
        reward_model = freeze(
            reward_model_from_checkpoint(reward_ckpt, f"reward_from={reward_from}", backbone_of)
        )
        stored = tokenizer_from_payload(reward_ckpt[PAYLOAD_KEY])
        if stored is not None and not same_tokenizer(tokenizer, stored):
            reward_tokenizer = (
                stored  # scored after decoding and re-tokenising with the reward model's template
            )

    if not share_value_trunk and reward_tokenizer is not None and value_from == reward_from:
        # the critic reads the policy's tokens: a reward model with another vocabulary cannot be its trunk
        log.warning(
            "the reward model uses another tokenizer than the policy: the critic starts from the policy"
        )
        value_from = policy_from
    critic_from_reward_head = False
    if value_from is None:
        value_model = None
    elif share_value_trunk:
        value_model = ValueModel(policy)
    else:
        value_ckpt = checkpoint(value_from)
        value_payload = value_ckpt[PAYLOAD_KEY]
        backbone = backbone_of(value_payload["model_spec"])
        backbone.load_state_dict(submodule_state(value_ckpt["state_dict"], value_payload["backbone_prefix"]))
        value_model = ValueModel(backbone)
        if value_payload["stage"] == "reward":  # start the value head from the reward head (raw score scale)
            head = submodule_state(value_ckpt["state_dict"], value_payload["reward_prefix"] + "head.")
            value_model.head.load_state_dict(head)
            critic_from_reward_head = True
    return PPONetworks(
        policy, reference, reward_model, value_model, tokenizer, reward_tokenizer, critic_from_reward_head
    )


__all__ = [
    "PPONetworks",
    "cast_frozen_for_precision",
    "disable_dropout",
    "freeze",
    "load_networks",
    "no_dropout_spec",
    "policy_and_reference",
]
