"""Shared PPO test probes (tests/ is on sys.path under pytest): mixed-length replies, one seeded rollout, and the
module's own optimizers attached so ``_update`` runs without a Trainer."""

from __future__ import annotations

from pathlib import Path

import torch


def save_stage_checkpoint(module, path: Path) -> str:
    """A stage module's checkpoint as the Trainer writes it (state dict, hyper-parameters, its payload)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


class EOSBias(torch.nn.Module):
    """LM head + a constant on the EOS logit: responses of mixed lengths (some stop, some hit the limit)."""

    def __init__(self, head: torch.nn.Module, eos: int, bias: float) -> None:
        super().__init__()
        self.head, self.eos, self.bias = head, eos, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits + self.bias * torch.nn.functional.one_hot(torch.tensor(self.eos), logits.shape[-1])


def mixed_lengths(module, bias: float):
    """Bias the policy's and the reference's EOS logit by ``bias`` (the same function for both: KL stays 0)."""
    for net in (module.policy, module.reference):
        net.lm_head = EOSBias(net.lm_head, module.tokenizer.eos_id, bias)
    return module


def seeded_rollout(module, batch, seed: int = 0):
    module.generator.manual_seed(seed)
    rollout, _ = module._rollout(batch)
    return rollout


def attach_optimizers(module):
    """Run ``_update`` without a Trainer: the module's own optimizers and a plain backward."""
    optimizers = module.configure_optimizers()
    module.optimizers = lambda use_pl_optimizer=True: optimizers
    module.manual_backward = lambda loss: loss.backward()
    return optimizers
