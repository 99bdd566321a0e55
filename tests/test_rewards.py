"""PPO reward sources and score shaping (``stages/rewards.py``, ``reward_functions.py``): the reward model's score
normalised with its checkpoint's statistics, weighted sums with ``module:function`` callables that see the prompt,
the response text and the row's extra fields (GSM8K's ``answer``), clipping, running normalisation, the missing-EOS
score, and clear errors for bad specs at construction. Random-init tiny checkpoints, CPU."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from ppo_probes import save_stage_checkpoint as _save  # tests/ is on sys.path under pytest

from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.reward_functions import brevity, contains_target, gsm8k_correct
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.rewards import RewardArgs, SequenceScorer, load_reward_function
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "data" / "gsm8k" / "prompts_train.jsonl"
TINY = ModelArgs(preset="tiny", dropout=0.0)
FAKE = "ppo_test_reward_fns"  # a module registered in sys.modules by the `calls` fixture
MEAN, STD = -0.5, 4.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer) -> tuple[str, str]:
    """(SFT, reward) checkpoints with random tiny weights; the reward model stores mean -0.5, std 4."""
    root = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    sft = SFTModule(model=TINY, tokenizer_path=tiny_tokenizer.source)
    sft.configure_model()
    reward = RewardModule(model=TINY, tokenizer_path=tiny_tokenizer.source)
    reward.configure_model()
    reward.reward_model.set_score_stats(MEAN, STD)
    return _save(sft, root / "sft.ckpt"), _save(reward, root / "reward.ckpt")


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """Registers ``ppo_test_reward_fns:record`` (returns len(response)) and collects its arguments."""
    seen: list[tuple] = []
    module = types.ModuleType(FAKE)

    def record(prompt, response, row):
        seen.append((prompt, response, row))
        return float(len(response))

    def two_args(prompt, response):
        return 0.0

    module.record, module.two_args, module.not_callable = record, two_args, 3
    monkeypatch.setitem(sys.modules, FAKE, module)
    return seen


def _gsm8k_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]


def _scorer(args: RewardArgs, reward_model=None) -> SequenceScorer:
    return SequenceScorer(args, reward_model)


# ----------------------------------------------------------------------------------------------- reward sources


def test_model_score_is_normalised_with_the_checkpoint_statistics(checkpoints, tiny_tokenizer):
    sft, reward = checkpoints
    module = PPOModule(policy_from=sft, reward_from=reward, tokenizer_path=tiny_tokenizer.source)
    module.configure_model()
    assert float(module.reward_model.score_mean) == MEAN and float(module.reward_model.score_std) == STD
    ids = torch.randint(5, 500, (3, 10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False  # left padding on one row
    raw = module.reward_model(ids, mask)
    empty = [{}] * 3
    scores = module.scorer.raw_scores(ids, mask, [[]] * 3, ["", "", ""], empty)
    torch.testing.assert_close(scores, (raw - MEAN) / STD)
    unnormalised = _scorer(RewardArgs(normalize=False, model_weight=2.0), module.reward_model)
    torch.testing.assert_close(unnormalised.raw_scores(ids, mask, [[]] * 3, ["", "", ""], empty), 2.0 * raw)


def test_weighted_sum_of_model_and_functions_sees_prompt_response_and_row(checkpoints, tiny_tokenizer, calls):
    sft, reward = checkpoints
    args = RewardArgs(
        model_weight=0.5,
        functions=["rlhf_lightning.reward_functions:gsm8k_correct", f"{FAKE}:record"],
        function_weights=[2.0, -0.1],
        clip=None,
    )
    module = PPOModule(
        policy_from=sft, reward_from=reward, tokenizer_path=tiny_tokenizer.source, rewards=args
    )
    module.configure_model()
    rows = _gsm8k_rows(3)
    responses = [f"so the answer is #### {rows[0]['answer']}", "I think 7", f"{rows[2]['answer']} apples"]
    prompts = [row["prompt"] for row in rows]
    ids = torch.randint(5, 500, (3, 8))
    mask = torch.ones_like(ids, dtype=torch.bool)
    scores = module.scorer.raw_scores(ids, mask, prompts, responses, rows)
    model = (module.reward_model(ids, mask) - MEAN) / STD
    correct = torch.tensor([1.0, float(rows[1]["answer"] == "7"), 1.0])
    lengths = torch.tensor([float(len(r)) for r in responses])
    torch.testing.assert_close(scores, 0.5 * model + 2.0 * correct - 0.1 * lengths)
    assert [c[0] for c in calls] == prompts
    assert [c[1] for c in calls] == responses
    assert [c[2]["answer"] for c in calls] == [row["answer"] for row in rows]


def test_gsm8k_rows_reach_reward_functions_during_a_rollout(checkpoints, tiny_tokenizer, calls):
    """End to end: the PromptDataModule's rows (with ``answer``) and the decoded responses go to the callables."""
    sft, _ = checkpoints
    module = PPOModule(
        policy_from=sft,
        tokenizer_path=tiny_tokenizer.source,
        rewards=RewardArgs(model_weight=0.0, functions=[f"{FAKE}:record"], clip=None, missing_eos_score=None),
        generation=GenerationArgs(max_new_tokens=6),
        ppo=PPOArgs(minibatch_size=4),
    )
    module.configure_model()
    data = PromptDataModule(
        train_path=str(GSM8K), tokenizer_path=tiny_tokenizer.source, batch_size=4, max_prompt_length=96
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rollout, _ = module._rollout(batch)
    assert [c[2] for c in calls] == list(batch.rows)
    assert all("answer" in c[2] for c in calls)
    assert [c[0] for c in calls] == [row["prompt"] for row in batch.rows]
    assert tuple(c[1] for c in calls) == rollout.texts
    torch.testing.assert_close(rollout.scores, torch.tensor([float(len(t)) for t in rollout.texts]))


def test_gsm8k_correct_reads_the_final_number():
    row = {"answer": "1,250"}
    assert gsm8k_correct([], "First 3 then 1250", row) == 1.0
    assert gsm8k_correct([], "12 and 1250 #### 7", row) == 0.0  # the number after #### wins
    assert gsm8k_correct([], "#### 1,250.0", row) == 1.0
    assert gsm8k_correct([], "no idea", row) == 0.0
    with pytest.raises(KeyError, match="answer"):
        gsm8k_correct([], "1", {})
    assert brevity([], "", {}) == 1.0 and brevity([], "w " * 200, {}) == -1.0
    assert contains_target([], "abc", {"target": "b"}) == 1.0


# ------------------------------------------------------------------------------------------------------ shaping


def test_clipping_bounds_the_combined_score(calls):
    scorer = _scorer(
        RewardArgs(model_weight=0.0, functions=[f"{FAKE}:record"], clip=2.0, missing_eos_score=None)
    )
    raw = torch.tensor([-7.0, -1.5, 0.0, 3.0])
    shaped = scorer.shape(raw, torch.ones(4, dtype=torch.bool))
    assert shaped.tolist() == [-2.0, -1.5, 0.0, 2.0]
    unclipped = _scorer(RewardArgs(model_weight=0.0, functions=[f"{FAKE}:record"], clip=None))
    assert unclipped.shape(raw, torch.ones(4, dtype=torch.bool)).tolist() == raw.tolist()


def test_missing_eos_gets_the_fixed_score(calls):
    args = RewardArgs(model_weight=0.0, functions=[f"{FAKE}:record"], missing_eos_score=-3.0)
    ended = torch.tensor([True, False, True])
    shaped = _scorer(args).shape(torch.tensor([0.5, 4.0, -0.5]), ended)
    assert shaped.tolist() == [0.5, -3.0, -0.5]
    off = RewardArgs(model_weight=0.0, functions=[f"{FAKE}:record"], missing_eos_score=None)
    assert _scorer(off).shape(torch.tensor([0.5, 4.0, -0.5]), ended).tolist() == [0.5, 4.0, -0.5]


def test_running_normalisation_divides_by_the_std_of_all_scores_so_far(calls):
    args = RewardArgs(model_weight=0.0, functions=[f"{FAKE}:record"], running_normalize=True, clip=None)
    scorer = _scorer(args)
    ended = torch.ones(3, dtype=torch.bool)
    # a first lone score (std undefined) and a stream of identical scores are left unscaled, not blown up
    assert scorer.shape(torch.tensor([2.0]), ended[:1]).tolist() == [2.0]
    assert scorer.shape(torch.tensor([2.0, 2.0]), ended[:2]).tolist() == [2.0, 2.0]
    batches = [torch.tensor([1.0, -3.0, 0.5]), torch.tensor([4.0, 2.0, -1.0])]
    seen = [2.0, 2.0, 2.0]
    for raw in batches:
        seen += raw.tolist()
        expected = raw / torch.tensor(seen, dtype=torch.float64).std().item()
        torch.testing.assert_close(scorer.shape(raw, ended), expected.float())
    # evaluation scores are shaped with the statistics but do not move them
    state = dict(scorer.running.state_dict())
    scorer.shape(torch.tensor([100.0, -100.0, 0.0]), ended, update_running=False)
    assert scorer.running.state_dict() == state


def test_evaluation_rollouts_leave_running_statistics_alone(checkpoints, tiny_tokenizer, calls):
    from rlhf_lightning.stages.rollout import make_rollout

    sft, _ = checkpoints
    module = PPOModule(
        policy_from=sft,
        tokenizer_path=tiny_tokenizer.source,
        # no missing-EOS score: every reply's score counts in the running statistics, ended or not
        rewards=RewardArgs(
            model_weight=0.0, functions=[f"{FAKE}:record"], running_normalize=True, missing_eos_score=None
        ),
        generation=GenerationArgs(max_new_tokens=4),
    )
    module.configure_model()
    ids = torch.randint(5, 500, (3, 6))
    batch = types.SimpleNamespace(
        input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), rows=({}, {}, {})
    )
    common = dict(
        policy=module.policy,
        reference=module.reference,
        value_model=module.value_model,
        scorer=module.scorer,
        tokenizer=module.tokenizer,
        batch=batch,
        generation=module.generation,
        kl_beta=0.1,
        gamma=1.0,
        lam=0.95,
    )
    make_rollout(**common, generator=torch.Generator().manual_seed(0), update_running_stats=False)
    assert module.scorer.running.count == 0
    make_rollout(**common, generator=torch.Generator().manual_seed(0))
    assert module.scorer.running.count == 3


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rlhf_lightning.reward_functions", "expected the form 'package.module:function'"),
        (":gsm8k_correct", "expected the form"),
        ("rlhf_lightning.reward_functions:", "expected the form"),
        ("a:b:c", "expected the form"),
    ],
)
def test_malformed_specs_fail_when_the_config_is_parsed(spec, message):
    with pytest.raises(ValueError, match=message):
        RewardArgs(functions=[spec])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_xyz.rewards:fn", "cannot import module 'no_such_package_xyz.rewards'"),
        ("rlhf_lightning.reward_functions:gsm8k_corect", "has no callable 'gsm8k_corect'"),
        (f"{FAKE}:not_callable", "has no callable 'not_callable'"),
        (f"{FAKE}:two_args", r"cannot be called as fn\(prompt, response, row\)"),
    ],
)
def test_bad_specs_fail_at_construction_before_any_checkpoint_is_read(spec, message, calls):
    args = RewardArgs(model_weight=0.0, functions=[spec])
    with pytest.raises(ValueError, match=message):
        PPOModule(policy_from="/nonexistent/sft.ckpt", rewards=args)  # no checkpoint is touched
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec)


def test_other_reward_argument_errors():
    with pytest.raises(ValueError, match="one per function"):
        RewardArgs(functions=["rlhf_lightning.reward_functions:brevity"], function_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="clip"):
        RewardArgs(clip=0.0)
    with pytest.raises(ValueError, match="no reward source"):
        RewardArgs(model_weight=0.0)
    with pytest.raises(ValueError, match="no reward model"):
        SequenceScorer(RewardArgs(), None)


def test_a_failing_reward_function_names_itself_and_the_row():
    scorer = _scorer(
        RewardArgs(model_weight=0.0, functions=["rlhf_lightning.reward_functions:gsm8k_correct"])
    )
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"gsm8k_correct.*row 0.*answer"):
        scorer.raw_scores(ids, ids.bool(), [[]], ["42"], [{"question": "no answer field"}])
