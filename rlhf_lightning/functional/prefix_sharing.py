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

The same layout serves online RL (GRPO, RLOO): the k replies sampled for one prompt become k branches of one row
``[prompt | reply 1 | ... | reply k]`` (:func:`share_group_prefix`), and each reply token's log-prob is read from the
hidden state just before it (the prompt's last token for its first token).

Source: the "tree attention" / shared-prefix batching of speculative and multi-sample decoding (e.g. Miao et al.
2024, SpecInfer), applied to training on pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .masked import is_left_padded, is_right_padded

__all__ = ["SharedGroups", "SharedPairs", "branch_causal_mask", "share_group_prefix", "share_pair_prefix"]


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
    if not is_right_padded(mask) or not bool((lengths > 0).all()):
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


class SharedGroups(NamedTuple):
    """Rollout rows with identical prompts gathered into one row each: ``[prompt | reply 1 | ... | reply k]``."""

    input_ids: Tensor  # (G, W) long
    real: Tensor  # (G, W) bool
    position_ids: Tensor  # (G, W) long: each token's position in its own sequence
    branch: Tensor  # (G, W) long: 0 prompt, j + 1 the group's j-th reply (padding: a branch of its own)
    predict_row: Tensor  # (N,) long: shared row of the hidden state that predicts each counted reply token
    predict_col: Tensor  # (N,) long: its column
    target_row: Tensor  # (N,) long: that token's row b in the (B, R) response grid
    target_col: Tensor  # (N,) long: its column t

    def attention_mask(self) -> Tensor:
        """(G, 1, W, W) bool (:func:`branch_causal_mask`)."""
        return branch_causal_mask(self.branch, self.real)


def share_group_prefix(
    query_ids: Tensor,
    query_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    min_saving: float = 0.1,
) -> SharedGroups | None:
    """Rows with the same prompt (left-padded ``query_ids`` (B, P) / ``query_mask``) as branches of one row.

    Only the counted reply tokens (``response_mask`` (B, R), True from the first column up to the EOS) enter the
    row. Returns None when a prompt is not left-padded, a reply mask is not a leading run, a row has no prompt token,
    or the shared rows would not save ``min_saving`` of the cells of the B trimmed rows (longest prompt + longest
    reply each).
    """
    qmask, rmask = query_mask.bool(), response_mask.bool()
    b, p = query_ids.shape
    if b == 0 or not is_left_padded(qmask) or not is_right_padded(rmask):
        return None
    qlen, rlen = qmask.sum(-1).tolist(), rmask.sum(-1).tolist()
    if min(qlen) < 1:
        return None
    queries, replies = query_ids.tolist(), response_ids.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in range(b):
        groups.setdefault(tuple(queries[row][p - qlen[row] :]), []).append(row)
    widths = [len(prompt) + sum(rlen[r] for r in rows) for prompt, rows in groups.items()]
    width = max(widths)
    if len(groups) * width > (1.0 - min_saving) * b * (max(qlen) + max(rlen)):
        return None
    ids, positions, branch = [], [], []
    predict_row, predict_col, target_row, target_col = [], [], [], []
    for g, (prompt, rows) in enumerate(groups.items()):
        q = len(prompt)
        row_ids, row_pos, row_branch = list(prompt), list(range(q)), [0] * q
        for j, r in enumerate(rows):
            start, n = len(row_ids), rlen[r]
            if n == 0:
                continue
            row_ids += replies[r][:n]
            row_pos += range(q, q + n)
            row_branch += [j + 1] * n
            predict_row += [g] * n
            predict_col += [q - 1, *range(start, start + n - 1)]
            target_row += [r] * n
            target_col += range(n)
        pad = width - len(row_ids)
        ids.append(row_ids + [row_ids[-1]] * pad)
        positions.append(row_pos + [0] * pad)
        branch.append(row_branch + [len(rows) + 1] * pad)
    device = query_ids.device

    def tensor(x: list) -> Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    real = torch.arange(width, device=device)[None, :] < tensor(widths)[:, None]
    return SharedGroups(
        tensor(ids),
        real,
        tensor(positions),
        tensor(branch),
        tensor(predict_row),
        tensor(predict_col),
        tensor(target_row),
        tensor(target_col),
    )
