"""Several data-parallel ranks on CPU (gloo): global statistics, per-rank generators, SFT token means, CLI runs.

The equivalence tests spawn 2 gloo processes on tiny tensors: 2 ranks x batch b must give what 1 rank x batch 2b gives
for every statistic that normalises or steers (DESIGN.md). The end-to-end runs (``slow``) run the shipped tiny configs
as they are through ``rlhf-lightning fit`` with ``--trainer.strategy ddp --trainer.devices 2``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.distributed import (
    all_reduce_sum,
    average_gradients,
    global_masked_moments,
    global_mean,
    global_weighted_means,
    token_mean_scale,
)
from rlhf_lightning.functional.advantages import RunningMoments
from rlhf_lightning.functional.kl import AdaptiveKLController, kl_k1
from rlhf_lightning.functional.masked import masked_sum
from rlhf_lightning.stages.online import generator_payload, rank_seed, restore_generator
from rlhf_lightning.stages.ppo import PPOModule
from rlhf_lightning.stages.ppo_metrics import iteration_metrics
from rlhf_lightning.stages.rollout import rewards_and_advantages
from rlhf_lightning.types import Rollout

REPO = Path(__file__).resolve().parents[1]
B, R = 4, 5  # rows per rank, response length
TOKENS = 14  # micro_batch_tokens for the token-split update: rows of 8 go alone, shorter ones in pairs


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A rollout-like batch of 2B rows: rank r holds rows [rB, (r+1)B)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 5, 3])  # uneven valid tokens, so per-rank counts differ
    mask = torch.arange(R)[None] < lengths[:, None]
    return {
        "scores": torch.randn(2 * B, generator=g),
        "logprobs": -torch.rand(2 * B, R, generator=g),
        "ref_logprobs": -torch.rand(2 * B, R, generator=g),
        "values": torch.randn(2 * B, R, generator=g),
        "mask": mask,
    }


def _statistics(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything PPO reduces over ranks, computed on this process's share of the batch."""
    _, advantages, _ = rewards_and_advantages(
        batch["scores"],
        batch["logprobs"],
        batch["ref_logprobs"],
        batch["values"],
        batch["mask"],
        kl_beta=0.1,
        gamma=1.0,
        lam=0.95,
    )
    running = RunningMoments(all_reduce_sum)
    running.update(batch["scores"])
    running.update(batch["scores"][batch["scores"] > 0])  # uneven counts per rank
    controller = AdaptiveKLController(0.1, target=0.05, horizon=100)
    kl = masked_sum(kl_k1(batch["logprobs"], batch["ref_logprobs"]), batch["mask"], dim=1)
    n_sequences = int(all_reduce_sum(torch.tensor(float(len(kl)))))
    controller.update(global_mean(kl), n_steps=n_sequences)
    mean, var, count = global_masked_moments(batch["values"], batch["mask"])
    return {
        "advantages": advantages,
        "running": torch.tensor([running.mean, running.var, running.count], dtype=torch.float64),
        "beta": torch.tensor(controller.value, dtype=torch.float64),
        "moments": torch.stack([mean.double(), var.double(), count]),
    }


def _token_mean_gradient(mask: torch.Tensor, micro: int = 3) -> torch.Tensor:
    """The gradient PPO's update takes on this process's rows: micro-batches of token-mean losses, each weighted by its
    tokens times :func:`token_mean_scale`, then averaged over ranks (a toy per-token loss ``(x . w)^2``)."""
    x = torch.randn(2 * B, R, 3, generator=torch.Generator().manual_seed(1))
    rank = dist.get_rank() if dist.is_initialized() else None
    x = x if rank is None else x[rank * B : (rank + 1) * B]
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    scale = token_mean_scale(mask.sum())
    for m in range(0, len(mask), micro):
        part = mask[m : m + micro]
        per_token = (x[m : m + micro] @ w) ** 2
        loss = per_token[part].mean() if part.any() else per_token.sum() * 0
        (loss * part.sum() * scale).backward()
    average_gradients([w])
    return w.grad.detach().clone()


def _ppo_metrics(rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """PPO's logged ``rollout/*`` metrics of the ``rows`` of a rollout built from :func:`_batch` (uneven tokens)."""
    g = torch.Generator().manual_seed(2)
    whole = {**_batch(), "returns": torch.randn(2 * B, R, generator=g) * 2 + 1}
    whole["advantages"] = torch.randn(2 * B, R, generator=g)
    batch = {k: v[rows] for k, v in whole.items()}
    n, mask = len(batch["scores"]), batch["mask"]
    ids = torch.ones(n, R, dtype=torch.long)
    rollout = Rollout(
        query_ids=ids,
        query_mask=torch.ones_like(mask),
        response_ids=ids,
        response_mask=mask,
        logprobs=batch["logprobs"],
        ref_logprobs=batch["ref_logprobs"],
        values=batch["values"],
        scores=batch["scores"],
        raw_scores=batch["scores"] * 2,
        rewards=torch.zeros(n, R),
        advantages=batch["advantages"] * mask,
        returns=batch["returns"] * mask,
        ended_with_eos=batch["scores"] > 0,
    )
    timings = SimpleNamespace(generation=1.0, scoring=1.0, generated_tokens=int(mask.sum()))
    metrics = iteration_metrics(rollout, timings, {}, 1.0, kl_beta=0.1)
    return {k: v for k, v in metrics.items() if k.startswith("rollout/")}


def _ppo_update(
    rank: int | None, mesh: object | None = None, micro_batch_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """Policy and critic weights after ``PPOModule._update`` (2 epochs, micro-batches of 3, gradient clipping) on this
    process's rows of one fixed rollout of 2B rows whose advantages are whitened by ``rewards_and_advantages``: rank
    r holds rows [rB, (r+1)B) and a minibatch of B; one process holds all 2B in a minibatch of 2B. With a device
    ``mesh`` the module shards its policy and critic as it does under FSDP2 before the update."""
    from rlhf_lightning.models.heads import ValueModel
    from rlhf_lightning.stages.ppo import PPOArgs
    from rlhf_lightning.stages.rollout import response_logprobs_of, response_values
    from rlhf_lightning.types import Rollout

    rows = slice(None) if rank is None else slice(rank * B, (rank + 1) * B)
    policy = _tiny_lm()
    value_model = ValueModel(_tiny_lm())
    g = torch.Generator().manual_seed(3)
    P = 3
    query = torch.randint(0, 64, (2 * B, P), generator=g)[rows]
    response = torch.randint(0, 64, (2 * B, R), generator=g)[rows]
    noise = 0.1 * torch.randn(2, 2 * B, R, generator=g)[:, rows]
    scores = torch.randn(2 * B, generator=g)[rows]
    mask = _batch()["mask"][rows]  # uneven token counts per rank
    sequences, sequence_mask = (
        torch.cat([query, response], 1),
        torch.cat([torch.ones_like(query, dtype=bool), mask], 1),
    )
    with torch.no_grad():  # old log-probs off the current policy's, so ratios differ from 1 and some clip
        logprobs = response_logprobs_of(policy, sequences, sequence_mask, P, 1.0) + noise[0]
        values = response_values(value_model, sequences, sequence_mask, P)
    ref_logprobs = logprobs + noise[1]
    rewards, advantages, returns = rewards_and_advantages(
        scores, logprobs, ref_logprobs, values, mask, kl_beta=0.1, gamma=1.0, lam=0.95
    )
    rollout = Rollout(
        query, torch.ones_like(query, dtype=bool), response, mask, logprobs, ref_logprobs, values, scores, scores,
        rewards, advantages, returns, torch.zeros(len(query), dtype=bool),
    )  # fmt: skip
    ppo = PPOArgs(
        epochs=2,
        minibatch_size=len(query),
        micro_batch_size=3,
        micro_batch_tokens=micro_batch_tokens,
        max_grad_norm=1.0,
    )
    module = PPOModule("unused", ppo=ppo)
    module.policy, module.value_model = policy, value_model
    if mesh is not None:
        module._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
        module._shard_trained_networks()
    optimizers = (
        torch.optim.SGD(policy.parameters(), lr=0.5),
        torch.optim.SGD(value_model.parameters(), lr=0.5),
    )
    module.optimizers = lambda use_pl_optimizer=False: optimizers
    module.manual_backward = lambda loss: loss.backward()
    module.generator.manual_seed(rank_seed(0, rank or 0))
    module._update(rollout, update_policy=True)
    weights = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    weights.update({f"value.{k}": v for k, v in value_model.state_dict().items()})
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in weights.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str, compute) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(compute(rank), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(compute, out: Path) -> list[dict[str, torch.Tensor]]:
    """``compute(rank) -> {name: tensor}`` in 2 spawned gloo processes (``compute``: a module-level function, so it
    pickles), saved under ``out``; the results in rank order."""
    mp.spawn(_rank_main, args=(_free_port(), str(out), compute), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _on_rank(rank: int) -> dict[str, torch.Tensor]:
    part = {k: v[rank * B : (rank + 1) * B] for k, v in _batch().items()}
    result = _statistics(part)
    result["token_mean_grad"] = _token_mean_gradient(part["mask"])
    result.update({f"ppo:{k}": v for k, v in _ppo_metrics(slice(rank * B, (rank + 1) * B)).items()})
    result.update({f"ppo_update/{k}": v for k, v in _ppo_update(rank).items()})
    # micro-batches by tokens: each rank's rows (uneven lengths) fall into its own number of groups
    result.update(
        {f"ppo_update_tokens/{k}": v for k, v in _ppo_update(rank, micro_batch_tokens=TOKENS).items()}
    )
    # per-rank means over 3 and 1 items (DPO's pair counts in a short batch), then over 2 and 0
    local = {"a": torch.tensor([1.0, 4.0][rank]), "b": torch.tensor([2.0, -1.0][rank], dtype=torch.float64)}
    for name, weights in (("uneven", (3, 1)), ("empty", (2, 0))):
        means, total = global_weighted_means(local, weights[rank])
        result[f"weighted:{name}"] = torch.stack([means["a"].double(), means["b"], total])
        result[f"weighted:{name}:dtypes"] = torch.tensor(
            [means["a"].dtype == torch.float32, means["b"].dtype == torch.float64]
        )
    # per-rank generators: seeded apart, gathered as on_save_checkpoint gathers them, restored as on load
    generator = torch.Generator().manual_seed(rank_seed(0, rank))
    torch.rand(3, generator=generator)
    payload = generator_payload(generator)
    before = torch.rand(4, generator=generator)
    restored = torch.Generator()
    restore_generator(restored, payload)
    after = torch.rand(4, generator=restored)
    restore_generator(restored, {"generator_state": payload["generator_state"]})  # older checkpoint
    legacy = torch.rand(4, generator=restored)
    result.update(before=before, after=after, legacy=legacy)
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return run_on_two_ranks(_on_rank, tmp_path_factory.mktemp("ddp"))


def test_two_ranks_of_batch_b_give_the_statistics_of_one_rank_of_batch_2b(two_ranks):
    one = _statistics(_batch())  # no process group: everything local
    torch.testing.assert_close(torch.cat([r["advantages"] for r in two_ranks]), one["advantages"])
    for key in ("running", "beta", "moments"):
        for rank in two_ranks:  # every rank holds the same (global) value, equal to one rank's
            torch.testing.assert_close(rank[key], one[key], msg=key)
    # the batch really is uneven across ranks (else a mean of per-rank means would pass too)
    mask = _batch()["mask"]
    assert mask[:B].sum() != mask[B:].sum()


GLOBAL_ROLLOUT_METRICS = (
    "rollout/score_std",
    "rollout/advantage_std",
    "rollout/advantage_raw_std",
    "rollout/advantage_mean",
    "rollout/advantage_raw_mean",
    "rollout/return_mean",
    "rollout/value_mean",
    "rollout/explained_variance",
)


def test_ppo_logs_the_rollout_stds_and_token_means_of_one_process_holding_every_rank_s_rollout(two_ranks):
    """Every rank's ``rollout/*`` std, token mean and explained variance is the value over the concatenated rollout
    (Lightning's ``sync_dist`` then averages equal values), not a per-rank value averaged over ranks."""
    one = _ppo_metrics()
    for key in GLOBAL_ROLLOUT_METRICS:
        for rank in two_ranks:
            torch.testing.assert_close(rank[f"ppo:{key}"], one[key], msg=key)
    for key in (
        "rollout/score_mean",
        "rollout/kl",
    ):  # equal batch sizes: the mean over ranks is the global mean
        torch.testing.assert_close((two_ranks[0][f"ppo:{key}"] + two_ranks[1][f"ppo:{key}"]) / 2, one[key])
    # the per-rank values differ from the global ones, so a mean of local values would fail the checks above
    local = _ppo_metrics(slice(0, B))
    for key in ("rollout/score_std", "rollout/advantage_std", "rollout/advantage_raw_std"):
        assert not torch.allclose(local[key], one[key]), key


def test_weighted_means_count_every_ranks_items_not_every_rank(two_ranks):
    for rank in two_ranks:
        torch.testing.assert_close(
            rank["weighted:uneven"], torch.tensor([7 / 4, 5 / 4, 4.0], dtype=torch.float64)
        )
        torch.testing.assert_close(rank["weighted:empty"], torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64))
        assert rank["weighted:uneven:dtypes"].all()  # each mean keeps its input's dtype


def test_ppo_update_is_the_token_mean_over_every_ranks_tokens(two_ranks):
    """2 ranks with different token counts step on the gradient one process takes on both ranks' rows."""
    one = _token_mean_gradient(_batch()["mask"])
    for rank in two_ranks:
        torch.testing.assert_close(rank["token_mean_grad"], one)


def test_ppo_update_on_two_ranks_of_b_rows_gives_the_weights_of_one_rank_of_2b(two_ranks):
    """PPOModule._update itself on one rollout split over 2 ranks with uneven token counts (global whitening, global
    token-mean policy and value losses, gradients averaged once per step, clipping after) ends with the policy and
    critic weights of one process updating on the whole rollout."""
    one = _ppo_update(None)
    start = {f"policy.{k}": v for k, v in _tiny_lm().state_dict().items()}
    assert any(not torch.equal(one[k], v) for k, v in start.items())  # the update moved the policy
    for rank in two_ranks:
        for name, weight in one.items():
            torch.testing.assert_close(rank[f"ppo_update/{name}"], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_ppo_update_with_micro_batch_tokens_on_two_ranks_gives_the_weights_of_one_rank(two_ranks):
    """``micro_batch_tokens`` on 2 ranks whose rows group differently (every rank runs as many micro-batches as the
    rank with the most, or DDP/FSDP2 collectives would hang) still ends with one process's weights on all rows."""
    one = _ppo_update(None, micro_batch_tokens=TOKENS)
    for rank in two_ranks:
        for name, weight in one.items():
            torch.testing.assert_close(
                rank[f"ppo_update_tokens/{name}"], weight, atol=1e-6, rtol=1e-5, msg=name
            )


def test_every_rank_resumes_its_own_generator_stream(two_ranks):
    first, second = two_ranks
    assert not torch.equal(first["before"], second["before"])  # distinct samples per rank before the save
    for rank in two_ranks:  # and after a resume: each rank continues its own stream
        torch.testing.assert_close(rank["after"], rank["before"])
    # a checkpoint holding only rank 0's state: rank 0 continues it, rank 1 starts a stream of its own
    torch.testing.assert_close(first["legacy"], first["before"])
    assert not torch.equal(second["legacy"], first["legacy"])


# ------------------------------------------------------------------------------------------------- FSDP2 sharding
def _lm_gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full gradients of a toy LM loss that goes through ``hidden_states`` then ``lm_head``, as the SFT loss does."""
    model.lm_head(model.hidden_states(ids)).logsumexp(-1).mean().backward()
    return {n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for n, p in model.named_parameters()}


def _tiny_lm() -> torch.nn.Module:
    from rlhf_lightning.models.factory import ModelArgs, build_model

    torch.manual_seed(0)
    return build_model(ModelArgs(preset="tiny", dropout=0.0), 64)


def _on_shard_rank(rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from rlhf_lightning.distributed import shard_for_strategy

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = shard_for_strategy(_tiny_lm(), mesh)  # ModelParallelStrategy's mesh, tensor_parallel_size 1
    ids = torch.randint(0, 64, (2 * B, 8), generator=torch.Generator().manual_seed(2))[
        rank * B : (rank + 1) * B
    ]
    result = {f"grad/{n}": g for n, g in _lm_gradients(model, ids).items()}
    result["all_dtensors"] = torch.tensor(all(isinstance(p, DTensor) for p in model.parameters()))
    result["local_wte_rows"] = torch.tensor(model.wte.weight.to_local().shape[0])
    result.update({f"ppo_update/{k}": v for k, v in _ppo_update(rank, mesh).items()})
    return result


@pytest.fixture(scope="module")
def sharded_ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return run_on_two_ranks(_on_shard_rank, tmp_path_factory.mktemp("fsdp2"))


def test_stage_networks_shard_with_fsdp2_on_a_device_mesh_and_step_on_the_global_mean(sharded_ranks):
    """``shard_for_strategy`` (what SFT and the reward model call in ``configure_model``): with a mesh every
    parameter is a DTensor holding half the rows on each of 2 ranks, and the averaged gradient of 2 x b rows equals
    one process's gradient on 2b; without a mesh it changes nothing."""
    from rlhf_lightning.distributed import shard_for_strategy

    ranks = sharded_ranks
    model = _tiny_lm()
    assert (
        shard_for_strategy(model, None) is model and type(model).__name__ == "GPT"
    )  # a no-op without a mesh
    expected = _lm_gradients(
        model, torch.randint(0, 64, (2 * B, 8), generator=torch.Generator().manual_seed(2))
    )
    for rank in ranks:
        assert bool(rank["all_dtensors"]) and int(rank["local_wte_rows"]) == 32  # 64 rows split over 2 ranks
        for name, grad in expected.items():
            torch.testing.assert_close(rank[f"grad/{name}"], grad, msg=name)


def test_ppo_update_with_fsdp2_sharded_networks_gives_the_weights_of_one_rank(sharded_ranks):
    """PPOModule under FSDP2 (policy and critic sharded by its own configure_model step, the critic's (1, D) head
    kept whole and averaged by PPO): the update on 2 ranks x B rows ends with one process's weights on 2B rows."""
    one = _ppo_update(None)
    for rank in sharded_ranks:
        for name, weight in one.items():
            torch.testing.assert_close(rank[f"ppo_update/{name}"], weight, atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------------- SFT loss
def test_sft_accumulated_step_is_the_token_mean_of_the_whole_step(tmp_path, tiny_tokenizer):
    """2 accumulated batches with different token counts step as one batch of both: the token mean, not the mean of
    the two batch means."""
    from trainers import quiet_trainer  # tests/ is on sys.path under pytest

    from rlhf_lightning.models.factory import ModelArgs, build_model
    from rlhf_lightning.stages.sft import SFTModule
    from rlhf_lightning.types import SFTBatch

    torch.manual_seed(0)
    ids = torch.randint(5, 500, (4, 12))
    attention = torch.ones_like(ids, dtype=torch.bool)
    loss_mask = torch.zeros_like(attention)
    loss_mask[0, 2:12] = True  # batch 1: 10 + 9 target tokens ...
    loss_mask[1, 3:12] = True
    loss_mask[2:, 10:12] = True  # ... batch 2: 2 + 2
    batches = [SFTBatch(ids[i : i + 2], attention[i : i + 2], loss_mask[i : i + 2]) for i in (0, 2)]
    whole = SFTBatch(ids, attention, loss_mask)

    def module() -> SFTModule:
        m = SFTModule(
            optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
            scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
        )
        torch.manual_seed(1)
        m.model = build_model(ModelArgs(preset="tiny", dropout=0.0), tiny_tokenizer.vocab_size)
        return m

    reference = module()
    start = {k: v.clone() for k, v in reference.model.state_dict().items()}
    loss, _ = reference.loss(whole)
    loss.backward()
    expected = {n: start[n] - p.grad for n, p in reference.model.named_parameters()}

    stepped = module()
    trainer = quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(stepped, train_dataloaders=loader)
    for name, param in stepped.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], msg=name, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------- the shipped configs, 2 ranks
def _fit(config: str, cwd: Path, *extra: str, devices: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf_lightning.cli", "fit", "--config", str(REPO / "configs" / config)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp", "--trainer.devices", str(devices)]
    cmd += ["--trainer.accelerator", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _metrics(folder: Path) -> list[dict[str, str]]:
    import csv

    (path,) = sorted(folder.glob("version_*/metrics.csv"))[-1:]
    return list(csv.DictReader(path.open()))


def _last(rows: list[dict[str, str]], key: str) -> float:
    return [float(r[key]) for r in rows if r.get(key)][-1]


@pytest.mark.slow
def test_sft_reward_and_ppo_tiny_configs_run_on_two_cpu_ranks(tmp_path):
    """The shipped tiny configs, unchanged, on 2 gloo ranks: SFT, reward, then PPO with an adaptive KL controller and
    a critic warm-up iteration (policy left out of a step), resumed once; sane metrics, one beta on every rank."""
    (tmp_path / "data").symlink_to(
        REPO / "data"
    )  # the configs' relative paths; outputs land under tmp_path/runs
    _fit("sft_tiny.yaml", tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3")
    sft = _metrics(tmp_path / "runs/tiny/sft")
    assert 0 < _last(sft, "val/loss") < 10
    _fit("reward_tiny.yaml", tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "10")
    reward = _metrics(tmp_path / "runs/tiny/reward")
    assert 0 <= _last(reward, "val/accuracy") <= 1
    ppo_args = [
        "--model.init_args.ppo.critic_warmup_iterations=1",
        "--model.init_args.ppo.kl_target=0.01",
        "--model.init_args.ppo.kl_horizon=50",
        "--model.init_args.rewards.calibration_samples=8",
        "--trainer.val_check_interval=2",
    ]
    _fit("ppo_tiny.yaml", tmp_path, "--trainer.max_steps", "3", *ppo_args)
    ckpt = tmp_path / "runs/tiny/ppo/checkpoints/iter-step=3.ckpt"
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)["rlhf_lightning"]
    states = payload["generator_states"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])
    _fit("ppo_tiny.yaml", tmp_path, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt), *ppo_args)
    rows = _metrics(tmp_path / "runs/tiny/ppo")
    assert _last(rows, "ppo/kl_beta") != 0.05  # the adaptive controller moved beta (the same on both ranks)
    assert abs(_last(rows, "rollout/score_mean")) <= 5


# ------------------------------------------------------------------------------ 2 ranks x b == 1 rank x 2b, end to end
def _weights_after(
    config: str, folder: Path, devices: int, batch_size: int, *extra: str
) -> dict[str, torch.Tensor]:
    """The weights ``config`` ends with when run through ``rlhf-lightning fit`` on ``devices`` gloo processes of
    ``batch_size`` rows each (dropout off; one shared tokenizer, trained by the first run)."""
    folder.mkdir()
    (folder / "data").symlink_to(REPO / "data")
    tokenizer = folder.parent / "tokenizer.json"
    _fit(
        config,
        folder,
        f"--data.init_args.batch_size={batch_size}",
        f"--data.init_args.tokenizer_path={tokenizer}",
        "--model.init_args.model.dropout=0.0",
        *extra,
        devices=devices,
    )
    (ckpt,) = folder.glob("runs/tiny/**/checkpoints/last.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3  # three optimizer steps
    return checkpoint["state_dict"]


def _assert_same_weights(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> None:
    assert two.keys() == one.keys()
    worst = max(float((two[n].float() - one[n].float()).abs().max()) for n in one)
    print(f"largest weight difference, 2 ranks x b vs 1 x 2b: {worst:.2e}")
    # float rounding differs (gradients summed in another order) and Adam divides it by tiny second moments: up to
    # ~1e-5 measured; a different split of the rows or a mean of per-rank means moves weights by ~1e-3 (a step)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_sft_on_two_ranks_of_batch_b_ends_with_the_weights_of_one_rank_of_batch_2b(tmp_path):
    """sft_tiny.yaml for 3 AdamW steps (clipping and warm-up as shipped): 2 gloo ranks x 4 conversations end with the
    weights of 1 process x 8. Needs the sampler to hand rank r the r-th half of the single process's batch, and the
    loss to be the token mean of the whole global batch (the ranks hold different token counts)."""
    steps = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
    one = _weights_after("sft_tiny.yaml", tmp_path / "one", 1, 8, *steps)
    two = _weights_after("sft_tiny.yaml", tmp_path / "two", 2, 4, *steps)
    _assert_same_weights(two, one)


@pytest.mark.slow
def test_reward_model_on_two_ranks_of_batch_b_ends_with_the_weights_of_one_rank_of_batch_2b(tmp_path):
    """reward_tiny.yaml from random weights for 3 steps: 2 gloo ranks x 2 pairs == 1 process x 4 pairs."""
    steps = ["--model.init_args.init_from=null", "--trainer.max_steps=3", "--trainer.limit_val_batches=0"]
    one = _weights_after("reward_tiny.yaml", tmp_path / "one", 1, 4, *steps)
    two = _weights_after("reward_tiny.yaml", tmp_path / "two", 2, 2, *steps)
    _assert_same_weights(two, one)
