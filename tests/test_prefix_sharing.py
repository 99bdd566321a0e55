"""Shared-prompt pair scoring (``functional.prefix_sharing``, ``RewardModel(share_prompt=True)``): one row per pair
with the common prefix computed once gives the two-row scores, loss and gradients, on the built-in GPT and on tiny
Hugging Face Llamas (sdpa and eager attention); the layout itself; and the cases that fall back to two rows."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_folders import tiny_llama  # tests/ is on sys.path under pytest

from rlhf_lightning.data.collate import collate_preference
from rlhf_lightning.functional.losses import pairwise_loss
from rlhf_lightning.functional.prefix_sharing import branch_causal_mask, share_group_prefix, share_pair_prefix
from rlhf_lightning.models.gpt import create_model
from rlhf_lightning.models.heads import RewardModel
from rlhf_lightning.stages.reward import RewardModule

VOCAB = 64


def _pairs(seed: int = 0) -> list[tuple[list[int], list[int], float]]:
    """Pairs with long shared prompts, replies of different lengths, one pair sharing reply tokens too, one with no
    common prefix, and one whose chosen sequence is a prefix of its rejected one."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    pairs = []
    for i in range(4):
        prompt = rand(9 + 3 * i)
        pairs.append((prompt + rand(2 + i), prompt + rand(5 - i), 0.25 * i))
    prompt, common = rand(7), rand(3)
    pairs.append((prompt + common + rand(2), prompt + common + rand(4), 0.0))  # replies share 3 tokens
    pairs.append((rand(6), rand(4), 0.0))  # nothing in common
    longer = rand(12)
    pairs.append((longer[:8], longer, 0.0))  # chosen is a prefix of rejected
    return pairs


def _batch(pairs):
    return collate_preference(pairs, pad_id=0)


def _reward_models():
    torch.manual_seed(0)
    gpt = RewardModel(create_model("tiny", vocab_size=VOCAB, dropout=0.0))
    return {
        "gpt": gpt,
        "llama-sdpa": RewardModel(tiny_llama(VOCAB, attn="sdpa")),
        "llama-eager": RewardModel(tiny_llama(VOCAB, attn="eager")),
    }


def test_layout_of_a_shared_pair_row():
    prompt, chosen, rejected = [5, 6, 7, 8], [9, 10], [11, 12, 13]
    batch = _batch([(prompt + chosen, prompt + rejected, 0.0), ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2], 0.0)])
    shared = share_pair_prefix(batch.input_ids, batch.attention_mask, min_saving=0.0)
    assert shared is not None
    assert shared.input_ids[0, :9].tolist() == prompt + chosen + rejected
    assert shared.position_ids[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert shared.branch[0, :9].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert shared.real[0].tolist() == [True] * 9 + [False] * 1
    # pair 2: rejected [1, 2] is a prefix of chosen; it keeps its last token of its own
    assert shared.input_ids[1].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 2]
    assert shared.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 1]
    assert shared.branch[1].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    assert shared.chosen_last.tolist() == [5, 8] and shared.rejected_last.tolist() == [8, 9]


def test_branch_mask_hides_the_other_reply_and_padding():
    branch = torch.tensor([[0, 0, 1, 1, 2, 2, 2]])
    real = torch.tensor([[True] * 6 + [False]])
    mask = branch_causal_mask(branch, real)[0, 0]
    naive = torch.zeros(7, 7, dtype=torch.bool)
    for i in range(7):
        for j in range(7):
            own = branch[0, j] == 0 or branch[0, j] == branch[0, i]
            naive[i, j] = (j <= i and own and bool(real[0, j])) or i == j
    assert torch.equal(mask, naive)
    assert (
        not mask[4, 2] and not mask[5, 3] and mask[4, 1] and mask[3, 2]
    )  # rejected never sees chosen's tokens


def _assert_same_grads(model: torch.nn.Module, twin: torch.nn.Module, atol: float = 1e-5) -> None:
    """Every parameter of ``model`` has the gradient of its twin's (both None, or close)."""
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        if b.grad is None:
            assert a.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=1e-4, msg=name)


def _spy_rows(model: RewardModel) -> list[tuple[int, ...]]:
    """Record the input shape of every ``backbone.hidden_states`` call."""
    shapes: list[tuple[int, ...]] = []
    original = model.backbone.hidden_states

    def spy(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return original(input_ids, *args, **kwargs)

    model.backbone.hidden_states = spy
    return shapes


@pytest.mark.parametrize("name", ["gpt", "llama-sdpa", "llama-eager"])
def test_shared_scores_loss_and_gradients_equal_two_rows(name):
    model = _reward_models()[name].train()
    twin = copy.deepcopy(model)
    batch = _batch(_pairs())
    shapes = _spy_rows(model)
    shared = model(batch.input_ids, batch.attention_mask, share_prompt=True)
    # one backbone call on one row per pair, with fewer token cells than the 2B padded rows
    assert len(shapes) == 1 and shapes[0][0] == len(batch)
    assert shapes[0][0] * shapes[0][1] < batch.input_ids.numel()
    plain = twin(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    loss_shared, _ = pairwise_loss(*shared.chunk(2), batch.margin)
    loss_plain, _ = pairwise_loss(*plain.chunk(2), batch.margin)
    loss_shared.backward()
    loss_plain.backward()
    _assert_same_grads(model, twin)


def test_gpt_takes_a_4d_mask_only_with_positions_and_without_cache():
    gpt = create_model("tiny", vocab_size=VOCAB, dropout=0.0)
    batch = _batch(_pairs()[:2])
    shared = share_pair_prefix(batch.input_ids, batch.attention_mask)
    with pytest.raises(ValueError, match="position_ids"):
        gpt.hidden_states(shared.input_ids, shared.attention_mask())
    with pytest.raises(ValueError, match="position"):
        gpt.hidden_states(
            shared.input_ids, shared.attention_mask(), shared.position_ids + gpt.config.max_seq_len
        )


def test_left_padded_or_unshareable_batches_fall_back_to_two_rows():
    model = _reward_models()["gpt"]
    batch = _batch(_pairs())
    # left padding: flip every row's padding to the front
    ids, mask = batch.input_ids.clone(), batch.attention_mask.clone()
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        ids[r] = torch.cat([ids[r, n:], ids[r, :n]])
        mask[r] = torch.cat([mask[r, n:], mask[r, :n]])
    assert share_pair_prefix(ids, mask) is None
    torch.testing.assert_close(
        model(ids, mask, share_prompt=True),
        model(batch.input_ids, batch.attention_mask),
        atol=1e-5,
        rtol=1e-5,
    )
    # no common prefix at all: a shared row saves nothing, so two rows stay
    unrelated = _batch([([1, 2, 3, 4], [5, 6, 7, 8], 0.0)])
    assert share_pair_prefix(unrelated.input_ids, unrelated.attention_mask) is None
    assert (
        share_pair_prefix(batch.input_ids[:3], batch.attention_mask[:3]) is None
    )  # an odd row count is no pairs


def test_backbones_without_a_4d_mask_path_get_two_rows():
    llama = tiny_llama(VOCAB, attn="sdpa")
    assert llama.accepts_4d_mask
    llama.hf_model.config._attn_implementation = "flex_attention"  # no (B, 1, T, T) bool mask path here
    assert not llama.accepts_4d_mask
    batch = _batch(_pairs()[:2])
    shared = share_pair_prefix(batch.input_ids, batch.attention_mask)
    with pytest.raises(ValueError, match="flex_attention"):
        llama.hidden_states(shared.input_ids, shared.attention_mask(), shared.position_ids)
    # a backbone that does not declare the 4D path is asked with the (2B, T) padding mask only
    model = _reward_models()["gpt"]
    model.backbone.accepts_4d_mask = False
    shapes = _spy_rows(model)
    model(batch.input_ids, batch.attention_mask, share_prompt=True)
    assert shapes == [tuple(batch.input_ids.shape)]


def test_reward_module_shares_by_default_and_matches_two_rows():
    torch.manual_seed(0)
    backbone = create_model("tiny", vocab_size=VOCAB, dropout=0.0)
    on = RewardModule()
    on.reward_model = RewardModel(backbone)
    off = RewardModule(share_prompt=False)
    off.reward_model = copy.deepcopy(on.reward_model)
    assert on.share_prompt and not off.share_prompt
    batch = _batch(_pairs())
    calls = []
    original = on.reward_model.forward
    on.reward_model.forward = lambda *a, **k: calls.append(k.get("share_prompt")) or original(*a, **k)
    loss_on, _, scores_on = on._pair_step(batch)
    loss_off, _, scores_off = off._pair_step(batch)
    assert calls == [True]
    torch.testing.assert_close(scores_on, scores_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- online RL groups


def _group_rollout(seed: int = 0):
    """3 prompts (left-padded, different lengths) x 3 replies each, rows interleaved as a shuffled minibatch gives
    them, replies ending early (mask True up to the EOS) or running to R."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (7, 11, 4)]
    p, r = 11, 6
    order = [0, 1, 2, 1, 0, 2, 2, 0, 1]
    query = torch.zeros(len(order), p, dtype=torch.long)
    qmask = torch.zeros(len(order), p, dtype=torch.bool)
    response = torch.randint(1, VOCAB, (len(order), r), generator=g)
    rmask = torch.zeros(len(order), r, dtype=torch.bool)
    for row, k in enumerate(order):
        query[row, p - len(prompts[k]) :] = torch.tensor(prompts[k])
        qmask[row, p - len(prompts[k]) :] = True
        n = 1 + (row * 2) % r
        rmask[row, :n] = True
        response[row, n:] = 0
    return query, qmask, response, rmask


@pytest.mark.parametrize("name", ["gpt", "llama-sdpa", "llama-eager"])
def test_group_shared_logprobs_and_gradients_equal_per_row(name):
    from rlhf_lightning.stages.rollout import response_logprobs_of, shared_response_logprobs

    policy = _reward_models()[name].backbone.train()
    twin = copy.deepcopy(policy)
    query, qmask, response, rmask = _group_rollout()
    shapes = _spy_rows(RewardModel(policy))  # spies policy.hidden_states
    shared = shared_response_logprobs(policy, query, qmask, response, rmask, temperature=0.7)
    assert shared is not None and len(shapes) == 1 and shapes[0][0] == 3  # one row per prompt
    plain = response_logprobs_of(
        twin, torch.cat([query, response], 1), torch.cat([qmask, rmask], 1), query.shape[1], 0.7
    )
    torch.testing.assert_close(shared[rmask], plain[rmask], atol=1e-5, rtol=1e-5)
    assert (shared[~rmask] == 0).all()
    weights = torch.linspace(0.5, 1.5, rmask.numel()).view_as(rmask)
    (shared * weights)[rmask].sum().backward()
    (plain * weights)[rmask].sum().backward()
    _assert_same_grads(policy, twin)


def test_group_layout_and_when_it_falls_back():
    query = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9]])
    qmask = query != 0
    response = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 4, 4]])
    rmask = response != 0
    layout = share_group_prefix(query, qmask, response, rmask, min_saving=0.0)
    assert layout.input_ids[0].tolist() == [5, 6, 1, 2, 3, 3]  # prompt, reply 0, reply 1, padding
    assert layout.position_ids[0, :5].tolist() == [0, 1, 2, 3, 2]
    assert layout.branch[0, :5].tolist() == [0, 0, 1, 1, 2]
    # first reply token predicted from the prompt's last column, later ones from their own branch
    assert list(zip(layout.predict_row.tolist(), layout.predict_col.tolist()))[:3] == [(0, 1), (0, 2), (0, 1)]
    assert list(zip(layout.target_row.tolist(), layout.target_col.tolist()))[:3] == [(0, 0), (0, 1), (1, 0)]
    # distinct prompts save nothing; right-padded prompts are not the rollout's layout
    assert share_group_prefix(query[1:], qmask[1:], response[1:], rmask[1:]) is None
    right = torch.tensor([[5, 6, 0], [5, 6, 0]])
    assert share_group_prefix(right, right != 0, response[:2], rmask[:2], min_saving=0.0) is None


def test_grpo_loss_and_gradients_equal_with_and_without_the_shared_path(monkeypatch):
    from rlhf_lightning.stages import grpo as grpo_stage
    from rlhf_lightning.types import Rollout

    query, qmask, response, rmask = _group_rollout()
    b, r = response.shape
    g = torch.Generator().manual_seed(1)
    rollout = Rollout(
        query_ids=query,
        query_mask=qmask,
        response_ids=response,
        response_mask=rmask,
        logprobs=-torch.rand(b, r, generator=g) * rmask,
        ref_logprobs=-torch.rand(b, r, generator=g) * rmask,
        values=torch.zeros(b, r),
        scores=torch.zeros(b),
        raw_scores=torch.zeros(b),
        ended_with_eos=rmask[:, -1].logical_not(),
        rewards=torch.zeros(b, r),
        advantages=torch.randn(b, r, generator=g) * rmask,
        returns=torch.zeros(b, r),
    )
    rows = torch.tensor([4, 0, 7, 2, 5, 1])  # a shuffled minibatch: two or three replies of each prompt
    weights = grpo_stage.row_weights(rmask[rows], "token_mean", r)
    losses, policies, used = [], [], []
    original = grpo_stage.shared_response_logprobs
    for share in (True, False):
        module = grpo_stage.GRPOModule(policy_from="unused.ckpt", grpo=grpo_stage.GRPOArgs(kl_coef=0.1))
        module.policy = copy.deepcopy(_reward_models()["gpt"].backbone)

        def shared(*args, share=share, **kwargs):
            out = original(*args, **kwargs) if share else None
            used.append(out is not None)
            return out

        monkeypatch.setattr(grpo_stage, "shared_response_logprobs", shared)
        loss, _ = module.loss(rollout, rows, weights)
        loss.backward()
        losses.append(loss.detach())
        policies.append(module.policy)
    assert used == [True, False]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    _assert_same_grads(*policies, atol=1e-6)
