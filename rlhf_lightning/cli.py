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


def _auto_precision(accelerator: object) -> str:
    """bf16-mixed on CUDA GPUs that support bf16, 32-true elsewhere (CPU, MPS, older GPUs)."""
    import torch

    wants_cuda = accelerator in (None, "auto", "gpu", "cuda")
    if wants_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _make_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from rlhf_lightning.stages.checkpoints import AtomicCheckpointIO

    class RLHFLightningCLI(LightningCLI):
        """LightningCLI with the suite's defaults: precision per device, atomic checkpoint writes, and a guard
        that refuses to start a fresh run in a checkpoint folder that already holds checkpoints."""

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.trainer.get("precision") is None:
                config.trainer.precision = _auto_precision(config.trainer.get("accelerator"))

        def instantiate_trainer(self, **kwargs):
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            if not config["trainer"].get("plugins"):
                kwargs.setdefault("plugins", [AtomicCheckpointIO()])
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            config = self.config[self.subcommand]
            if config.get("ckpt_path"):
                return
            for callback in self.trainer.callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    existing = sorted(Path(callback.dirpath).glob("*.ckpt"))
                    if existing:
                        raise SystemExit(
                            f"error: checkpoint folder {callback.dirpath} already holds {existing[0].name}"
                            f"{' and more' if len(existing) > 1 else ''} from an earlier run. Resume it with "
                            "--ckpt_path <file>, or choose a new folder, so its checkpoints are not overwritten."
                        )

    return RLHFLightningCLI


def run_stage_cli(args: Sequence[str]) -> object:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) with ``args``."""
    from lightning.pytorch import LightningDataModule, LightningModule

    cli_class = _make_cli_class()
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args),
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
    parser.add_argument("--prompt", type=list[str], required=True, help="user message(s); repeat for a batch")
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
        "--data", type=list[str], required=True, help="JSONL file(s) of any supported row shape"
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``rlhf-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = COMMANDS.get(args[0])
    if command is not None:
        command(args[1:])
    else:
        run_stage_cli(args)


if __name__ == "__main__":
    main()
