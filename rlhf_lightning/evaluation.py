"""``rlhf-lightning evaluate``: is a policy better than a baseline, and by how much?

Every policy (a stage checkpoint or stage folder, built-in or Hugging Face backbone, loaded with
``stages.checkpoints.load_policy``) and the baseline answer the same prompts (JSONL ``{"prompt": ..., **extra}`` rows
read with ``data.formats.parse_prompt``, so a bad row stops the run before anything loads, with file, line and field),
sampled with the same settings and seed. Judges score each reply: a reward-model checkpoint (its score normalised by
the statistics stored in it, the scale PPO sees) and/or reward functions ``"package.module:function"`` (called as
``fn(prompt, reply, row)``, as in PPO). Reported per policy:

* **win rate** against the baseline per judge: on each prompt the policy's reply scores above the baseline's reply
  (1), the same (1/2) or below (0); the mean over prompts, with a percentile-bootstrap confidence interval
  (:func:`bootstrap_ci`, seeded, prompts resampled with replacement);
* mean and std of each judge's score;
* **KL to the reference** (the baseline unless ``reference`` is given) on the policy's own samples: per reply the sum
  over response tokens of ``logp_policy - logp_ref`` (k1) and of k3 (``functional.kl``), averaged over prompts;
  log-probs at the sampling temperature (temperature 1 for greedy decoding), as PPO's ``val/kl``. Left out (null) when
  the reference tokenizes differently;
* reply length in tokens (EOS included) and the share of replies that ended with EOS (the rest hit
  ``max_new_tokens``);
* for prompt rows with an ``answer`` field (GSM8K), the exact-answer accuracy (``reward_functions.gsm8k_correct``).

``preferences`` (chosen/rejected pairs, ``parse_preference``) adds the reward model's pairwise accuracy (a tie counts
as wrong, as in the reward stage).

Outputs (:func:`write_evaluation`): ``evaluation.json`` (everything above), ``evaluation.md`` (the table that is
printed), ``evaluation.png`` (``plots.save_evaluation_plot``), ``samples.csv`` (every prompt with each policy's reply
and scores, side by side) and ``samples.md`` (the first ``sample_rows`` of them).

Choices: the reward model scores each reply as a finished conversation (prompt messages plus the reply as an
assistant turn, rendered with the reward model's own chat template, closing EOS included), as ``rlhf-lightning score``
does, whatever tokenizer the policy has; PPO's ``val/score`` instead scores the policy's token ids and replaces the
score of a reply without EOS, so the two scales differ. Prompts longer than ``max_prompt_length`` keep their end (left truncation, as the PPO DataModule does); one
seeded generator per policy walks the prompts in fixed batches, so a policy identical to the baseline gives identical
replies (win rate exactly 1/2, KL 0).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_lightning.data.collate import collate_prompts
from rlhf_lightning.data.formats import PromptRow, load_rows, parse_preference, parse_prompt
from rlhf_lightning.data.sft import left_truncate
from rlhf_lightning.functional.kl import kl_k1, kl_k3
from rlhf_lightning.functional.masked import masked_sum
from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.reward_functions import gsm8k_correct
from rlhf_lightning.scoring import score_conversations
from rlhf_lightning.stages.checkpoints import SetupError, load_policy
from rlhf_lightning.stages.reward import load_reward_model
from rlhf_lightning.stages.rewards import load_reward_function
from rlhf_lightning.stages.rollout import response_logprobs_of
from rlhf_lightning.stages.sampling import ended_with_eos, response_texts
from rlhf_lightning.stages.tokenizer_link import same_tokenizer

__all__ = [
    "EvalArgs",
    "Evaluation",
    "bootstrap_ci",
    "evaluate",
    "format_table",
    "main",
    "pairwise_outcomes",
    "read_prompts",
    "win_rate",
    "write_evaluation",
]

REWARD_MODEL = "reward_model"  # the reward-model judge's name in the report


# -- statistics (pure) -------------------------------------------------------------------------------------------------
def pairwise_outcomes(scores: Sequence[float], baseline_scores: Sequence[float]) -> np.ndarray:
    """Per prompt: 1.0 where ``scores`` beat ``baseline_scores``, 0.5 on a tie, 0.0 where they lose. (N,) each."""
    a, b = np.asarray(scores, dtype=float), np.asarray(baseline_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores {a.shape} and baseline_scores {b.shape}: expected two (N,) arrays")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Share of prompts on which ``scores`` beat ``baseline_scores``, a tie counting half."""
    return float(pairwise_outcomes(scores, baseline_scores).mean())


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (N,): ``resamples`` means of N values drawn
    with replacement (seeded), cut at the ``(1 - confidence) / 2`` quantiles. Efron & Tibshirani 1993, ch. 13."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values: expected a non-empty (N,) array, got shape {x.shape}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples={resamples}, confidence={confidence}; expected >= 1 and in (0, 1)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


# -- inputs ------------------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """The prompt rows of ``path`` (the first ``limit``); a bad row raises ``DataFormatError`` naming file/line/field."""
    rows = load_rows(path, parse_prompt).rows
    return rows if limit is None else rows[:limit]


def _render(tokenizer, prompts: Sequence[PromptRow], max_prompt_length: int) -> list[list[int]]:
    rendered = []
    for row in prompts:
        ids = tokenizer.render_prompt(row.messages)
        if len(ids) > max_prompt_length:  # keep the end by whole rendered turns, as the PPO DataModule does
            kept = left_truncate(tokenizer, row.messages, max_prompt_length, prompt=True)
            if kept is None:
                raise SetupError(
                    f"prompt {len(rendered)}: not even its last message fits "
                    f"max_prompt_length={max_prompt_length} tokens; expected a larger max_prompt_length"
                )
            ids = kept[1]
        rendered.append(ids)
    return rendered


@dataclass(frozen=True)
class EvalArgs:
    """How replies are sampled and statistics computed.

    Args:
        generation: sampling settings (the ``generate`` command's; ``do_sample=False`` is greedy).
        seed: seed of the sampling (every policy gets the same) and of the bootstrap.
        batch_size: prompts per generation batch.
        max_prompt_length: longest rendered prompt in tokens (longer ones keep their end).
        resamples: bootstrap resamples for the win-rate interval.
        confidence: the interval's confidence level.
        device: torch device for every model.
        sample_rows: prompts shown in ``samples.md`` (``samples.csv`` holds them all).
        trust_remote_code: run a Hugging Face backbone's own modelling code (only for folders you trust).
    """

    generation: GenerationArgs = GenerationArgs(max_new_tokens=64, temperature=0.7)
    seed: int = 0
    batch_size: int = 16
    max_prompt_length: int = 256
    resamples: int = 1000
    confidence: float = 0.95
    device: str = "cpu"
    sample_rows: int = 16
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_prompt_length < 2 or self.resamples < 1 or self.sample_rows < 0:
            raise ValueError(
                f"batch_size={self.batch_size}, max_prompt_length={self.max_prompt_length}, resamples="
                f"{self.resamples}, sample_rows={self.sample_rows}; expected >= 1, >= 2, >= 1 and >= 0"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence}; expected a level in (0, 1), e.g. 0.95")


# -- sampling and KL ---------------------------------------------------------------------------------------------------
@dataclass
class _Replies:
    texts: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # response tokens, EOS included
    eos: list[bool] = field(default_factory=list)
    kl_k1: list[float] = field(default_factory=list)
    kl_k3: list[float] = field(default_factory=list)


@torch.no_grad()
def _sample(model, tokenizer, rendered: list[list[int]], args: EvalArgs, reference=None) -> _Replies:
    """Replies of ``model`` to every rendered prompt; with ``reference``, the sequence KL of each to it."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    temperature = args.generation.temperature if args.generation.do_sample else 1.0
    out = _Replies()
    for start in range(0, len(rendered), args.batch_size):
        chunk = rendered[start : start + args.batch_size]
        batch = collate_prompts(chunk, tokenizer.pad_id, list(range(len(chunk)))).to(device)
        gen = generate(
            model,
            batch.input_ids,
            batch.attention_mask,
            args.generation,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            generator=generator,
        )
        response, mask = gen.response_ids, gen.response_mask
        out.lengths += mask.sum(dim=1).tolist()
        out.eos += ended_with_eos(response, mask, tokenizer.eos_id).tolist()
        out.texts += response_texts(tokenizer, response, mask)
        if reference is not None:
            sequences = torch.cat([batch.input_ids, response], dim=1)
            full_mask = torch.cat([batch.attention_mask, mask], dim=1)
            P = batch.input_ids.shape[1]
            logp = response_logprobs_of(model, sequences, full_mask, P, temperature)
            ref_logp = response_logprobs_of(reference, sequences, full_mask, P, temperature)
            out.kl_k1 += masked_sum(kl_k1(logp, ref_logp), mask, dim=1).tolist()
            out.kl_k3 += masked_sum(kl_k3(logp, ref_logp), mask, dim=1).tolist()
    return out


# -- judges ------------------------------------------------------------------------------------------------------------
class _Judges:
    """The reward model (normalised score) and reward functions, each scoring (prompt, reply, row) triples."""

    def __init__(self, reward_model: str | None, functions: Sequence[str], device: str) -> None:
        if reward_model is None and not functions:
            raise SetupError(
                "no judge: give a reward model (--reward_model) and/or reward functions (--functions)"
            )
        self.functions = {}
        for spec in functions:
            try:
                fn = load_reward_function(spec)
            except ValueError as err:
                raise SetupError(str(err)) from None
            name = spec.rpartition(":")[2]
            self.functions[spec if name in self.functions or name == REWARD_MODEL else name] = (spec, fn)
        self.model = self.tokenizer = None
        if reward_model is not None:
            self.model, self.tokenizer = load_reward_model(reward_model)
            if self.tokenizer is None:
                raise SetupError(f"{reward_model}: the reward checkpoint carries no tokenizer")
            self.model = self.model.to(device)

    @property
    def names(self) -> list[str]:
        return ([REWARD_MODEL] if self.model is not None else []) + list(self.functions)

    def model_scores(self, conversations: Sequence[list[dict[str, str]]], batch_size: int) -> np.ndarray:
        raw, _ = score_conversations(self.model, self.tokenizer, conversations, batch_size)
        return self.model.normalize(raw.to(self.model.score_mean.device)).cpu().numpy()

    def score(
        self, prompts: Sequence[PromptRow], replies: Sequence[str], batch_size: int
    ) -> dict[str, np.ndarray]:
        scores = {}
        if self.model is not None:
            conversations = [
                [*p.messages, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies)
            ]
            scores[REWARD_MODEL] = self.model_scores(conversations, batch_size)
        for name, (spec, fn) in self.functions.items():
            values = []
            for i, (p, r) in enumerate(zip(prompts, replies)):
                try:
                    values.append(float(fn(list(p.messages), r, dict(p.extra))))
                except Exception as err:
                    raise RuntimeError(f"reward function {spec!r} failed on prompt {i}: {err!r}") from err
            scores[name] = np.asarray(values)
        return scores

    def pairwise_accuracy(self, path: str | Path, batch_size: int) -> dict[str, Any]:
        if self.model is None:
            raise SetupError("--preferences measures the reward model's accuracy: give --reward_model too")
        pairs = load_rows(path, parse_preference).rows
        chosen = self.model_scores([[*p.prompt, *p.chosen] for p in pairs], batch_size)
        rejected = self.model_scores([[*p.prompt, *p.rejected] for p in pairs], batch_size)
        return {
            "preferences": str(path),
            "pairs": len(pairs),
            "accuracy": float((chosen > rejected).mean()),
            "mean_margin": float((chosen - rejected).mean()),
        }


# -- the evaluation ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured: ``report`` (JSON-ready, see the module docstring) and ``samples`` (one dict
    per prompt: the prompt, then each policy's reply and judge scores)."""

    report: dict[str, Any]
    samples: list[dict[str, Any]]


def _policy_names(paths: Sequence[str]) -> list[str]:
    names = []
    for path in paths:
        p = Path(path)
        base = p.name if p.is_dir() or not p.suffix else f"{p.parent.name}/{p.stem}"
        name, n = base, 2
        while name in names or name == "baseline":
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0}


def evaluate(
    policies: Sequence[str],
    baseline: str,
    prompts: Sequence[PromptRow],
    *,
    reward_model: str | None = None,
    functions: Sequence[str] = (),
    reference: str | None = None,
    preferences: str | None = None,
    args: EvalArgs = EvalArgs(),
    prompts_source: str = "",
    names: Sequence[str] | None = None,
) -> Evaluation:
    """Sample every policy and the baseline on ``prompts``, judge the replies and compare (module docstring).

    ``names`` label the policies (default: their folder or file names); the baseline is labelled ``baseline``.
    """
    if not prompts:
        raise SetupError("no prompts to evaluate on")
    names = list(names) if names is not None else _policy_names(policies)
    if len(names) != len(policies):
        raise ValueError(f"{len(names)} names for {len(policies)} policies")
    judges = _Judges(
        reward_model, functions, args.device
    )  # judges first: a bad spec fails before any sampling
    answered = [i for i, p in enumerate(prompts) if "answer" in p.extra]

    def load(path: str):
        model, tokenizer = load_policy(path, trust_remote_code=args.trust_remote_code)
        return model.to(args.device), tokenizer

    base_model, base_tok = load(baseline)
    ref_model, ref_tok = (base_model, base_tok) if reference in (None, baseline) else load(reference)
    entries, samples = [], [{"prompt": p.messages[-1]["content"]} for p in prompts]
    base_scores: dict[str, np.ndarray] = {}
    for name, path in [("baseline", baseline), *zip(names, policies)]:
        model, tok = (base_model, base_tok) if name == "baseline" else load(path)
        same = same_tokenizer(tok, ref_tok)
        replies = _sample(
            model, tok, _render(tok, prompts, args.max_prompt_length), args, ref_model if same else None
        )
        scores = judges.score(prompts, replies.texts, args.batch_size)
        entry: dict[str, Any] = {"name": name, "path": str(path), "is_baseline": name == "baseline"}
        entry["scores"] = {judge: _mean_std(values) for judge, values in scores.items()}
        if name == "baseline":
            base_scores = scores
        else:
            entry["win_rate"] = {}
            for judge, values in scores.items():
                outcomes = pairwise_outcomes(values, base_scores[judge])
                low, high = bootstrap_ci(
                    outcomes, resamples=args.resamples, confidence=args.confidence, seed=args.seed
                )
                entry["win_rate"][judge] = {
                    "win_rate": float(outcomes.mean()),
                    "ci_low": low,
                    "ci_high": high,
                    "wins": int((outcomes == 1).sum()),
                    "ties": int((outcomes == 0.5).sum()),
                    "losses": int((outcomes == 0).sum()),
                }
        entry["kl"] = (
            {"k1": float(np.mean(replies.kl_k1)), "k3": float(np.mean(replies.kl_k3))} if same else None
        )
        entry["response_tokens"] = float(np.mean(replies.lengths))
        entry["eos_rate"] = float(np.mean(replies.eos))
        if answered:
            entry["gsm8k_accuracy"] = float(
                np.mean(
                    [gsm8k_correct(prompts[i].messages, replies.texts[i], prompts[i].extra) for i in answered]
                )
            )
        entries.append(entry)
        for i, sample in enumerate(samples):
            sample[name] = replies.texts[i]
            sample.update({f"{name}/{judge}": float(values[i]) for judge, values in scores.items()})
    report = {
        "prompts": prompts_source,
        "n_prompts": len(prompts),
        "n_with_answer": len(answered),
        "baseline": str(baseline),
        "reference": str(reference or baseline),
        "judges": judges.names,
        "reward_model": reward_model,
        "generation": asdict(args.generation),
        "seed": args.seed,
        "bootstrap": {"resamples": args.resamples, "confidence": args.confidence},
        "policies": entries,
    }
    if preferences is not None:
        report["reward_model_pairwise_accuracy"] = judges.pairwise_accuracy(preferences, args.batch_size)
    return Evaluation(report, samples)


# -- outputs -----------------------------------------------------------------------------------------------------------
def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)])


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per policy (baseline first)."""
    judges = report["judges"]
    level = f"{report['bootstrap']['confidence']:.0%}"
    header = ["policy"]
    for judge in judges:
        header += [f"win rate vs baseline ({judge}) [{level} CI]", f"{judge} mean ± std"]
    header += ["KL k1", "KL k3", "reply tokens", "EOS rate"]
    answers = report["n_with_answer"] > 0
    if answers:
        header.append("GSM8K accuracy")
    rows = []
    for entry in report["policies"]:
        row = [entry["name"]]
        for judge in judges:
            win = entry.get("win_rate", {}).get(judge)
            row.append(
                "—" if win is None else f"{win['win_rate']:.3f} [{win['ci_low']:.3f}, {win['ci_high']:.3f}]"
            )
            score = entry["scores"][judge]
            row.append(f"{score['mean']:.3f} ± {score['std']:.3f}")
        kl = entry["kl"]
        row += ["n/a", "n/a"] if kl is None else [f"{kl['k1']:.3f}", f"{kl['k3']:.3f}"]
        row += [f"{entry['response_tokens']:.1f}", f"{entry['eos_rate']:.2f}"]
        if answers:
            row.append(f"{entry['gsm8k_accuracy']:.3f}")
        rows.append(row)
    text = _markdown(header, rows)
    pairwise = report.get("reward_model_pairwise_accuracy")
    if pairwise:
        text += (
            f"\n\nReward model pairwise accuracy on {pairwise['preferences']}: {pairwise['accuracy']:.3f} "
            f"({pairwise['pairs']} pairs, mean margin {pairwise['mean_margin']:.3f})"
        )
    note = f"{report['n_prompts']} prompts, baseline {report['baseline']}, KL to {report['reference']}"
    reading = _reading(report)
    return f"{text}\n\n{note}" + (f"\n\n{reading}" if reading else "")


def _reading(report: dict[str, Any]) -> str:
    """Plain-words lines under the table for results that are easy to misread: a win rate whose interval contains
    1/2 (no measurable difference) and a negative k1 KL (estimation noise, not a policy closer than identical)."""
    level = f"{report['bootstrap']['confidence']:.0%}"
    lines = []
    for entry in report["policies"]:
        for judge, win in entry.get("win_rate", {}).items():
            if win["ci_low"] <= 0.5 <= win["ci_high"]:
                lines.append(
                    f"{entry['name']}: no measurable difference from the baseline under {judge} (its {level} interval "
                    f"[{win['ci_low']:.3f}, {win['ci_high']:.3f}] contains 0.5); more prompts narrow it"
                )
        kl = entry.get("kl")
        if kl is not None and kl["k1"] < 0:
            lines.append(
                f"{entry['name']}: KL k1 {kl['k1']:.3f} < 0 is sampling noise (k1 averages log-ratios of sampled "
                f"replies, which can come out negative when the policy has hardly moved); k3, never negative, is "
                f"{kl['k3']:.3f}"
            )
    return "\n".join(f"- {line}" for line in lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_evaluation(evaluation: Evaluation, out_dir: str | Path, sample_rows: int = 16) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md``, ``evaluation.png``, ``samples.csv`` and ``samples.md`` into
    ``out_dir``; returns them by kind (``png`` is left out when matplotlib has nothing to draw)."""
    from rlhf_lightning.plots import save_evaluation_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "md": out / "evaluation.md"}
    _atomic_write(paths["json"], json.dumps(evaluation.report, indent=2))
    _atomic_write(paths["md"], format_table(evaluation.report) + "\n")
    columns = list(evaluation.samples[0]) if evaluation.samples else ["prompt"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(evaluation.samples)
    paths["csv"] = out / "samples.csv"
    _atomic_write(paths["csv"], buffer.getvalue())
    text_columns = [c for c in columns if "/" not in c]  # prompt and replies; the scores stay in the CSV
    shown = [[str(s[c]) for c in text_columns] for s in evaluation.samples[:sample_rows]]
    paths["samples_md"] = out / "samples.md"
    _atomic_write(paths["samples_md"], _markdown(text_columns, shown) + "\n")
    png = save_evaluation_plot(evaluation.report, out / "evaluation.png")
    if png is not None:
        paths["png"] = png
    return paths


def main(args: Sequence[str]) -> Evaluation:
    """``rlhf-lightning evaluate --policies runs/ppo --baseline runs/sft --prompts p.jsonl --reward_model runs/reward``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="rlhf-lightning evaluate",
        description="Compare policies with a baseline on prompts: win rate (bootstrap CI), judge scores, KL, length.",
    )
    parser.add_argument(
        "--policies", type=str, nargs="+", required=True, help="checkpoint files or stage folders"
    )
    parser.add_argument(
        "--baseline", type=str, required=True, help="the policy to compare against (e.g. runs/sft)"
    )
    parser.add_argument("--prompts", type=str, required=True, help='JSONL of {"prompt": ..., **extra} rows')
    parser.add_argument(
        "--reward_model", type=str | None, default=None, help="reward checkpoint or stage folder"
    )
    parser.add_argument(
        "--functions", type=str, nargs="*", default=[], help="reward functions 'module:function'"
    )
    parser.add_argument(
        "--reference", type=str | None, default=None, help="KL reference (default: the baseline)"
    )
    parser.add_argument(
        "--preferences", type=str | None, default=None, help="pairs for the RM's pairwise accuracy"
    )
    parser.add_argument("--output_dir", type=str, default="evaluation", help="where the report files go")
    parser.add_argument("--num_prompts", type=int | None, default=None, help="use the first N prompts only")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--greedy", type=bool, default=False, help="argmax decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_prompt_length", type=int, default=256)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--samples", type=int, default=16, help="prompts shown in samples.md")
    parser.add_argument("--device", type=str, default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--trust_remote_code", type=bool, default=False, help="only for folders you trust")
    cfg = parser.parse_args(list(args))
    prompts = read_prompts(cfg.prompts, cfg.num_prompts)
    try:
        eval_args = EvalArgs(
            generation=GenerationArgs(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                do_sample=not cfg.greedy,
            ),
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            max_prompt_length=cfg.max_prompt_length,
            resamples=cfg.resamples,
            confidence=cfg.confidence,
            device=cfg.device,
            sample_rows=cfg.samples,
            trust_remote_code=cfg.trust_remote_code,
        )
    except ValueError as err:
        raise SetupError(str(err)) from None
    evaluation = evaluate(
        cfg.policies,
        cfg.baseline,
        prompts,
        reward_model=cfg.reward_model,
        functions=cfg.functions,
        reference=cfg.reference,
        preferences=cfg.preferences,
        args=eval_args,
        prompts_source=cfg.prompts,
    )
    paths = write_evaluation(evaluation, cfg.output_dir, cfg.samples)
    print(format_table(evaluation.report))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return evaluation
