"""Token-budget micro-batches and padding trimming (``functional/microbatch.py``) against hand-worked cases, and the
one-pass log-probs + entropy (``functional/logprobs.logprobs_and_entropy_from_logits``) against the two separate
functions, values and gradients, blocked and unblocked."""

import pytest
import torch

from rlhf_lightning.functional.logprobs import (
    entropy_from_logits,
    logprobs_and_entropy_from_logits,
    logprobs_from_logits,
)
from rlhf_lightning.functional.microbatch import split_to_count, token_budget_groups, trimmed_span


def test_trimmed_span_keeps_exactly_the_columns_with_a_real_token():
    query_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]).bool()  # left-padded, 2 pad columns shared
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()  # right-padded, 1 pad column shared
    assert trimmed_span(query_mask, response_mask) == (2, 3)
    full = (torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    assert trimmed_span(*full) == (0, 4)
    # degenerate rows keep one prompt column (its logit predicts the first response token) and one response column
    assert trimmed_span(torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool)) == (2, 1)


def test_token_budget_groups_sorts_by_length_and_respects_the_budget():
    prompts = torch.tensor([3, 10, 2, 9, 4])
    responses = torch.tensor([2, 5, 1, 5, 3])  # totals 5, 15, 3, 14, 7
    groups = [g.tolist() for g in token_budget_groups(prompts, responses, max_tokens=30)]
    # longest first: 1 (15) + 3 (14) -> 2 x (10 + 5) = 30 fits; 4 would make 3 x 15 = 45: new group 4, 0, 2
    assert groups == [[1, 3], [4, 0, 2]]
    assert sorted(i for g in groups for i in g) == list(range(5))
    # a row alone over the budget gets its own group; max_rows caps the group size
    assert [g.tolist() for g in token_budget_groups(prompts, responses, max_tokens=1)] == [
        [1],
        [3],
        [4],
        [0],
        [2],
    ]
    capped = token_budget_groups(prompts, responses, max_tokens=1000, max_rows=2)
    assert [g.tolist() for g in capped] == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError):
        token_budget_groups(prompts, responses, max_tokens=0)


def test_split_to_count_splits_the_largest_group_until_the_count_is_reached():
    groups = [torch.tensor([4, 1, 2]), torch.tensor([0]), torch.tensor([3, 5])]
    assert [g.tolist() for g in split_to_count(groups, 3)] == [[4, 1, 2], [0], [3, 5]]
    assert [g.tolist() for g in split_to_count(groups, 5)] == [[4], [1], [2], [0], [3, 5]]  # first largest
    assert [g.tolist() for g in split_to_count(groups, 4)] == [[4, 1], [2], [0], [3, 5]]
    with pytest.raises(ValueError):
        split_to_count(groups, 7)
    with pytest.raises(ValueError):
        split_to_count(groups, 2)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("block_elements", [1 << 24, 7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logprobs_and_entropy_in_one_pass_equal_the_separate_functions(
    temperature, block_elements, entropy_grad
):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 4))
    logp, entropy = logprobs_and_entropy_from_logits(
        logits, labels, temperature, entropy_grad=entropy_grad, block_elements=block_elements
    )
    torch.testing.assert_close(logp, logprobs_from_logits(logits, labels, temperature))
    torch.testing.assert_close(entropy, entropy_from_logits(logits, temperature))
    assert entropy.requires_grad == entropy_grad
    weights = torch.randn(3, 4)
    objective = (logp * weights).sum() + (entropy.sum() if entropy_grad else 0)
    (grad,) = torch.autograd.grad(objective, logits)
    reference = (logprobs_from_logits(logits, labels, temperature) * weights).sum()
    if entropy_grad:
        reference = reference + entropy_from_logits(logits, temperature).sum()
    (expected,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad, expected)
