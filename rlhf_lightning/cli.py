"""The ``rlhf-lightning`` command.

``fit | validate | test | predict`` run one stage through :class:`RLHFLightningCLI` (a ``LightningCLI`` in subclass
mode, so ``--model`` and ``--data`` accept any LightningModule / LightningDataModule class path). The other commands
are small programs of their own:

- ``generate``  sample replies from a stage checkpoint;
- ``tokenizer`` train a byte-level BPE tokenizer on JSONL data;
- ``score``     score a JSONL of conversations with a reward-model checkpoint.

Nothing imports this module; it is the outermost layer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

USAGE = """usage: rlhf-lightning <command> [options]

Stage commands (LightningCLI; `rlhf-lightning fit --help` for every option):
  fit         train a stage:            rlhf-lightning fit --config configs/sft.yaml
  validate    run a stage's validation: rlhf-lightning validate --config configs/sft.yaml --ckpt_path last.ckpt
  test        evaluate on a test split
  predict     run prediction (e.g. score conversations with a reward model)

Other commands (`rlhf-lightning <command> --help`):
  generate    sample replies from a checkpoint:  rlhf-lightning generate --ckpt runs/sft --prompt "Hi!"
  tokenizer   train a tokenizer on JSONL data:   rlhf-lightning tokenizer --data a.jsonl --output tok.json
  score       score conversations with a reward model:
              rlhf-lightning score --ckpt runs/reward --input convs.jsonl --output scored.jsonl
"""


def choose_precision(
    accelerator: object, *, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> str:
    """The Trainer precision used when a config leaves ``trainer.precision`` unset.

    ``bf16-mixed`` when the run will use a CUDA GPU that supports bf16, ``32-true`` elsewhere (CPU, MPS, older GPUs).

    Args:
        accelerator: the config's ``trainer.accelerator`` (``None``, ``"auto"``, ``"gpu"``, ``"cuda"``, ``"cpu"``, ...).
        cuda_available: whether CUDA is usable (None: ask torch).
        bf16_supported: whether the GPU supports bf16 (None: ask torch; only asked when CUDA is usable).
    """
    wants_cuda = accelerator is None or (
        isinstance(accelerator, str) and accelerator in ("auto", "gpu", "cuda")
    )
    if not wants_cuda:
        return "32-true"
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return "32-true"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16-mixed" if bf16_supported else "32-true"


def checkpoint_dir(callback: object, trainer: object) -> Path | None:
    """The folder a ``ModelCheckpoint`` will write to in ``trainer``'s run, computed before the run starts.

    Its ``dirpath`` when set; else, as Lightning resolves it, ``<logger save_dir>/<name>/<version>/checkpoints``
    (``<default_root_dir>/checkpoints`` without a logger). None when it cannot be told beforehand.
    """
    dirpath = getattr(callback, "dirpath", None)
    if dirpath:
        return Path(dirpath)
    loggers = getattr(trainer, "loggers", None) or []
    if not loggers:
        return Path(getattr(trainer, "default_root_dir", ".")) / "checkpoints"
    logger = loggers[0]
    save_dir = logger.save_dir or getattr(trainer, "default_root_dir", ".")
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir, str(logger.name or ""), version, "checkpoints")


def _make_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from rlhf_lightning.stages.checkpoints import AtomicCheckpointIO, CheckpointError

    class RLHFLightningCLI(LightningCLI):
        """LightningCLI with the suite's defaults: precision per device, atomic checkpoint writes, and a guard
        that refuses to start a fresh run in a checkpoint folder that already holds checkpoints."""

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.trainer.get("precision") is None:
                config.trainer.precision = choose_precision(config.trainer.get("accelerator"))

        def instantiate_trainer(self, **kwargs):
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            if not config["trainer"].get("plugins"):
                kwargs.setdefault("plugins", [AtomicCheckpointIO()])
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            """Refuse a fresh run (no ``--ckpt_path``) whose checkpoint folder already holds checkpoints."""
            config = self.config[self.subcommand]
            if config.get("ckpt_path"):
                return
            for callback in self.trainer.callbacks:
                if not isinstance(callback, ModelCheckpoint):
                    continue
                folder = checkpoint_dir(callback, self.trainer)
                existing = sorted(folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
                if existing:
                    names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
                    raise CheckpointError(
                        f"checkpoint folder {folder} already holds {names} from an earlier run; a fresh fit would "
                        "overwrite them. Resume that run with --ckpt_path <file>, or choose a new folder "
                        "(ModelCheckpoint dirpath / logger save_dir), or delete the old checkpoints."
                    )

    return RLHFLightningCLI


def run_stage_cli(args: Sequence[str] | None) -> object:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) with ``args``.

    ``args=None`` reads ``sys.argv[1:]`` (the console script), which keeps Lightning from warning about both.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    cli_class = _make_cli_class()
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def generate_command(args: Sequence[str]) -> None:
    """``rlhf-lightning generate``: sample replies to prompts from a checkpoint."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="rlhf-lightning generate", description="Sample replies from a stage checkpoint."
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint file, or a stage folder (its best checkpoint)"
    )
    parser.add_argument(
        "--prompt",
        type=str,
        nargs="+",
        required=True,
        help="user message(s): several give a batch of prompts",
    )
    parser.add_argument("--system", type=str | None, default=None, help="optional system message")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--greedy", type=bool, default=False, help="argmax decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    cfg = parser.parse_args(list(args))

    from rlhf_lightning.models.generation import GenerationArgs
    from rlhf_lightning.stages.checkpoints import load_policy
    from rlhf_lightning.stages.sampling import sample_replies

    model, tokenizer = load_policy(cfg.ckpt)
    gen = GenerationArgs(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        do_sample=not cfg.greedy,
    )
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    prompts = [[*system, {"role": "user", "content": text}] for text in cfg.prompt]
    for text, reply in zip(cfg.prompt, sample_replies(model, tokenizer, prompts, gen, seed=cfg.seed)):
        print(f"### User\n{text}\n### Assistant\n{reply}\n")


def tokenizer_command(args: Sequence[str]) -> None:
    """``rlhf-lightning tokenizer``: train and save a byte-level BPE tokenizer."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="rlhf-lightning tokenizer", description="Train a tokenizer on JSONL data.")
    parser.add_argument(
        "--data", type=str, nargs="+", required=True, help="JSONL file(s) of any supported row shape"
    )
    parser.add_argument("--output", type=str, required=True, help="where to write tokenizer.json")
    parser.add_argument("--vocab_size", type=int, default=4096)
    cfg = parser.parse_args(list(args))

    from rlhf_lightning.tokenization import train_tokenizer_cli

    tok = train_tokenizer_cli(cfg.data, cfg.output, cfg.vocab_size)
    print(f"wrote {cfg.output} ({tok.vocab_size} tokens)")


def score_command(args: Sequence[str]) -> None:
    """``rlhf-lightning score``: score conversations with a reward-model checkpoint (see rlhf_lightning.scoring)."""
    from rlhf_lightning.scoring import main as score_main

    score_main(args)


COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "generate": generate_command,
    "tokenizer": tokenizer_command,
    "score": score_command,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (data, checkpoint, paths, mismatched settings), not a bug: printed in one line."""
    from rlhf_lightning.data.formats import DataFormatError
    from rlhf_lightning.stages.checkpoints import CheckpointError, SetupError

    return (DataFormatError, CheckpointError, SetupError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``rlhf-lightning`` console script.

    Bad input (a malformed data row, an unusable checkpoint, a missing file, a checkpoint folder that a fresh run
    would overwrite) ends with ``error: <message>`` on stderr and exit status 2 instead of a traceback; set
    ``RLHF_LIGHTNING_TRACEBACK=1`` to see the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = COMMANDS.get(args[0])
    try:
        if command is not None:
            command(args[1:])
        else:
            run_stage_cli(None if argv is None else args)
    except _user_errors() as err:
        if os.environ.get("RLHF_LIGHTNING_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
