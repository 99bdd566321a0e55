"""Micro-batch sizing by tokens and padding trimming for prompt + response batches.

A PPO rollout stores left-padded prompts (B, P) and right-padded responses (B, R), each padded to the longest row
of the whole rollout batch. A forward over some of its rows only needs the columns where one of those rows has a
real token (:func:`trimmed_span`), and rows of similar length grouped together waste less on padding
(:func:`token_budget_groups`). Both are exact: dropped columns hold padding only, which the attention masks and the
loss masks already ignore (position ids count real tokens, so they do not change either).

Sources: the "sort or bucket by length" habit of ``../shared/DESIGN.md`` (performance habits); token-budget
batching as in fairseq's ``max_tokens`` and Megatron/NeMo's dynamic batching (rows x longest row <= budget).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["split_to_count", "token_budget_groups", "trimmed_span"]


def trimmed_span(query_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """Columns that hold every real token: ``(p0, r)`` such that ``query[:, p0:]`` and ``response[:, :r]`` do.

    Shapes: ``query_mask`` (B, P) bool, ``response_mask`` (B, R) bool (True = real token). ``p0`` is the first prompt
    column with a real token in some row (at most ``P - 1``, so one prompt column always stays: its logit predicts
    the first response token); ``r`` is one past the last response column with a real token in some row (at least
    1, at most R). Works for any padding side; for left-padded prompts and right-padded responses the dropped
    columns are exactly those that are padding in every row.
    """
    P, R = query_mask.shape[-1], response_mask.shape[-1]
    prompt_cols = query_mask.bool().any(0)  # (P,)
    p0 = int(prompt_cols.long().argmax()) if bool(prompt_cols.any()) else P - 1
    response_cols = response_mask.bool().any(0)  # (R,)
    r = R - int(response_cols.flip(0).long().argmax()) if bool(response_cols.any()) else 1
    return min(p0, P - 1), max(1, min(r, R))


def token_budget_groups(
    prompt_lengths: Tensor, response_lengths: Tensor, max_tokens: int, max_rows: int | None = None
) -> list[Tensor]:
    """Split rows into groups whose padded size stays within ``max_tokens``, similar lengths together.

    Shapes: ``prompt_lengths``, ``response_lengths`` (N,) integer: real tokens per row. Rows are taken longest first
    (prompt + response, ties in row order) and added to the current group while ``rows * (longest prompt + longest
    response)`` of the group (its trimmed, padded size, see :func:`trimmed_span`) stays <= ``max_tokens`` and it has
    fewer than ``max_rows`` rows (None = no row limit); a row alone over the budget gets a group of its own.
    Returns a list of (n_g,) long tensors of positions into the N rows (on the lengths' device), every row exactly
    once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if prompt_lengths.shape != response_lengths.shape or prompt_lengths.dim() != 1:
        raise ValueError(
            f"expected two (N,) length tensors, got {tuple(prompt_lengths.shape)} and {tuple(response_lengths.shape)}"
        )
    total = prompt_lengths.long() + response_lengths.long()
    order = torch.sort(total, descending=True, stable=True).indices
    prompts, responses = prompt_lengths.tolist(), response_lengths.tolist()
    groups: list[list[int]] = []
    longest_p = longest_r = 0
    for i in order.tolist():
        p, r = max(longest_p, prompts[i]), max(longest_r, responses[i])
        current = groups[-1] if groups else None
        fits = (
            current is not None
            and (len(current) + 1) * (p + r) <= max_tokens
            and (max_rows is None or len(current) < max_rows)
        )
        if fits:
            current.append(i)
            longest_p, longest_r = p, r
        else:
            groups.append([i])
            longest_p, longest_r = prompts[i], responses[i]
    device = prompt_lengths.device
    return [torch.tensor(g, dtype=torch.long, device=device) for g in groups]


def split_to_count(groups: list[Tensor], count: int) -> list[Tensor]:
    """``groups`` with the largest split in two (first half, second half) until there are ``count`` of them.

    Data-parallel ranks that shard weights (FSDP) must run the same number of forwards: each rank groups its own
    rows, then every rank splits up to the largest count of any rank. ``count`` must lie between ``len(groups)``
    and the total number of rows. Returns a new list; each group keeps its row order.
    """
    rows = sum(len(g) for g in groups)
    if not len(groups) <= count <= rows:
        raise ValueError(f"cannot split {len(groups)} group(s) of {rows} row(s) into {count}")
    out = list(groups)
    while len(out) < count:
        i = max(range(len(out)), key=lambda k: len(out[k]))
        half = (len(out[i]) + 1) // 2
        out[i : i + 1] = [out[i][:half], out[i][half:]]
    return out
