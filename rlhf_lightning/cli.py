"""The ``rlhf-lightning`` command.

``fit | validate | test | predict`` run one stage through :class:`RLHFLightningCLI` (a ``LightningCLI`` in subclass
mode, so ``--model`` and ``--data`` accept any LightningModule / LightningDataModule class path). The other commands
are small programs of their own:

- ``pipeline``  SFT, reward model and PPO in sequence from one config (``rlhf_lightning.pipeline``);
- ``generate``  sample replies from a stage checkpoint;
- ``tokenizer`` train a byte-level BPE tokenizer on JSONL data;
- ``score``     score a JSONL of conversations with a reward-model checkpoint;
- ``export``    write a stage checkpoint as a Hugging Face model folder (``rlhf_lightning.export``);
- ``evaluate``  compare policies with a baseline: win rate, judge scores, KL, length (``rlhf_lightning.evaluation``).

Nothing imports this module; it is the outermost layer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

USAGE = """usage: rlhf-lightning <command> [options]

Stage commands (LightningCLI; `rlhf-lightning fit --help` for every option):
  fit         train a stage:            rlhf-lightning fit --config configs/sft.yaml
  validate    run a stage's validation: rlhf-lightning validate --config configs/sft.yaml --ckpt_path last.ckpt
  test        evaluate on a test split
  predict     run prediction (e.g. score conversations with a reward model)

The main job (SFT -> reward model -> PPO in one run):
  pipeline    rlhf-lightning pipeline --config configs/pipeline.yaml [--stages reward,ppo] [--overwrite true]

Other commands (`rlhf-lightning <command> --help`):
  generate    sample replies from a checkpoint:  rlhf-lightning generate --ckpt runs/sft --prompt "Hi!"
  tokenizer   train a tokenizer on JSONL data:   rlhf-lightning tokenizer --data a.jsonl --output tok.json
  score       score conversations with a reward model:
              rlhf-lightning score --ckpt runs/reward --input convs.jsonl --output scored.jsonl
  export      write a Hugging Face model folder (safetensors + tokenizer):
              rlhf-lightning export --ckpt runs/ppo --output hf_model [--merge_lora true]
  evaluate    compare policies with a baseline (win rate with a bootstrap CI, scores, KL, length):
              rlhf-lightning evaluate --policies runs/ppo --baseline runs/sft --prompts p.jsonl --reward_model runs/reward
"""


def run_stage_cli(args: Sequence[str] | None) -> object:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) with ``args``.

    ``args=None`` reads ``sys.argv[1:]`` (the console script), which keeps Lightning from warning about both.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    from rlhf_lightning.stage_cli import RLHFLightningCLI

    return RLHFLightningCLI(
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
    parser.add_argument(
        "--trust_remote_code",
        type=bool,
        default=False,
        help="run a Hugging Face backbone's own modelling code (only for folders you trust; a checkpoint never can)",
    )
    cfg = parser.parse_args(list(args))

    from rlhf_lightning.models.generation import GenerationArgs
    from rlhf_lightning.stages.checkpoints import load_policy
    from rlhf_lightning.stages.sampling import sample_replies

    model, tokenizer = load_policy(cfg.ckpt, trust_remote_code=cfg.trust_remote_code)
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


def export_command(args: Sequence[str]) -> None:
    """``rlhf-lightning export``: a stage checkpoint as a Hugging Face model folder (see rlhf_lightning.export)."""
    from rlhf_lightning.export import main as export_main

    export_main(list(args))


def evaluate_command(args: Sequence[str]) -> None:
    """``rlhf-lightning evaluate``: policies against a baseline on prompts (see rlhf_lightning.evaluation)."""
    from rlhf_lightning.evaluation import main as evaluate_main

    evaluate_main(list(args))


def pipeline_command(args: Sequence[str]) -> None:
    """``rlhf-lightning pipeline``: SFT, reward model and PPO in sequence (see rlhf_lightning.pipeline)."""
    from rlhf_lightning.pipeline import main as pipeline_main

    pipeline_main(args)


COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "pipeline": pipeline_command,
    "generate": generate_command,
    "tokenizer": tokenizer_command,
    "score": score_command,
    "export": export_command,
    "evaluate": evaluate_command,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (data, checkpoint, paths, mismatched settings), not a bug: printed in one line."""
    from rlhf_lightning.data.formats import DataFormatError
    from rlhf_lightning.guards import NonFiniteError
    from rlhf_lightning.models.factory import UntrustedCodeError
    from rlhf_lightning.stages.checkpoints import CheckpointError, SetupError

    return (
        DataFormatError,
        CheckpointError,
        SetupError,
        UntrustedCodeError,
        FileNotFoundError,
        NonFiniteError,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``rlhf-lightning`` console script.

    Bad input (a malformed data row, an unusable checkpoint, a missing file, a checkpoint folder that a fresh run
    would overwrite, settings that train NaN: ``rlhf_lightning.guards.NonFiniteError``) ends with ``error: <message>`` on stderr and exit status 2 instead of a traceback; set
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
