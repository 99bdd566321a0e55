"""Reward sources and the shaping of sequence scores for PPO.

A score is a weighted sum of sources: the reward model (``model_weight``) and Python callables named
``"package.module:function"``. A callable receives ``(prompt, response, row)``: the prompt messages, the decoded
response text (truncated at EOS, what a user would see) and the prompt row's extra fields (e.g. GSM8K's ``answer``),
and returns a float.

Shaping, in order (Huang et al. 2024, arXiv 2403.17031; Zheng et al. 2023 "PPO-max", arXiv 2307.04964):
    1. the reward model's score is normalised (``normalize``) with a gain and bias measured when PPO starts on
       replies sampled from the reference policy (``calibration_samples``; Ziegler et al. 2019 /
       lm-human-preferences), so the SFT policy's own replies score ~N(0, 1); see ``stages/score_calibration.py``,
    2. optionally scaled by a running std of the training scores seen so far (``running_normalize``, PPO-max; left
       unscaled while that std is still 0, e.g. after one score or a stream of identical scores). Scores that
       step 4 replaces are not counted,
    3. clipped to ``[-clip, clip]``,
    4. a response that ran to the length limit without EOS gets the fixed ``missing_eos_score`` instead.

Different tokenizers: when the reward model was trained with another tokenizer than the policy (e.g. a Hugging Face
reward model next to the built-in policy), ``SequenceScorer`` gets that ``reward_tokenizer`` and scores what a user
would see: each prompt's messages plus the decoded response as an assistant turn, rendered with the reward model's
own chat template (``render``), right-padded with its pad id. Otherwise the policy's token ids are scored directly.

Reward-function specs are checked twice before training: their form in ``RewardArgs`` (config parsing) and the import,
attribute and call signature when ``PPOModule`` is constructed (:func:`load_reward_function`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_lightning.functional.advantages import RunningMoments

RewardFunction = Callable[[list[dict[str, str]], str, dict[str, Any]], float]


@dataclass(frozen=True)
class RewardArgs:
    """Where PPO's sequence scores come from and how they are shaped.

    Args:
        model_weight: weight of the reward model's (normalised) score; 0 leaves the reward model out.
        functions: reward callables as ``"package.module:function"`` strings.
        function_weights: one weight per function (default 1.0 each).
        normalize: normalise the reward model's score to mean 0, std 1 on the reference policy's replies.
        calibration_samples: replies sampled from the reference policy on training prompts when PPO starts to
            measure that mean and std (stored in the PPO checkpoint); 0 uses the statistics the reward stage
            stored (measured on its validation replies, not on this policy's).
        running_normalize: divide scores by a running standard deviation of all scores so far (PPO-max).
        clip: clip the combined score to ``[-clip, clip]``; ``None`` disables clipping.
        missing_eos_score: score given to responses that hit the length limit without EOS; ``None`` disables.
    """

    model_weight: float = 1.0
    functions: list[str] = field(default_factory=list)
    function_weights: list[float] | None = None
    normalize: bool = True
    calibration_samples: int = 256
    running_normalize: bool = False
    clip: float | None = 5.0
    missing_eos_score: float | None = -1.0

    def __post_init__(self) -> None:
        if self.function_weights is not None and len(self.function_weights) != len(self.functions):
            raise ValueError(
                f"rewards.function_weights has {len(self.function_weights)} entries; expected one per function "
                f"({len(self.functions)})"
            )
        if self.calibration_samples < 0 or self.calibration_samples == 1:
            raise ValueError(
                f"rewards.calibration_samples must be 0 (off) or >= 2, got {self.calibration_samples}"
            )
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"rewards.clip must be > 0 or null, got {self.clip}")
        for spec in self.functions:
            _split_spec(spec)
        if self.model_weight == 0 and not self.functions:
            raise ValueError("no reward source: set rewards.model_weight > 0 or give rewards.functions")


# typed config stored in checkpoint hyper-parameters: loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([RewardArgs])


def _split_spec(spec: str) -> tuple[str, str]:
    module_name, sep, attr = str(spec).partition(":")
    if not isinstance(spec, str) or not sep or not module_name.strip() or not attr.strip() or ":" in attr:
        raise ValueError(f"reward function {spec!r}: expected the form 'package.module:function'")
    return module_name.strip(), attr.strip()


def load_reward_function(spec: str) -> RewardFunction:
    """Import ``"package.module:function"``; errors say which part is wrong (form, module, name or signature)."""
    module_name, attr = _split_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError as err:
        raise ValueError(
            f"reward function {spec!r}: cannot be called as fn(prompt, response, row) ({err})"
        ) from err
    except ValueError:  # no introspectable signature (some builtins): checked when first called
        pass
    return fn


class SequenceScorer:
    """Turns finished responses into shaped scores ``(B,)`` (see the module docstring for the order of steps)."""

    def __init__(
        self,
        args: RewardArgs,
        reward_model: torch.nn.Module | None,
        reward_tokenizer: Any = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if args.model_weight != 0 and reward_model is None:
            raise ValueError("rewards.model_weight is non-zero but no reward model was given (reward_from)")
        self.args = args
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        self.specs = list(args.functions)
        self.functions = [load_reward_function(spec) for spec in args.functions]
        self.function_weights = list(args.function_weights or [1.0] * len(self.functions))
        self.running = RunningMoments(reduce)  # reduce: across data-parallel ranks (see RunningMoments)

    @torch.no_grad()
    def raw_scores(
        self,
        sequences: torch.Tensor,
        sequence_mask: torch.Tensor,
        prompts: Sequence[list[dict[str, str]]],
        responses: Sequence[str],
        rows: Sequence[dict[str, Any]],
        forward_batch_size: int | None = None,
        model_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted sum of the sources before clipping and penalties. sequences/sequence_mask (B, T) -> (B,).
        ``model_scores`` (B,): the reward model's raw scores of these sequences when already computed."""
        total = torch.zeros(sequences.shape[0], device=sequences.device)
        if self.args.model_weight != 0:
            scores = model_scores
            if scores is None:
                scores = self.model_scores(sequences, sequence_mask, prompts, responses, forward_batch_size)
            if self.args.normalize:
                scores = self.reward_model.normalize(scores)
            total += self.args.model_weight * scores
        for spec, fn, weight in zip(self.specs, self.functions, self.function_weights):
            values = []
            for i, (p, r, row) in enumerate(zip(prompts, responses, rows)):
                try:
                    values.append(float(fn(list(p), r, dict(row))))
                except Exception as err:
                    raise RuntimeError(
                        f"reward function {spec!r} failed on row {i} ({repr(row)[:200]}): {err!r}"
                    ) from err
            total += weight * torch.tensor(values, device=total.device)
        return total

    @torch.no_grad()
    def model_scores(
        self,
        sequences: torch.Tensor,
        sequence_mask: torch.Tensor,
        prompts: Sequence[list[dict[str, str]]],
        responses: Sequence[str],
        forward_batch_size: int | None = None,
    ) -> torch.Tensor:
        """The reward model's un-normalised scores (B,) float32 for prompt + response ``sequences`` (B, T)."""
        if self.reward_model is None:
            raise ValueError("no reward model to score with (reward_from is not set)")
        if self.reward_tokenizer is not None:
            sequences, sequence_mask = self._retokenize(prompts, responses, sequences.device)
        chunk = forward_batch_size or sequences.shape[0]
        return torch.cat(
            [
                self.reward_model(sequences[i : i + chunk], sequence_mask[i : i + chunk]).float()
                for i in range(0, sequences.shape[0], chunk)
            ]
        )

    def _retokenize(
        self, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Render prompt + response with the reward model's tokenizer: right-padded ids (B, T') and mask (B, T')."""
        tok = self.reward_tokenizer
        rows = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if not prompt:
                raise ValueError(
                    f"row {i}: the reward model uses another tokenizer than the policy, so the prompt messages are "
                    "needed to re-render it; expected PromptBatch.rows with a 'prompt' entry"
                )
            ids, _ = tok.render([*prompt, {"role": "assistant", "content": response}])
            rows.append(ids)
        width = max(len(ids) for ids in rows)
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids.to(device), mask.to(device)

    def shape(
        self, raw: torch.Tensor, ended_with_eos: torch.Tensor, update_running: bool = True
    ) -> torch.Tensor:
        """Running normalisation, clipping and the missing-EOS score: raw (B,), ended_with_eos (B,) bool -> (B,).

        ``update_running=False`` (evaluation) uses the running std without folding ``raw`` into it.
        """
        scores = raw
        if self.args.running_normalize:
            counted = raw if self.args.missing_eos_score is None else raw[ended_with_eos]
            # scores replaced below never enter the statistics; every rank folds in (a collective), even none
            if update_running:
                self.running.update(counted)
            std = self.running.std
            if std > 1e-8:  # no spread seen yet: dividing by ~0 would blow scores up to the clip limit
                scores = scores / std
        if self.args.clip is not None:
            scores = scores.clamp(-self.args.clip, self.args.clip)
        if self.args.missing_eos_score is not None:
            scores = torch.where(ended_with_eos, scores, torch.full_like(scores, self.args.missing_eos_score))
        return scores
