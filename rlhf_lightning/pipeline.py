"""SFT -> reward model -> PPO in sequence, from one config (the project's main job). ``RLHFConfig.algorithm`` picks the
last stage (:data:`ALGORITHM_STAGES`): ``ppo``; ``grpo``, ``dr_grpo`` or ``rloo`` (the critic-free GRPOModule,
``grpo.baseline`` set from the algorithm; the reward-model stage is left out when the stage config gives the reward
model no weight, ``rewards.model_weight: 0``, e.g. a verifiable reward); ``dpo``: SFT -> DPO on the preference pairs
(no reward model).

Each stage is an ordinary stage run: its YAML (``configs/sft.yaml`` ... or inline) is parsed by the same
LightningCLI as ``rlhf-lightning fit``, the :class:`RLHFConfig` fields are written over it, and the checkpoint its
``ModelCheckpoint`` chose (best by the stage's monitor, else last) is handed to the next stage.

Run folder (``save_dir``)::

    tokenizer.json
    sft/      config.yaml  checkpoints/  logs/ (metrics.csv, hparams.yaml, samples_*.csv)  wandb/  done.json
    reward/   ...
    ppo/      ...                      (or grpo/, rloo/, dpo/: the algorithm's stage)
    plots/    sft.png  reward.png  ppo.png (grpo.png, rloo.png, dpo.png)
    evaluation/  evaluation.json  evaluation.md  evaluation.png  samples.csv  samples.md
    summary.json

Watching a run: every stage logs to a CSV record (``<stage>/logs/metrics.csv``, read by the plots written to
``plots/`` after each stage) and to the logger ``RLHFConfig.logger`` names: ``wandb`` (default; offline without an
API key or network, see ``rlhf_lightning.loggers``; the three stages form one W&B group named after the run folder,
each run's job type is its stage), ``tensorboard`` (``<stage>/tensorboard``) or ``csv`` (the CSV record only). The
stage config and the pipeline config are logged as hyper-parameters. The stage YAMLs' own ``trainer.logger`` is
replaced.

A stage with ``done.json`` is skipped on a rerun; a stage with checkpoints but no ``done.json`` was interrupted and
resumes from its ``last.ckpt``. Every stage's config and data are checked before the first stage trains, without
a Trainer (:meth:`RLHFPipeline.validate`): each stage builds one Trainer and sets its seed once.

Several devices (``devices``, ``strategy``, ``num_nodes``, written into every stage's ``trainer``), e.g.
``rlhf-lightning pipeline --config configs/pipeline_tiny.yaml --devices 2 --strategy ddp --device cpu``: the stages
run in this process as they do on one device. Lightning's DDP launcher starts the other ranks at the first stage's
first Trainer call by running the same command again (with ``LOCAL_RANK`` set); it then sets ``LOCAL_RANK=0`` in this
process, so the later stages' Trainers find their ranks running and reuse the process group instead of launching
new ones. Every rank runs the whole pipeline; only rank 0 (:func:`is_main_process`) writes the bookkeeping
(``config.yaml``, ``before.json``, ``done.json``, ``summary.json``, plots, archived folders), deletes with
``overwrite``, prints and evaluates. The other ranks read the run folder only where it cannot yet have changed
(before the process group exists, i.e. before the first Trainer: rank 0 is then blocked waiting for them); once it
exists every decision taken from the folder (finished or not, resume, ``before.json``) and the checkpoint handed to
the next stage are rank 0's, broadcast (:func:`agree`). Why in-process rather than one ``rlhf-lightning fit``
subprocess per stage: the stages' results (chosen checkpoint, metrics, evaluation settings) and user objects
(``datamodules`` classes defined in ``__main__``) stay in one process, the stage runs are exactly the single-device
ones, and the launcher's own re-run is what ``rlhf-lightning fit`` relies on already. Several nodes
(``num_nodes`` > 1, each node's command started by hand or by SLURM): the other nodes read the run folder before the
process group exists too, so start a fresh run there without ``--overwrite`` or ``--stages`` reruns (both change the
folder before the first stage).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

STAGES = ("sft", "reward", "ppo")
ALGORITHM_STAGES = {
    "ppo": STAGES,
    "grpo": ("sft", "reward", "grpo"),
    "dr_grpo": ("sft", "reward", "grpo"),  # the grpo stage config with grpo.baseline: dr_grpo
    "rloo": ("sft", "reward", "rloo"),
    "dpo": ("sft", "dpo"),
}  # RLHFConfig.algorithm -> the stages it runs, in order (grpo/rloo drop "reward" when the reward model has no weight)
# algorithm -> the GRPOModule's grpo.baseline
GROUP_BASELINES = {"grpo": "grpo", "dr_grpo": "dr_grpo", "rloo": "rloo"}
# online RL stages: fed by the ppo_* fields, counted in iterations, validated before and after training
ONLINE_STAGES = ("ppo", "grpo", "rloo")
LOGGER_CHOICES = (
    "wandb",
    "tensorboard",
    "csv",
)  # = rlhf_lightning.loggers.LOGGER_CHOICES (kept import-free here)


@dataclass
class RLHFConfig:
    """The seed design's pipeline config; finer settings live in the stage configs.

    Args:
        tokenizer_path: the tokenizer file; trained on the SFT data when it does not exist (default: in save_dir).
        sft_data_path: conversations for SFT (JSONL).
        reward_data_path: preference pairs for the reward model, or for DPO (JSONL).
        ppo_data_path: prompts for PPO, GRPO or RLOO (JSONL).
        sft_val_path: held-out conversations to validate SFT on. Unset: the stage YAML's validation file while
            ``sft_data_path`` is the file that YAML trains on, else a held-out fraction of ``sft_data_path``
            (the YAML's ``val_fraction``, 0.1 when it has none), so the stage validates on the user's own data.
        reward_val_path: held-out preference pairs for the reward model (same rule: it picks the best checkpoint,
            so it must come from the same data as ``reward_data_path``).
        ppo_val_path: held-out prompts for PPO's evaluations (same rule).
        sft_epochs: SFT epochs.
        reward_epochs: reward-model epochs (about one; more overfits).
        ppo_iterations: PPO (GRPO, RLOO) iterations (one = one batch of prompts and its updates).
        ppo_lr_policy: policy learning rate in PPO (GRPO, RLOO: the ``optimizer``'s).
        ppo_lr_value: critic learning rate in PPO (GRPO and RLOO have no critic: unused).
        ppo_batch_size: prompts per PPO (GRPO, RLOO) iteration.
        device: ``auto`` (CUDA, MPS or CPU), ``cpu``, ``cuda``/``gpu`` or ``mps``.
        devices: devices per node for every stage (``trainer.devices``: a count, ``auto``, ``-1`` or a list of ids);
            None keeps each stage config's own. With ``strategy: ddp`` the pipeline runs data-parallel, e.g.
            ``devices: 2, strategy: ddp, device: cpu`` (2 gloo processes; see the module docstring).
        strategy: every stage's ``trainer.strategy`` (``ddp``, ``fsdp``, ``deepspeed_stage_2``, ... or a
            ``{"class_path": ..., "init_args": ...}`` dict); None keeps each stage config's own.
        num_nodes: every stage's ``trainer.num_nodes``; None keeps each stage config's own.
        save_dir: run folder: one sub-folder per stage, the tokenizer and summary.json.
        save_interval: PPO (GRPO, RLOO) iterations between checkpoints.
        model_preset: size preset of the built-in model (tiny, small, medium, large); None keeps the stage configs'.
        logger: where stages log besides their CSV record: ``wandb`` (offline without a key or network),
            ``tensorboard`` or ``csv`` (the CSV record only).
        eval_prompts: after PPO (GRPO, RLOO), the SFT policy (baseline) and the final policy answer this many
            held-out prompts (``ppo_val_path``, else the stage DataModule's validation prompts), judged by the reward
            model when the pipeline trained one and the stage's reward functions (``rlhf_lightning.evaluation``); 0 =
            no evaluation. DPO has no judge: no closing evaluation.
        stage_configs: YAML file (or inline dict) per stage: ``sft``, ``reward``, ``ppo``, ``grpo`` (also for
            ``dr_grpo``), ``rloo``, ``dpo``; only the chosen algorithm's are needed.
        algorithm: ``ppo`` (SFT -> reward model -> PPO); ``grpo``, ``dr_grpo`` or ``rloo`` (SFT -> reward model ->
            GRPOModule with that baseline, in stage ``grpo`` or ``rloo``; no reward-model stage when the stage
            config's ``rewards.model_weight`` is 0); ``dpo`` (SFT -> DPO on ``reward_data_path`` /
            ``reward_val_path``, no reward model).
    """

    tokenizer_path: str | None = None
    sft_data_path: str = "data/hh_rlhf/sft_train.jsonl"
    reward_data_path: str = "data/hh_rlhf/preference_train.jsonl"
    ppo_data_path: str = "data/hh_rlhf/prompts_train.jsonl"
    sft_val_path: str | None = None
    reward_val_path: str | None = None
    ppo_val_path: str | None = None
    sft_epochs: int | None = None
    reward_epochs: int | None = None
    ppo_iterations: int | None = None
    ppo_lr_policy: float | None = None
    ppo_lr_value: float | None = None
    ppo_batch_size: int | None = None
    device: str = "auto"
    devices: int | str | list[int] | None = None
    strategy: str | dict[str, Any] | None = None
    num_nodes: int | None = None
    save_dir: str = "runs/pipeline"
    save_interval: int | None = None
    model_preset: str | None = None
    logger: str = "wandb"
    eval_prompts: int = 64
    stage_configs: dict[str, Any] = field(
        default_factory=lambda: {
            "sft": "configs/sft.yaml",
            "reward": "configs/reward.yaml",
            "ppo": "configs/ppo.yaml",
            "grpo": "configs/grpo.yaml",
            "rloo": "configs/rloo.yaml",
            "dpo": "configs/dpo.yaml",
        }
    )
    algorithm: str = "ppo"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda", "gpu", "mps"):
            raise ValueError(f"device={self.device!r}; expected 'auto', 'cpu', 'cuda', 'gpu' or 'mps'")
        if self.logger not in LOGGER_CHOICES:
            raise ValueError(f"logger={self.logger!r}; expected one of {LOGGER_CHOICES}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts={self.eval_prompts}; expected 0 (off) or a positive count")
        for name in (
            "sft_epochs",
            "reward_epochs",
            "ppo_iterations",
            "ppo_batch_size",
            "save_interval",
            "num_nodes",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}; expected a positive integer")
        if self.algorithm not in ALGORITHM_STAGES:
            raise ValueError(f"algorithm={self.algorithm!r}; expected one of {sorted(ALGORITHM_STAGES)}")
        stages = [s for s in ALGORITHM_STAGES[self.algorithm] if s != "reward" or self.algorithm == "ppo"]
        missing = [s for s in stages if s not in self.stage_configs]  # grpo/rloo: "reward" checked once known
        if missing:
            raise ValueError(
                f"stage_configs lacks {missing}; expected a YAML path or dict for each of {stages}"
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> RLHFConfig:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(
                f"{path}: unknown field(s) {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _callbacks(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    callbacks = config.get("trainer", {}).get("callbacks") or []
    return [c for c in callbacks if isinstance(c, dict) and c.get("class_path", "").endswith(name)]


class RLHFPipeline:
    """Runs the stages of ``config.algorithm`` in sequence (see the module docstring).

    Args:
        config: the pipeline config.
        stages: which stages to run (others must be finished in ``save_dir`` when a later stage needs them).
            ``None`` runs them all (:attr:`chain`) and skips the ones finished earlier (a rerun resumes the pipeline); stages named
            here are run again even when finished: their previous folder is kept as ``<stage>.previous-<n>``.
        overwrite: delete an existing ``save_dir`` and start over (a finished run is never overwritten without it).
        model: a ``ModelArgs``-style dict for the built-in model (overrides the stage configs' ``model``).
        datamodules: per-stage DataModule config (``{"class_path": ..., "init_args": ...}``) replacing the default.
            The pipeline sets its ``train_path`` (the stage's ``*_data_path``) and, when the class takes one, its
            ``tokenizer_path`` (the run's tokenizer); the class is imported by its path (``__main__.MyData`` for
            one defined in a script or notebook).
    """

    def __init__(
        self,
        config: RLHFConfig,
        stages: Sequence[str] | None = None,
        overwrite: bool = False,
        model: dict[str, Any] | None = None,
        datamodules: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.chain = self._chain()
        bad = [s for s in stages or () if s not in self.chain]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; expected some of {self.chain}")
        if stages is not None and not stages:
            raise ValueError(f"no stage to run; expected some of {self.chain}")
        self.rerun = stages is not None  # named stages run again even when finished
        self.stages = [s for s in self.chain if stages is None or s in stages]
        self.overwrite = overwrite
        self.model = model
        self.datamodules = datamodules or {}
        self.root = Path(config.save_dir)
        self.tokenizer_path = config.tokenizer_path or str(self.root / "tokenizer.json")
        self._checked: dict[str, tuple[dict[str, Any], Any]] = {}  # stage -> (config, build) from validate()
        self._eval_settings: dict[
            str, dict[str, Any]
        ] = {}  # final stage -> its evaluation settings, once run

    # -- configs ----------------------------------------------------------------------------------------------------
    def _chain(self) -> tuple[str, ...]:
        """The algorithm's stages (:data:`ALGORITHM_STAGES`); GRPO/RLOO without ``reward`` when their stage config
        gives the reward model no weight (``model.init_args.rewards.model_weight: 0``: reward functions only)."""
        chain = ALGORITHM_STAGES[self.config.algorithm]
        final = chain[-1]
        if final in ("grpo", "rloo"):
            from rlhf_lightning.stages.rewards import RewardArgs

            rewards = self._source(final).get("model", {}).get("init_args", {}).get("rewards") or {}
            if rewards.get("model_weight", RewardArgs.model_weight) == 0:
                chain = tuple(s for s in chain if s != "reward")
        if "reward" in chain and "reward" not in self.config.stage_configs:
            raise ValueError(
                f"stage_configs lacks ['reward']; algorithm {self.config.algorithm!r} trains a reward model "
                f"(stage_configs.{final} gives it a weight): add a reward stage YAML or set its rewards.model_weight: 0"
            )
        return chain

    def _source(self, stage: str) -> dict[str, Any]:
        """A copy of ``stage_configs[stage]``: the inline dict or the parsed YAML file."""
        source = self.config.stage_configs[stage]
        if isinstance(source, dict):
            return copy.deepcopy(source)
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"stage_configs.{stage}: {path} not found; expected a stage YAML file")
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}

    def stage_config(self, stage: str, inputs: dict[str, str]) -> dict[str, Any]:
        """The stage's YAML with the pipeline's settings and the previous stages' checkpoints written in."""
        config = self._source(stage)
        c, folder = self.config, self.root / stage
        if stage in self.datamodules:
            config["data"] = copy.deepcopy(self.datamodules[stage])
        _set(config, "trainer.accelerator", "gpu" if c.device == "cuda" else c.device)
        for key in ("devices", "strategy", "num_nodes"):  # None: the stage config's own
            if getattr(c, key) is not None:
                _set(config, f"trainer.{key}", copy.deepcopy(getattr(c, key)))
        _set(config, "trainer.default_root_dir", str(folder))
        _set(config, "trainer.logger", _stage_loggers(c.logger, folder, stage, self.root.resolve().name))
        for callback in _callbacks(config, "ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(folder / "checkpoints")
        data_args = config.setdefault("data", {}).setdefault("init_args", {})
        model_args = config.setdefault("model", {}).setdefault("init_args", {})
        user_class = self.datamodules.get(stage, {}).get("class_path")
        if user_class is None or "tokenizer_path" in data_args or _takes(user_class, "tokenizer_path"):
            data_args["tokenizer_path"] = self.tokenizer_path
        if self.model is not None and stage in ("sft", "reward"):
            model_args["model"] = {**model_args.get("model", {}), **self.model}
        elif c.model_preset is not None and stage == "sft":
            model_args.setdefault("model", {})["preset"] = c.model_preset
        if user_class is None:
            _follow_data(data_args, *self._data_paths(stage))
        else:  # a user's DataModule: only the train file is the pipeline's to set
            data_args["train_path"] = self._data_paths(stage)[0]
        if stage == "sft":
            if c.sft_epochs is not None:
                _set(config, "trainer.max_epochs", c.sft_epochs)
        elif stage == "reward":
            model_args["init_from"] = inputs.get("sft", model_args.get("init_from"))
            if c.reward_epochs is not None:
                _set(config, "trainer.max_epochs", c.reward_epochs)
        elif stage == "dpo":  # no reward model: the SFT policy is the start and the reference
            model_args["policy_from"] = inputs.get("sft", model_args.get("policy_from"))
        else:  # ppo, grpo, rloo: online RL from prompts
            model_args["policy_from"] = inputs.get("sft", model_args.get("policy_from"))
            if "reward" in self.chain:
                model_args["reward_from"] = inputs.get("reward", model_args.get("reward_from"))
            else:  # the reward model has no weight: none is trained, none is loaded
                model_args["reward_from"] = None
            args_key = "ppo" if stage == "ppo" else "grpo"  # PPOArgs / GRPOArgs
            if stage != "ppo":
                model_args.setdefault(args_key, {})["baseline"] = GROUP_BASELINES[c.algorithm]
            if c.ppo_iterations is not None:
                _set(config, "trainer.max_steps", c.ppo_iterations)
                model_args.setdefault(args_key, {})["iterations"] = c.ppo_iterations
            if c.ppo_batch_size is not None:
                data_args["batch_size"] = c.ppo_batch_size
            optimizers = (
                (("policy_optimizer", c.ppo_lr_policy), ("value_optimizer", c.ppo_lr_value))
                if stage == "ppo"
                else (("optimizer", c.ppo_lr_policy),)  # no critic
            )
            for key, lr in optimizers:
                if lr is not None:
                    optimizer = model_args.setdefault(key, {"class_path": "torch.optim.AdamW"})
                    optimizer.setdefault("init_args", {})["lr"] = lr
            if c.save_interval is not None:
                for callback in _callbacks(config, "ModelCheckpoint"):
                    callback["init_args"]["every_n_train_steps"] = c.save_interval
        return config

    def _data_paths(self, stage: str) -> tuple[str, str | None]:
        c = self.config
        return {
            "sft": (c.sft_data_path, c.sft_val_path),
            "reward": (c.reward_data_path, c.reward_val_path),
            "dpo": (c.reward_data_path, c.reward_val_path),  # the same preference pairs
            "ppo": (c.ppo_data_path, c.ppo_val_path),
            "grpo": (c.ppo_data_path, c.ppo_val_path),
            "rloo": (c.ppo_data_path, c.ppo_val_path),
        }[stage]

    def _cli(self, config: dict[str, Any], defer_trainer: bool = False):
        """The stage's LightningCLI (``run=False``) on ``config`` (edited in place by parsing). ``defer_trainer``:
        DataModule and LightningModule only, no seeding and no Trainer (``RLHFLightningCLI.build_trainer``)."""
        from lightning.pytorch import LightningDataModule, LightningModule

        from rlhf_lightning.stage_cli import RLHFLightningCLI

        with mock.patch.object(
            sys, "argv", sys.argv[:1]
        ):  # the stage config comes from `config`, not the shell
            return RLHFLightningCLI(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                run=False,
                args=config,
                auto_configure_optimizers=False,
                save_config_callback=None,
                defer_trainer=defer_trainer,
            )

    # -- early validation -----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Parse every stage's config and check its data files, before anything trains.

        Each stage's DataModule and LightningModule are built (argument checks; the networks are built later, in
        ``configure_model``), but no Trainer and no seeding: nothing is printed twice. A stage whose config does not
        depend on an earlier stage's checkpoint (the first one) keeps this build and runs on it (:meth:`_stage_cli`).
        """
        placeholders = {"sft": "<sft checkpoint>", "reward": "<reward checkpoint>"}
        self._checked = {}
        for stage in self.stages:
            config = self.stage_config(stage, placeholders)
            parsed = copy.deepcopy(config)  # parsing edits config in place
            try:
                cli = self._cli(config, defer_trainer=True)
            except SystemExit as err:
                raise ValueError(f"stage '{stage}': invalid config (see the message above)") from err
            check = getattr(cli.datamodule, "validate_inputs", None)
            if callable(check):
                check()
            self._checked[stage] = (parsed, cli)

    def _stage_cli(self, stage: str, config: dict[str, Any]):
        """The stage's build for running ``config``: the one :meth:`validate` made when it parsed this very config
        (no placeholder in it), else a new one; the Trainer is built (and the seed set) here, once."""
        parsed, cli = self._checked.pop(stage, (None, None))
        if cli is None or parsed != config:
            cli = self._cli(config, defer_trainer=True)
        cli.build_trainer()
        return cli

    # -- running ------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the selected stages and return the summary."""
        main = is_main_process()
        if self.overwrite and self.root.exists() and main:  # a rank Lightning started later must not delete
            shutil.rmtree(self.root)
        self.validate()
        self.root.mkdir(parents=True, exist_ok=True)
        summary = self._read_json(self.root / "summary.json") or {"stages": {}}
        summary["config"] = asdict(self.config)
        inputs: dict[str, str] = {}
        for stage in self.chain:
            # every rank acts on rank 0's reading (the run folder changes under the ranks' feet)
            done = agree(self._read_json(self.root / stage / "done.json"))
            if stage not in self.stages:
                if done:
                    inputs[stage] = done["checkpoint"]
                continue
            if done and self.rerun:
                kept = self._archive(stage) if main else None
                agree(None)  # the old folder is moved aside before any rank goes on
                say(
                    f"[pipeline] {stage}: finished earlier; running it again as asked (previous run kept in {kept})"
                )
            elif done:
                say(f"[pipeline] {stage}: finished earlier, skipped ({done['checkpoint']})")
                inputs[stage] = done["checkpoint"]
                summary["stages"][stage] = done["results"]
                continue
            for needed in self.chain[: self.chain.index(stage)]:
                if needed not in inputs:
                    raise FileNotFoundError(
                        f"stage '{stage}' needs the '{needed}' stage's checkpoint; expected {self.root / needed}"
                        "/done.json (run that stage first)"
                    )
            result = self._run_stage(stage, inputs)
            inputs[stage] = result["checkpoint"]
            summary["stages"][stage] = result["results"]
            if main:
                self._write_json(self.root / stage / "done.json", result)
                self._write_json(self.root / "summary.json", summary)
        self._checked.clear()  # builds of stages skipped as finished: not needed any more
        agree(None)  # every rank has finished training before the others leave
        if not main:  # the closing evaluation and the summary are rank 0's
            return summary
        final = self.chain[-1]
        if final in self.stages and final in ONLINE_STAGES and self.config.eval_prompts:
            summary["evaluation"] = self._evaluate(inputs, summary.get("evaluation"))
        self._write_json(self.root / "summary.json", summary)
        print(format_summary(summary))
        return summary

    def _evaluate(self, inputs: dict[str, str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The SFT policy (baseline) against the final policy (PPO, GRPO or RLOO stage) on at most
        ``eval_prompts`` held-out prompts, judged by the reward model when the chain trained one and by the stage's
        reward functions and held-out judges (``rlhf_lightning.evaluation``): writes ``evaluation/`` and returns the
        summary's ``evaluation`` entry (the table and per-policy results). ``previous`` (the summary's entry) is kept
        when ``evaluation.json`` is newer than the final stage's ``done.json``. A failure is reported, as
        ``{"error": ...}`` and on stdout, and never touches the trained checkpoints."""
        final = self.chain[-1]
        out, done = self.root / "evaluation", self.root / final / "done.json"
        report = out / "evaluation.json"
        fresh = report.is_file() and done.is_file() and report.stat().st_mtime >= done.stat().st_mtime
        if previous and "error" not in previous and fresh:  # a rerun that skipped the stage: nothing new
            return previous
        try:
            import torch

            from rlhf_lightning.evaluation import EvalArgs, evaluate, format_table, write_evaluation

            c = self.config
            # the final stage's own data, sampling settings and reward functions: taken from its build when it ran
            # just now, else from a new build of its config (no Trainer)
            settings = self._eval_settings.pop(final, None) or self._settings_for_evaluation(
                self._cli(self.stage_config(final, inputs), defer_trainer=True)
            )
            cuda = c.device in ("cuda", "gpu") or (c.device == "auto" and torch.cuda.is_available())
            args = EvalArgs(
                generation=settings["generation"],
                max_prompt_length=settings["max_prompt_length"],
                device="cuda" if cuda else "cpu" if c.device in ("auto", "gpu") else c.device,
            )
            evaluation = evaluate(
                [inputs[final]],
                inputs["sft"],
                settings["prompts"],
                reward_model=inputs.get("reward"),
                functions=settings["functions"],
                args=args,
                names=[final],
                prompts_source=c.ppo_val_path or f"the {final.upper()} stage's validation prompts",
            )
            write_evaluation(evaluation, out, args.sample_rows)
        except Exception as err:  # the checkpoints are safe; say what failed and carry on
            print(f"[pipeline] warning: evaluation failed ({err!r}); the trained checkpoints are kept")
            return {"error": repr(err)}
        table = format_table(evaluation.report)
        print(f"[pipeline] evaluation ({out}):\n{table}")
        return {"folder": str(out), "table": table, "policies": evaluation.report["policies"]}

    def _settings_for_evaluation(self, cli) -> dict[str, Any]:
        """What the closing evaluation takes from the final stage's build: its sampling settings, reward functions,
        prompt length and prompts (``ppo_val_path``, else the DataModule's validation prompts); plain values, so
        the build (and its networks) can be freed before evaluation loads the checkpoints."""
        from rlhf_lightning.data.formats import PromptRow
        from rlhf_lightning.evaluation import read_prompts
        from rlhf_lightning.models.generation import GenerationArgs

        n = self.config.eval_prompts
        if self.config.ppo_val_path is not None:
            prompts = read_prompts(self.config.ppo_val_path, n)
        else:
            cli.datamodule.setup("validate")
            rows = cli.datamodule.val_dataset.rows[:n]
            prompts = [PromptRow(r["prompt"], {k: v for k, v in r.items() if k != "prompt"}) for r in rows]
        sampling = cli.model.generation
        return {
            "prompts": prompts,
            "generation": GenerationArgs(sampling.max_new_tokens, temperature=sampling.temperature),
            # the reward functions it optimised, then its held-out judges (never optimised)
            "functions": list(
                dict.fromkeys([*cli.model.rewards.functions, *getattr(cli.model, "judge_specs", [])])
            ),
            "max_prompt_length": getattr(cli.datamodule, "max_prompt_length", 256),
        }

    def _archive(self, stage: str) -> Path:
        """Move a finished stage's folder aside (``<stage>.previous-<n>``) so that it can run again."""
        n = 1
        while (self.root / f"{stage}.previous-{n}").exists():
            n += 1
        target = self.root / f"{stage}.previous-{n}"
        (self.root / stage).rename(target)
        return target

    def _run_stage(self, stage: str, inputs: dict[str, str]) -> dict[str, Any]:
        folder = self.root / stage
        config = self.stage_config(stage, inputs)
        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        last = folder / "checkpoints" / "last.ckpt"
        resume = agree(str(last) if last.is_file() else None)
        say(f"[pipeline] {stage}: {'resuming from ' + resume if resume else 'starting'}")
        data_args = config.get("data", {}).get("init_args", {})
        if "train_path" in data_args:
            say(
                f"[pipeline] {stage}: trains on {data_args['train_path']}, validates on {validation_source(data_args)}"
            )
        # copied before parsing, which edits the dict in place
        logged = {"stage_config": copy.deepcopy(config), "pipeline": asdict(self.config)}
        cli = self._stage_cli(stage, config)
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        for logger in trainer.loggers:  # the whole stage config, not only the module's hyper-parameters
            logger.log_hyperparams(logged)
        try:
            outcome = self._train(stage, folder, trainer, model, data, resume)
            if (
                stage == self.chain[-1]
                and stage in ONLINE_STAGES
                and self.config.eval_prompts
                and is_main_process()
            ):
                # the closing evaluation reads these instead of building the stage again; should they fail, it
                # builds the stage itself and reports the error
                with contextlib.suppress(Exception):
                    self._eval_settings[stage] = self._settings_for_evaluation(cli)
        finally:
            from rlhf_lightning.loggers import finish_wandb

            finish_wandb(trainer.loggers)  # the next stage starts its own W&B run
            if is_main_process():
                self._plot()
        return outcome

    def _plot(self) -> None:
        """Write ``plots/<stage>.png`` for every stage with metrics; a plotting failure never fails the run."""
        try:
            from rlhf_lightning.plots import save_run_plots

            save_run_plots(self.root)
        except Exception as err:  # plots are a convenience: report and carry on
            print(f"[pipeline] warning: could not write plots: {err!r}")

    def _train(self, stage: str, folder: Path, trainer, model, data, resume: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        results: dict[str, Any] = {}
        if stage in ONLINE_STAGES:
            results.update(self._before_ppo(folder, trainer, model, data))
        trainer.fit(model, datamodule=data, ckpt_path=resume)
        callback = trainer.checkpoint_callback
        checkpoint = (callback.best_model_path or callback.last_model_path) if callback else ""
        # rank 0's choice: every rank hands the same checkpoint to the next stage
        checkpoint = agree(checkpoint)
        if not checkpoint:
            checkpoint = str(folder / "checkpoints" / "final.ckpt")
            trainer.save_checkpoint(checkpoint)  # every rank takes part; the strategy writes once
        if stage in ONLINE_STAGES:
            after = trainer.validate(model, datamodule=data, verbose=False)
            results.update({f"after/{k}": v for k, v in after[0].items()} if after else {})
        else:
            results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
            if callback is not None and callback.best_model_score is not None:
                results[f"best/{callback.monitor}"] = float(callback.best_model_score)
        results["wall_time_s"] = round(time.perf_counter() - started, 1)
        return {"checkpoint": checkpoint, "results": results}

    def _before_ppo(self, folder: Path, trainer, model, data) -> dict[str, Any]:
        """Held-out metrics of the SFT policy an online stage (PPO, GRPO, RLOO) starts from (``before/...``), measured
        once and kept in ``<stage>/before.json``: a resumed run reuses them instead of evaluating its partly trained
        policy."""
        stored = agree(self._read_json(folder / "before.json"))
        if stored is not None:
            return stored
        before = trainer.validate(model, datamodule=data, verbose=False)  # no ckpt_path: the SFT weights
        results = {f"before/{k}": v for k, v in before[0].items()} if before else {}
        if is_main_process():
            self._write_json(folder / "before.json", results)
        return results

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @staticmethod
    def _write_json(path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        tmp.replace(path)


def is_main_process() -> bool:
    """Global rank 0, the process that writes the run folder's bookkeeping and prints: rank 0 of the process group
    once the first Trainer has joined one; before that, the process no rank variable (``RANK``, ``NODE_RANK``,
    ``LOCAL_RANK``, ``SLURM_PROCID``) names as another rank. The ranks Lightning's DDP launcher starts (the command
    run again) carry ``LOCAL_RANK`` > 0 from their first line."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID"))


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a broadcast, so also a barrier) once the ranks share a process group; the
    value itself in a single process and before the first Trainer started the group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def say(message: str) -> None:
    """Print ``message`` on rank 0 only (the pipeline's progress lines)."""
    if is_main_process():
        print(message)


def _follow_data(data_args: dict[str, Any], train_path: str, val_path: str | None) -> None:
    """Point a stage's DataModule at the pipeline's data, with a validation source that follows it: ``val_path``
    when given; the YAML's own validation settings when ``train_path`` is the file the YAML trains on; else a
    held-out fraction of ``train_path`` (never a validation file that belongs to other data)."""
    same_data = data_args.get("train_path") == train_path
    data_args["train_path"] = train_path
    if val_path is not None:
        data_args["val_path"] = val_path
    elif not same_data:
        data_args["val_path"] = None
        if not data_args.get("val_fraction"):  # unset or 0 in the YAML
            data_args["val_fraction"] = 0.1


def _takes(class_path: str, name: str) -> bool:
    """Whether the class at ``class_path`` takes an argument ``name`` (or ``**kwargs``); False when it cannot be
    imported (the stage CLI then reports the bad class path)."""
    import inspect

    from jsonargparse.typing import import_object

    try:
        parameters = inspect.signature(import_object(class_path)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def validation_source(data_args: dict[str, Any]) -> str:
    """Where a stage's DataModule validates, in words (printed when the stage starts)."""
    if data_args.get("val_path"):
        return str(data_args["val_path"])
    fraction = data_args.get("val_fraction")
    if fraction is None:
        return f"a held-out share of {data_args.get('train_path')} (the DataModule's default val_fraction)"
    return f"a held-out {fraction:.0%} of {data_args.get('train_path')}"


def _stage_loggers(backend: str, folder: Path, stage: str, group: str) -> list[dict[str, Any]]:
    from rlhf_lightning.loggers import stage_loggers

    return stage_loggers(backend, folder, stage, group)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: one row per stage and metric."""
    rows = [("stage", "metric", "value")]
    for stage, results in summary.get("stages", {}).items():
        for key, value in results.items():
            rows.append((stage, key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args: Sequence[str]) -> dict[str, Any]:
    """``rlhf-lightning pipeline``: ``--config configs/pipeline.yaml`` and any RLHFConfig field as a flag."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog="rlhf-lightning pipeline",
        description="Run SFT, reward model and PPO (or GRPO, RLOO; or SFT and DPO: --algorithm) in sequence.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML (RLHFConfig fields)")
    parser.add_class_arguments(RLHFConfig, nested_key=None, fail_untyped=False)
    parser.add_argument(
        "--stages",
        type=str | None,
        default=None,
        help="comma-separated stages to run again (default: all, skipping the ones finished earlier)",
    )
    parser.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="delete save_dir first and start over"
    )
    cfg = parser.parse_args(list(args)).as_dict()
    fields = {name: cfg[name] for name in RLHFConfig.__dataclass_fields__ if name in cfg}
    config = RLHFConfig(**fields)
    stages = None if cfg["stages"] is None else [s.strip() for s in cfg["stages"].split(",") if s.strip()]
    return RLHFPipeline(config, stages=stages, overwrite=cfg["overwrite"]).run()


if __name__ == "__main__":
    main(sys.argv[1:])
