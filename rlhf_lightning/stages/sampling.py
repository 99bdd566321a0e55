"""Turn chat prompts into sampled replies with a policy and its tokenizer (CLI ``generate``, sample tables)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.types import Message


def response_texts(tokenizer, response: torch.Tensor, response_mask: torch.Tensor) -> tuple[str, ...]:
    """Decoded responses (B,) without padding and EOS: the text a user sees. response / response_mask (B, R)."""
    return tuple(
        tokenizer.decode([t for t, keep in zip(ids, keep_row) if keep and t != tokenizer.eos_id])
        for ids, keep_row in zip(response.tolist(), response_mask.tolist())
    )


def ended_with_eos(response: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) bool: the response stopped at EOS instead of running to the length limit."""
    return (response == eos_id).logical_and(response_mask).any(dim=1)


def replies_for_ids(
    model: torch.nn.Module,
    tokenizer,
    rendered: Sequence[list[int]],
    args: GenerationArgs,
    *,
    seed: int | None = None,
) -> list[str]:
    """One reply per rendered prompt (ids ending in the assistant header), decoded up to the first EOS.

    Prompts are left-padded with masks built from their lengths; the model runs in eval mode (dropout off) and is
    put back in the mode it was in.
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids in rendered)
    input_ids = torch.full((len(rendered), width), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rendered), width), dtype=torch.bool)
    for row, ids in enumerate(rendered):  # left padding, masks from lengths
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = True
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = generate(
            model,
            input_ids.to(device),
            attention_mask.to(device),
            args,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            generator=generator,
        )
    finally:
        model.train(was_training)
    return list(response_texts(tokenizer, out.response_ids, out.response_mask))


def sample_replies(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[list[Message]],
    args: GenerationArgs,
    *,
    seed: int | None = None,
) -> list[str]:
    """One reply per conversation in ``prompts``, decoded up to (not including) the first EOS."""
    rendered = [tokenizer.render_prompt(list(messages)) for messages in prompts]
    return replies_for_ids(model, tokenizer, rendered, args, seed=seed)
