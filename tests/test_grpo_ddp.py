"""GRPO / RLOO on several data-parallel ranks (gloo, CPU): groups stay whole on one rank, what spans ranks is global.

The fast tests spawn 2 gloo processes on hand-made rollouts (no model): 2 ranks holding half of the groups each must
give what 1 process holding every group gives (advantages, logged rollout metrics, the minibatch loss weights). The
``slow`` test runs the shipped ``configs/grpo_tiny.yaml`` through ``rlhf-lightning fit`` on 2 CPU processes, records
each rank's iterations (``tests/rollout_probe.py``) and resumes once.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_ddp import run_on_two_ranks
from test_ppo_stage import sft_checkpoint  # noqa: F401 (module-scoped fixture)

from rlhf_lightning.stages.grpo import GRPOArgs, row_weights, with_group_advantages
from rlhf_lightning.stages.online import group_rollout_metrics
from rlhf_lightning.types import Rollout

REPO = Path(__file__).resolve().parents[1]
K, GROUPS, R = 3, 2, 5  # replies per prompt, groups per rank, response length
ROWS = K * GROUPS  # rows per rank
AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum")


def _rollout(baseline: str = "grpo") -> Rollout:
    """2 ranks' worth of groups (rank r holds rows [r * ROWS, (r + 1) * ROWS)), uneven lengths, group advantages."""
    g = torch.Generator().manual_seed(0)
    n = 2 * ROWS
    lengths = torch.tensor([5, 1, 2, 5, 4, 5, 1, 1, 3, 2, 1, 2])  # rank 0: 22 tokens, rank 1: 15
    mask = torch.arange(R)[None] < lengths[:, None]
    zeros = torch.zeros(n, R)
    rollout = Rollout(
        query_ids=torch.ones(n, 2, dtype=torch.long),
        query_mask=torch.ones(n, 2, dtype=torch.bool),
        response_ids=torch.where(mask, 3, 0),
        response_mask=mask,
        logprobs=-torch.rand(n, R, generator=g),
        ref_logprobs=-torch.rand(n, R, generator=g),
        values=zeros,
        scores=torch.randn(n, generator=g),
        raw_scores=torch.randn(n, generator=g),
        rewards=zeros,
        advantages=zeros,
        returns=zeros,
        ended_with_eos=torch.rand(n, generator=g) > 0.5,
    )
    return with_group_advantages(rollout, GRPOArgs(group_size=K, baseline=baseline))


def _rows(rollout: Rollout, rows: slice) -> Rollout:
    return Rollout(**{k: v[rows] if torch.is_tensor(v) else v for k, v in rollout.__dict__.items()})


def _weighted_losses(part: Rollout) -> dict[str, torch.Tensor]:
    """``sum_i w_i sum_t loss_it`` over ``part``'s valid tokens, for a toy per-token loss, per aggregation."""
    per_token = torch.linspace(-1.0, 2.0, 2 * ROWS * R).view(2 * ROWS, R)
    rank = dist.get_rank() if dist.is_initialized() else None
    per_token = per_token if rank is None else per_token[rank * ROWS : (rank + 1) * ROWS]
    out = {}
    for aggregation in AGGREGATIONS:
        weights = row_weights(part.response_mask, aggregation, max_new_tokens=R)
        out[aggregation] = (weights[:, None] * per_token * part.response_mask).sum()
    return out


def _on_rank(rank: int) -> dict[str, torch.Tensor]:
    whole = _rollout()
    part = _rows(whole, slice(rank * ROWS, (rank + 1) * ROWS))
    result = {f"metric:{k}": v for k, v in group_rollout_metrics(part, K).items()}
    result.update({f"loss:{k}": v for k, v in _weighted_losses(part).items()})
    for baseline in ("grpo", "rloo"):  # each rank computes its own groups' advantages, no communication
        mine = _rows(_rollout(baseline), slice(rank * ROWS, (rank + 1) * ROWS))
        args = GRPOArgs(group_size=K, baseline=baseline)
        result[f"advantages:{baseline}"] = with_group_advantages(mine, args).advantages
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return run_on_two_ranks(_on_rank, tmp_path_factory.mktemp("grpo_ddp"))


def test_group_advantages_never_mix_groups():
    """Each group's advantages come from its own scores only: computed one group at a time they are the same, and
    changing another group's scores changes nothing."""
    for baseline in ("grpo", "dr_grpo", "rloo"):
        whole = _rollout(baseline)
        args = GRPOArgs(group_size=K, baseline=baseline)
        alone = [
            with_group_advantages(_rows(whole, slice(g * K, (g + 1) * K)), args) for g in range(2 * GROUPS)
        ]
        torch.testing.assert_close(torch.cat([a.advantages for a in alone]), whole.advantages)
        moved = Rollout(**{**whole.__dict__, "scores": whole.scores + torch.arange(2 * ROWS) // K * 10.0})
        shifted = with_group_advantages(
            moved, args
        ).advantages  # every group's scores shifted by its own constant
        torch.testing.assert_close(shifted, whole.advantages, atol=1e-5, rtol=1e-5)
        assert torch.equal(whole.advantages[~whole.response_mask], torch.zeros((~whole.response_mask).sum()))


def test_two_ranks_log_the_rollout_metrics_of_one_process_holding_every_group(two_ranks):
    one = group_rollout_metrics(_rollout(), K)
    for key, value in one.items():
        for rank in two_ranks:  # every rank logs the same global value
            torch.testing.assert_close(rank[f"metric:{key}"], value, msg=key)
    # the per-rank values really differ (a local std would not pass)
    local = group_rollout_metrics(_rows(_rollout(), slice(0, ROWS)), K)
    assert not torch.allclose(local["rollout/score_std"], one["rollout/score_std"])


def test_two_ranks_step_on_the_loss_of_one_process_holding_the_whole_minibatch(two_ranks):
    """``row_weights`` counts every rank's tokens and replies: the mean over ranks of the weighted losses (what
    ``average_gradients`` makes of their gradients) is one process's loss, with uneven token counts per rank."""
    one = _weighted_losses(_rollout())
    for aggregation in AGGREGATIONS:
        mean = (two_ranks[0][f"loss:{aggregation}"] + two_ranks[1][f"loss:{aggregation}"]) / 2
        torch.testing.assert_close(mean, one[aggregation], msg=aggregation)
    mask = _rollout().response_mask
    assert mask[:ROWS].sum() != mask[ROWS:].sum()


def test_each_rank_computes_the_advantages_of_its_own_groups(two_ranks):
    for baseline in ("grpo", "rloo"):
        ranks = torch.cat([r[f"advantages:{baseline}"] for r in two_ranks])
        torch.testing.assert_close(ranks, _rollout(baseline).advantages)


# ------------------------------------------------------------------------------ the shipped tiny config, 2 ranks
EXTRA = """\
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 2
  val_check_interval: 2
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: runs/tiny/grpo/checkpoints
        every_n_train_steps: 1
        save_top_k: -1
        filename: "iter-{step}"
    - class_path: rollout_probe.RolloutProbe
"""


def _fit(cwd: Path, sft: str, tokenizer: str, *extra: str) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "data").symlink_to(REPO / "data")
    (cwd / "ddp.yaml").write_text(EXTRA)
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli",
        "fit",
        "--config",
        str(REPO / "configs" / "grpo_tiny.yaml"),
    ]
    cmd += ["--config", "ddp.yaml", f"--model.init_args.policy_from={sft}"]
    cmd += [f"--data.init_args.tokenizer_path={tokenizer}", *extra]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
        "ROLLOUT_PROBE_DIR": str(cwd / "probe"),
    }
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _probe(cwd: Path, rank: int, step: int) -> dict[str, torch.Tensor]:
    return torch.load(cwd / "probe" / f"rank{rank}_step{step}.pt", weights_only=True)


@pytest.mark.slow
def test_grpo_tiny_config_on_two_cpu_ranks_keeps_groups_whole_and_resumes_each_ranks_stream(
    tmp_path,
    sft_checkpoint,  # noqa: F811
    tiny_tokenizer,
):
    """``grpo_tiny.yaml`` on 2 gloo ranks for 2 iterations, then again from the first iteration's checkpoint: finite
    global metrics; every group (4 replies of one prompt) sampled on the rank that loaded the prompt; the ranks draw
    from different generator streams, both in the checkpoint; the resumed run samples each rank's replies and ends
    with the weights of the straight run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _fit(straight, sft_checkpoint, tiny_tokenizer.source)
    k = 4  # grpo_tiny.yaml's group_size

    for step in (1, 2):
        ranks = [_probe(straight, r, step) for r in range(2)]
        assert not set(ranks[0]["index"].tolist()) & set(ranks[1]["index"].tolist())  # other prompts per rank
        for (
            rec
        ) in ranks:  # the groups: k consecutive rows of one prompt this rank loaded, no other prompt's rows
            assert len(rec["query_ids"]) == k * len(rec["index"])
            for g in range(len(rec["index"])):
                prompt = rec["input_ids"][g][rec["attention_mask"][g]]
                for row in range(g * k, (g + 1) * k):
                    assert torch.equal(rec["query_ids"][row][rec["query_mask"][row]], prompt)
    ckpts = straight / "runs/tiny/grpo/checkpoints"
    payload = torch.load(ckpts / "iter-step=1.ckpt", map_location="cpu", weights_only=False)["rlhf_lightning"]
    states = payload["generator_states"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])  # a stream per rank, both saved

    (metrics_csv,) = (straight / "runs/tiny/grpo").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    values = [float(v) for row in rows for key, v in row.items() if v and key not in ("epoch", "step")]
    assert values and all(math.isfinite(v) for v in values)
    logged = [float(r["rollout/score_mean"]) for r in rows if r.get("rollout/score_mean")]
    both = torch.cat([_probe(straight, r, 1)["scores"] for r in range(2)])
    assert logged[0] == pytest.approx(both.mean().item(), abs=1e-6)  # the mean over both ranks' replies
    assert any(r.get("val/score") for r in rows)

    _fit(resumed, sft_checkpoint, tiny_tokenizer.source, f"--ckpt_path={ckpts / 'iter-step=1.ckpt'}")
    for rank in range(2):  # each rank continued its own stream: the same replies as the straight run
        assert torch.equal(
            _probe(resumed, rank, 2)["response_ids"], _probe(straight, rank, 2)["response_ids"]
        )
    a = torch.load(ckpts / "iter-step=2.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(
        resumed / "runs/tiny/grpo/checkpoints/iter-step=2.ckpt", map_location="cpu", weights_only=False
    )["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
