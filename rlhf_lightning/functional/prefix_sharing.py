"""Shared-prompt layout for preference pairs: the prompt of a (chosen, rejected) pair is run once, not twice.

A pair's two sequences start with the same tokens (the rendered prompt, and any reply tokens they share). Under
causal attention those tokens have the same hidden states in both sequences, so one row holding

    ``[shared prefix | chosen's own tokens | rejected's own tokens]``

scores both: chosen's tokens attend to the prefix and to themselves, rejected's tokens to the prefix and to
themselves (never to chosen's), and rejected's position ids continue from the prefix as in its own sequence. Chosen
is read at its last token, rejected at the row's last real token. Scores and gradients equal the two-row computation
(the prefix's gradient is the sum of both branches', as the shared computation graph gives it).

On the shipped HH-RLHF pairs with SmolLM2's tokenizer (max length 384) the rows hold 0.62x the tokens of the two
sequences (prompts are long and multi-turn; replies short).

Shapes: B pairs, T padded sequence length, W shared row width. Torch only.

Source: the "tree attention" / shared-prefix batching of speculative and multi-sample decoding (e.g. Miao et al.
2024, SpecInfer), applied to training on pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SharedPairs", "branch_causal_mask", "share_pair_prefix"]


class SharedPairs(NamedTuple):
    """B pairs in the shared-prompt layout."""

    input_ids: Tensor  # (B, W) long: prefix, chosen's own tokens, rejected's own tokens, then padding
    real: Tensor  # (B, W) bool: True on the row's real tokens
    position_ids: Tensor  # (B, W) long: each token's position in its own sequence
    branch: Tensor  # (B, W) long: 0 shared prefix, 1 chosen, 2 rejected (padding: 2)
    chosen_last: Tensor  # (B,) long: column of chosen's last token
    rejected_last: Tensor  # (B,) long: column of rejected's last token

    def attention_mask(self) -> Tensor:
        """(B, 1, W, W) bool, True where a query may attend to a key (:func:`branch_causal_mask`)."""
        return branch_causal_mask(self.branch, self.real)


def branch_causal_mask(branch: Tensor, real: Tensor) -> Tensor:
    """(B, W) branch ids (0 = shared prefix) and real-token mask -> (B, 1, W, W) bool attention mask.

    Query i may attend to key j if ``j <= i``, key j is real, and j is in the prefix or in i's own branch; and always
    to itself (so a padding query attends to something and its output stays finite; it is never read).
    """
    w = branch.shape[-1]
    idx = torch.arange(w, device=branch.device)
    causal = idx[None, :] <= idx[:, None]  # (W, W)
    key_branch = branch[:, None, :]  # (B, 1, W)
    same = (key_branch == 0) | (key_branch == branch[:, :, None])  # (B, W, W)
    allowed = causal & same & real[:, None, :].bool()
    allowed |= torch.eye(w, dtype=torch.bool, device=branch.device)
    return allowed[:, None]


def share_pair_prefix(
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None = None,
    min_saving: float = 0.1,
) -> SharedPairs | None:
    """Rewrite stacked pairs (rows [0, B) chosen, [B, 2B) rejected; (2B, T), right-padded) into the shared layout.

    The shared prefix is the pair's longest common prefix, cut so that each sequence keeps at least its last token
    of its own (where its score is read). ``position_ids`` (2B, T) are carried over (default: the column, as for
    right-padded rows).

    Returns None (use the two-row layout) when some row is not right-padded (left padding, holes) or empty, or when
    the shared rows would not save at least ``min_saving`` of the padded cells (B x W vs 2B x T).
    """
    rows, t = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(-1)  # (2B,)
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()) or not bool((lengths > 0).all()):
        return None
    b = rows // 2
    chosen, rejected = input_ids[:b], input_ids[b:]
    lc, lr = lengths[:b], lengths[b:]
    same = (chosen == rejected) & mask[:b] & mask[b:]  # (B, T)
    common = same.long().cumprod(-1).sum(-1)  # (B,) longest common prefix
    shared = torch.minimum(common, torch.minimum(lc, lr) - 1)  # each sequence keeps its last token
    width_each = lc + lr - shared  # (B,)
    width = int(width_each.max())
    if b * width > (1.0 - min_saving) * rows * t:
        return None
    col = torch.arange(width, device=input_ids.device)[None, :]  # (1, W)
    in_chosen = col < lc[:, None]  # (B, W)
    source = torch.where(in_chosen, col, col - lc[:, None] + shared[:, None]).clamp_(0, t - 1)  # (B, W)
    ids = torch.where(in_chosen, chosen.gather(1, source), rejected.gather(1, source))
    if position_ids is None:
        positions = source
    else:
        positions = torch.where(
            in_chosen, position_ids[:b].gather(1, source), position_ids[b:].gather(1, source)
        )
    branch = torch.where(col < shared[:, None], 0, torch.where(in_chosen, 1, 2))
    real = col < width_each[:, None]
    return SharedPairs(ids, real, positions, branch, lc - 1, width_each - 1)
