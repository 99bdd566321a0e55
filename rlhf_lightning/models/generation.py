"""Batched autoregressive sampling with a KV cache.

Prompts come left-padded (B, P) with a bool attention mask. One prefill forward fills the cache, then each step feeds
one token per row. Sampling follows the usual recipe: divide logits by the temperature, optionally keep the top-k
logits (Fan et al., 2018) and/or the smallest set of tokens whose probability reaches top-p (nucleus sampling,
Holtzman et al., 2020; at least one token is always kept), then sample; greedy (argmax) when ``do_sample`` is False.

Responses are truncated at each row's first EOS: the EOS itself counts (mask True); later positions hold
``pad_token_id`` and mask False. Decoding stops as soon as every row has finished, so R <= ``max_new_tokens`` (for a
model sharded with FSDP2, every row of every data-parallel rank: the ranks' forwards are collectives).

For PPO the log-probs seen during the rollout must match the ones recomputed in training, so
``output_logprobs=True`` returns ``log_softmax(logits / temperature)`` of each chosen token, before any top-k/top-p
filtering. With filtering (or greedy decoding) the tokens do not come from that distribution, so PPO's ratios would be
off-policy: ``PPOModule`` refuses such settings (:attr:`GenerationArgs.samples_full_distribution`).

Prompts must be left-padded (every row's real tokens end in the last column): :func:`check_left_padded` refuses a
right-padded mask with the offending row, since each step reads the last column's hidden state.

``use_cache=False`` recomputes the whole sequence at every step; it is the naive baseline for the equivalence tests
and ``benchmarks/generation.py``. The model contract: ``hidden_states(input_ids, attention_mask, position_ids=None,
cache=None) -> (B, T, D)``, ``lm_head`` (D -> V), and for ``use_cache=True`` also ``new_cache(batch_size, max_len)``.
Only the last position's hidden state is projected to the vocabulary at each step.

Fast decoding (:attr:`GenerationArgs.static_cache`, :attr:`GenerationArgs.compile`). The default loop is simple and
dynamic: each step's attention mask and position ids are rebuilt, a Hugging Face backbone's ``DynamicCache`` grows by
``torch.cat`` and its mask is rebuilt by transformers, and every step ends in a host sync (``finished.all()``). With
``static_cache`` the model's ``new_cache(..., static=True)`` preallocates P + max_new_tokens slots (rounded up to a
multiple of 64 so nearby prompt widths share one compiled shape; a new cache per call, none is kept), one
prefill fills it, and each step runs the model's ``decode_step`` (one token per row, written in place at a tensor slot,
attention over every slot under a key mask built inside the step, transformers' ``StaticCache`` for HF backbones); the
finished check runs every ``check_every`` steps and R is cut back to the last step where a row was alive, so outputs
are those of the default loop (up to float rounding in attention over masked slots). ``compile`` also runs the decode
step, LM head and sampling through ``torch.compile`` (shapes are fixed, so one graph serves every step; the uniforms
are drawn outside it from the same generator, so a fixed seed samples the same tokens). A compile failure warns and
reruns the call eagerly (the generator's state restored first); FSDP-sharded models always use the default loop.

Deliberate additions to docs/ARCHITECTURE.md: the ``output_logprobs`` flag and the optional ``logprobs`` field of
:class:`GenerationOutput`; the model is switched to eval mode during generation (dropout off, as PPO requires) and
restored afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf_lightning.distributed import all_reduce_sum

__all__ = [
    "GenerationArgs",
    "GenerationOutput",
    "check_left_padded",
    "choose_token",
    "generate",
    "sample_next_token",
]


@dataclass(frozen=True)
class GenerationArgs:
    """How to sample responses."""

    max_new_tokens: int
    """Most tokens generated per row (R <= max_new_tokens)."""
    temperature: float = 1.0
    """Logits are divided by this before sampling (and before log-probs are taken); > 0."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens with total probability >= top_p; 1.0 disables."""
    do_sample: bool = True
    """Sample from the (filtered) distribution; False = greedy argmax."""
    static_cache: bool = False
    """Fixed-shape decoding: a preallocated KV cache written in place, the model's one-token ``decode_step`` with its
    attention mask built once per step inside it, a finished check every ``check_every`` steps (see the module
    docstring). Same tokens as the default loop; needs a model with ``decode_step`` (built-in GPT, HF backbones)."""
    compile: bool = False
    """``torch.compile`` the decode step + LM head + sampling (implies ``static_cache``). Each new batch size or cache
    length compiles once (seconds to a minute on CPU) before it pays; a failed compile warns and decodes eagerly."""
    check_every: int = 8
    """With ``static_cache``/``compile``: steps between checks that every row has finished (each is a host sync, so
    a GPU can queue the steps in between); up to ``check_every - 1`` steps may run after the last row ends."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {self.check_every!r}")

    @property
    def fast_decode(self) -> bool:
        """True when the fixed-shape decode loop runs (``static_cache`` or ``compile``)."""
        return self.static_cache or self.compile

    @property
    def samples_full_distribution(self) -> bool:
        """True when tokens are drawn from the whole tempered distribution (sampling, no top-k / top-p filtering):
        the only setting whose stored log-probs are those of the sampling distribution (on-policy for PPO)."""
        return self.do_sample and self.top_k == 0 and self.top_p == 1.0


# typed config stored in checkpoint hyper-parameters: loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([GenerationArgs])


@dataclass(frozen=True)
class GenerationOutput:
    """Prompts and generated responses."""

    sequences: Tensor  # (B, P + R) long: the left-padded prompt followed by the response
    response_ids: Tensor  # (B, R) long: generated tokens, pad_token_id after the first EOS
    response_mask: Tensor  # (B, R) bool: True up to and including the first EOS
    logprobs: Tensor | None = None  # (B, R) float32: log p(token | logits / temperature); 0 where mask False


def check_left_padded(attention_mask: Tensor, what: str = "generate", hint: str = "") -> None:
    """Raise ``ValueError`` unless each row of the (B, P) mask is padding first, then real tokens (left padding).

    The message names ``what`` was given the mask, the first offending row, and ends with ``hint``.
    """
    mask = attention_mask.bool()
    bad = (mask[:, :-1] & ~mask[:, 1:]).any(-1)  # (B,): a real token followed by padding
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: prompts must be left-padded (padding first, then the prompt), but row {row} has padding "
            f"after a real token{hint}"
        )


def sample_next_token(
    logits: Tensor, args: GenerationArgs, generator: torch.Generator | None = None
) -> Tensor:
    """Choose one token per row from ``logits`` (B, V) already divided by the temperature -> (B,) long."""
    return choose_token(logits, args, _uniforms(logits.shape[0], args, generator, logits.device))


def _uniforms(b: int, args: GenerationArgs, generator: torch.Generator | None, device) -> Tensor | None:
    """The (B, 1) float64 uniforms one sampling step draws (None when greedy: nothing is drawn)."""
    if not args.do_sample:
        return None
    return torch.rand(b, 1, generator=generator, dtype=torch.float64, device=device)


def choose_token(logits: Tensor, args: GenerationArgs, u: Tensor | None) -> Tensor:
    """:func:`sample_next_token` with its uniforms ``u`` (B, 1) float64 in [0, 1) given (None when greedy), so the
    choice itself draws no random numbers (a compiled step takes ``u`` as an input)."""
    if not args.do_sample:
        return logits.argmax(-1)
    if args.top_k and args.top_k < logits.shape[-1]:
        kth = torch.topk(logits, args.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if args.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the first token is always kept.
        drop_sorted = (probs.cumsum(-1) - probs) >= args.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: one uniform per row and a binary search (about 10x cheaper than torch.multinomial on
    # CPU for a 4k vocabulary). float64 keeps u * total strictly below the total mass, so a token filtered to
    # probability 0 is never chosen.
    cdf = logits.softmax(-1).double().cumsum(-1)  # (B, V)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def _output(
    input_ids: Tensor, response: Tensor, mask: Tensor, logprobs: Tensor | None, steps: int
) -> GenerationOutput:
    """The first ``steps`` columns of the preallocated (B, max_new) buffers as a :class:`GenerationOutput`."""
    response, mask = response[:, :steps], mask[:, :steps]
    return GenerationOutput(
        sequences=torch.cat([input_ids, response], dim=1),
        response_ids=response,
        response_mask=mask,
        logprobs=None if logprobs is None else logprobs[:, :steps],
    )


def _all_finished(finished: Tensor, model: nn.Module) -> bool:
    """Every row has finished; for a model sharded with FSDP2, every row of every rank: each forward gathers the
    parameters from all ranks, so the ranks must take the same number of steps (a rank whose rows are all done keeps
    stepping, emitting padding, until the others finish)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return bool(all_reduce_sum((~finished).sum().float()) == 0)
    return bool(finished.all())


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    args: GenerationArgs,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    output_logprobs: bool = False,
) -> GenerationOutput:
    """Sample responses for left-padded prompts.

    input_ids (B, P) long, attention_mask (B, P) bool (True on real prompt tokens). Returns sequences (B, P + R),
    response_ids (B, R), response_mask (B, R) and, with ``output_logprobs``, logprobs (B, R).
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, P), got {input_ids.shape} and {attention_mask.shape}"
        )
    if eos_token_id == pad_token_id:
        raise ValueError("pad_token_id must differ from eos_token_id (otherwise EOS is masked out)")
    check_left_padded(attention_mask)
    b, p = input_ids.shape
    device = input_ids.device
    n_new = args.max_new_tokens
    max_seq_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_seq_len is not None and p + n_new > max_seq_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {n_new} > the model's max_seq_len {max_seq_len}"
        )
    attention_mask = attention_mask.bool()

    was_training = model.training
    model.eval()
    try:
        if use_cache and args.fast_decode and _fast_decode_supported(model):
            kw = dict(
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                generator=generator,
                output_logprobs=output_logprobs,
            )
            if not args.compile or model in _COMPILE_FAILED:
                return _generate_static(model, input_ids, attention_mask, args, compiled=False, **kw)
            rng = _rng_state(generator, device)
            try:
                return _generate_static(model, input_ids, attention_mask, args, compiled=True, **kw)
            except Exception as error:  # a compiler failure: warn, then the same call eagerly
                _COMPILE_FAILED.add(model)
                warnings.warn(
                    f"torch.compile of the decode step failed ({type(error).__name__}: {error}); generating "
                    "without compile from now on for this model",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _set_rng_state(generator, device, rng)
                return _generate_static(model, input_ids, attention_mask, args, compiled=False, **kw)
        response = torch.full((b, n_new), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(b, n_new, dtype=torch.bool, device=device)
        logprobs = torch.zeros(b, n_new, dtype=torch.float32, device=device) if output_logprobs else None
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)

        if use_cache:
            cache = model.new_cache(b, p + n_new)
            h = model.hidden_states(input_ids, attention_mask, cache=cache)[:, -1]
        else:
            seq, seq_mask = input_ids, attention_mask
            h = model.hidden_states(seq, seq_mask)[:, -1]

        steps = 0
        for step in range(n_new):
            logits = model.lm_head(h).float() / args.temperature  # (B, V)
            token = sample_next_token(logits, args, generator)  # (B,)
            alive = ~finished
            if logprobs is not None:
                lp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
                logprobs[:, step] = torch.where(alive, lp, 0.0)
            token = torch.where(alive, token, pad_token_id)
            response[:, step] = token
            mask[:, step] = alive
            finished = finished | (token == eos_token_id)
            steps = step + 1
            if step == n_new - 1 or _all_finished(finished, model):
                break
            if use_cache:
                h = model.hidden_states(token[:, None], ones, cache=cache)[:, -1]
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                seq_mask = torch.cat([seq_mask, ones], dim=1)
                h = model.hidden_states(seq, seq_mask)[:, -1]
    finally:
        model.train(was_training)

    return _output(input_ids, response, mask, logprobs, steps)


# ------------------------------------------------------------------------------------------- fixed-shape decoding

STATIC_CACHE_MULTIPLE = 64
"""Static KV caches hold P + max_new_tokens slots rounded up to a multiple of this (capped at the model's
``max_seq_len``): prompt batches a little wider or narrower reuse the same compiled graph."""

_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()  # models whose decode step failed to compile
_COMPILED_STEP = None  # torch.compile(_decode_and_choose), made on first use


def _fast_decode_supported(model: nn.Module) -> bool:
    """The model has a ``decode_step`` and is not FSDP-sharded (``decode_step`` is no registered forward method)."""
    from torch.distributed.fsdp import FSDPModule

    return callable(getattr(model, "decode_step", None)) and not isinstance(model, FSDPModule)


def _static_length(model: nn.Module, needed: int) -> int:
    length = -(-needed // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
    max_seq_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    return length if max_seq_len is None else max(needed, min(length, max_seq_len))


def _head_and_choose(
    model: nn.Module, h: Tensor, u: Tensor | None, args: GenerationArgs, want_logprobs: bool
) -> tuple[Tensor, Tensor | None]:
    """Hidden states (B, D) -> the chosen tokens (B,) and, if wanted, their log-probs (B,) float32."""
    logits = model.lm_head(h).float() / args.temperature  # (B, V)
    token = choose_token(logits, args, u)
    if not want_logprobs:
        return token, None
    return token, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)


def _decode_and_choose(
    model: nn.Module, token: Tensor, cache, u: Tensor | None, args: GenerationArgs, want_logprobs: bool
) -> tuple[Tensor, Tensor | None]:
    """One fixed-shape step: feed ``token`` (B,) through ``model.decode_step``, then choose the next tokens."""
    return _head_and_choose(model, model.decode_step(token[:, None], cache), u, args, want_logprobs)


def _compiled_step():
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_decode_and_choose)
    return _COMPILED_STEP


def _rng_state(generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(generator: torch.Generator | None, device: torch.device, state: Tensor) -> None:
    if generator is not None:
        generator.set_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _generate_static(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    args: GenerationArgs,
    *,
    compiled: bool,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
    output_logprobs: bool,
) -> GenerationOutput:
    """The fixed-shape loop (see the module docstring); the same outputs as the default loop of :func:`generate`."""
    b, p = input_ids.shape
    device = input_ids.device
    n_new = args.max_new_tokens
    response = torch.full((b, n_new), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, n_new, dtype=torch.bool, device=device)
    logprobs = torch.zeros(b, n_new, dtype=torch.float32, device=device) if output_logprobs else None
    finished = torch.zeros(b, dtype=torch.bool, device=device)

    cache = model.new_cache(b, _static_length(model, p + n_new), device=device, static=True)
    h = model.hidden_states(input_ids, attention_mask, cache=cache)[:, -1]  # prefill, eager
    token, lp = _head_and_choose(model, h, _uniforms(b, args, generator, device), args, output_logprobs)
    step_fn = _compiled_step() if compiled else _decode_and_choose
    steps = n_new
    with contextlib.ExitStack() as stack:
        for step in range(n_new):
            if compiled and step == 2:
                # Steps 0-1 ran the compiled step's guards (and compiled it if needed); the later steps have the
                # same types and shapes, so only the guards that tell cache entries apart run (a 1 ms saving per
                # step on CPU for a small model, where full guard evaluation costs about as much as the graph)
                stack.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
            alive = ~finished
            if logprobs is not None:
                logprobs[:, step] = torch.where(alive, lp, 0.0)
            token = torch.where(alive, token, pad_token_id)
            response[:, step] = token
            mask[:, step] = alive
            finished = finished | (token == eos_token_id)
            if step == n_new - 1:
                break
            if (step + 1) % args.check_every == 0 and _all_finished(finished, model):
                steps = step + 1
                break
            u = _uniforms(b, args, generator, device)
            token, lp = step_fn(model, token, cache, u, args, output_logprobs)
    # R as in the default loop: up to the last step at which some row was still alive (it wrote that row's EOS)
    alive_steps = mask[:, :steps].any(0).nonzero()
    steps = int(alive_steps[-1]) + 1
    return _output(input_ids, response, mask, logprobs, steps)
