"""Log-probs of selected tokens through a backbone's LM head: chunked when the head is a plain ``nn.Linear``.

Every backbone (``models.gpt.GPT``, ``models.hf.HFCausalLM``) exposes ``hidden_states(...)`` and ``lm_head``. When
``lm_head`` is exactly an ``nn.Linear`` (the built-in GPT, tied or not; a Hugging Face ``get_output_embeddings()``,
tied to the input embeddings or not) its weight goes to ``functional.chunked.lm_head_logprobs``, which never holds
the (N, V) float32 logits. Anything else falls back to ``lm_head(hidden)`` and ``logprobs_from_logits``: a head that
LoRA wraps (peft's ``lora.Linear`` adds its own low-rank path), a custom head module, or a weight sharded by FSDP2
(a ``DTensor``: gathering it here would bypass FSDP's own unsharding of the head).
"""

from __future__ import annotations

from torch import Tensor, nn

from rlhf_lightning.functional.chunked import lm_head_logprobs
from rlhf_lightning.functional.logprobs import logprobs_from_logits

__all__ = ["linear_head", "selected_logprobs"]


def linear_head(model: nn.Module) -> nn.Linear | None:
    """``model.lm_head`` when it is a plain ``nn.Linear`` holding ordinary tensors, else None (use the module)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        DTensor = ()
    if isinstance(head.weight, DTensor) or isinstance(head.bias, DTensor):
        return None
    return head


def selected_logprobs(
    model: nn.Module, hidden: Tensor, targets: Tensor, *, chunked: bool = True, chunk_size: int | None = None
) -> Tensor:
    """(N,) float32 log-probs of ``targets`` (N,) given ``hidden`` (N, D), the model's hidden states at the N
    positions that predict them. ``chunked`` (and a plain linear head, :func:`linear_head`) projects ``chunk_size``
    tokens at a time (``functional.chunked``); otherwise the head builds the (N, V) logits."""
    head = linear_head(model) if chunked else None
    if head is not None:
        return lm_head_logprobs(hidden, head.weight, targets, head.bias, chunk_size=chunk_size)
    return logprobs_from_logits(model.lm_head(hidden)[None], targets[None])[0]
