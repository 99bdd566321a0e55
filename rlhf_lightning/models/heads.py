"""Scalar heads: reward model and value model = backbone + ``Linear(D, 1)``.

The reward model reads its score at the last real token of prompt + response (Ziegler et al., 2019, "Fine-Tuning
Language Models from Human Preferences"; Huang et al., 2024, "The N+ Implementation Details of RLHF with PPO"), found
from the attention mask by position arithmetic so it is right for left and right padding alike. The head starts small
(weight std 1/sqrt(D + 1), bias 0) so that early scores sit near 0, and the model keeps ``score_mean``/``score_std``
buffers (saved with the checkpoint) to normalise rewards to ~N(0, 1) for PPO.

A backbone is anything with ``hidden_states(input_ids, attention_mask, position_ids) -> (B, T, D)``; D comes from
``hidden_size`` or else ``backbone.config.n_embd`` (so Hugging Face adapters can plug in by passing ``hidden_size``).

Deliberate deviation from docs/ARCHITECTURE.md: the normalisation statistics are two buffers, ``score_mean`` and
``score_std``, rather than one ``score_stats`` buffer; the ``score_stats`` property returns them as a pair.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rlhf_lightning.functional.prefix_sharing import share_pair_prefix

__all__ = ["RewardModel", "ScalarHead", "ValueModel", "last_token_index"]


class ScalarHead(nn.Module):
    """``Linear(d, 1)`` with weight ~ N(0, 1/(d + 1)) and zero bias; (..., D) -> (...)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(d + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (...) in the head's dtype."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last True in each row of ``attention_mask`` (B, T) -> (B,) long; 0 for an all-False row.

    ``max(t * mask[t])`` is correct for left padding, right padding and holes alike.
    """
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device)
    return (positions * attention_mask.bool()).amax(-1)


def _hidden_size(backbone: nn.Module, hidden_size: int | None) -> int:
    if hidden_size is not None:
        return hidden_size
    config = getattr(backbone, "config", None)
    for name in ("n_embd", "hidden_size"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ValueError("cannot infer the backbone's hidden size: pass hidden_size=")


class RewardModel(nn.Module):
    """Backbone + scalar head scored at the last real token: forward(input_ids, attention_mask) -> (B,)."""

    score_mean: Tensor
    score_std: Tensor

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ScalarHead(_hidden_size(backbone, hidden_size))
        # Bradley-Terry is shift-invariant: the bias gets no gradient, and Adam would turn rounding noise into
        # lr-sized drift. Frozen at 0 it also exports cleanly as a bias-free sequence-classification head.
        self.head.linear.bias.requires_grad_(False)
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        share_prompt: bool = False,
    ) -> Tensor:
        """input_ids (B, T) long, attention_mask (B, T) bool -> raw scores (B,) (not normalised).

        Packed (``cu_seqlens`` (D + 1,), a (1, N) row of D documents, ``data.collate.pack_sequences``): scores (D,),
        each document read at its own last token ``cu_seqlens[d + 1] - 1``.

        ``share_prompt``: the rows are pairs (rows [0, B/2) chosen, [B/2, B) rejected, right-padded); each pair runs
        as one row whose common prefix is computed once (``functional.prefix_sharing``), same scores. Falls back to
        one row per sequence when the backbone takes no (B, 1, T, T) mask (``accepts_4d_mask``), the rows are not
        right-padded, or sharing would save under 10 % of the padded cells."""
        if share_prompt and cu_seqlens is None and getattr(self.backbone, "accepts_4d_mask", False):
            shared = share_pair_prefix(input_ids, attention_mask, position_ids)
            if shared is not None:
                hidden = self.backbone.hidden_states(
                    shared.input_ids, shared.attention_mask(), shared.position_ids
                )  # (B/2, W, D)
                pairs = torch.arange(hidden.shape[0], device=hidden.device)
                rows = torch.cat([pairs, pairs])
                cols = torch.cat([shared.chosen_last, shared.rejected_last]).to(hidden.device)
                return self.head(hidden[rows, cols])  # (B,) chosen first, as the rows came
        if cu_seqlens is not None:
            hidden = self.backbone.hidden_states(
                input_ids, attention_mask, position_ids, cu_seqlens=cu_seqlens
            )  # (1, N, D)
            return self.head(hidden[0, cu_seqlens[1:].to(hidden.device).long() - 1])  # (D,)
        hidden = self.backbone.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, D)
        idx = last_token_index(attention_mask)  # (B,)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, D)
        return self.head(last)

    @property
    def score_stats(self) -> tuple[Tensor, Tensor]:
        """(mean, std) used by :meth:`normalize`."""
        return self.score_mean, self.score_std

    @torch.no_grad()
    def set_score_stats(self, mean: float | Tensor, std: float | Tensor) -> None:
        """Record the score statistics (e.g. measured on reference-policy samples); ``std`` must be > 0."""
        std = torch.as_tensor(std, dtype=self.score_std.dtype)
        if not bool(std > 0):
            raise ValueError(f"score std must be > 0, got {float(std)}")
        self.score_mean.fill_(torch.as_tensor(mean).item())
        self.score_std.fill_(std.item())

    def normalize(self, scores: Tensor) -> Tensor:
        """(scores - score_mean) / score_std, any shape."""
        return (scores - self.score_mean) / self.score_std


class ValueModel(nn.Module):
    """Backbone + scalar head on every position: forward(input_ids, attention_mask) -> values (B, T)."""

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ScalarHead(_hidden_size(backbone, hidden_size))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) long, attention_mask (B, T) bool -> values (B, T) (garbage on padding; mask it)."""
        return self.head(self.backbone.hidden_states(input_ids, attention_mask, position_ids))
