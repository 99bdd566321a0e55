"""Local Hugging Face causal LMs as backbones: the only model module that imports ``transformers`` / ``peft``.

:class:`HFCausalLM` wraps ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)`` (nothing is ever
downloaded; ``trust_remote_code`` only when the user asks) and implements the backbone protocol every stage uses:

- ``hidden_states(input_ids, attention_mask, position_ids=None, cache=None) -> (B, T, D)``: the base model's
  ``last_hidden_state`` (after its final norm), so heads and ``lm_head`` see what the HF LM head sees;
- ``lm_head`` (the model's output embedding), ``config`` (the HF config: ``hidden_size`` / ``n_embd``),
  ``gradient_checkpointing`` (a settable flag forwarded to ``gradient_checkpointing_enable``);
- ``new_cache(batch_size, max_len)`` -> :class:`HFCache`, a ``DynamicCache`` plus the attention mask of every token
  cached so far. Each call hands the model the whole accumulated (B, S + T) mask and position ids that continue
  from each row's count of real tokens, so ``models.generation.generate`` runs unchanged on left-padded prompts and
  a prefill + decode run sees exactly the positions of one full forward.

Position ids default to ``attention_mask.cumsum(-1) - 1`` clamped at 0, as in the built-in GPT (left padding safe).

Packed batches (``hidden_states(..., cu_seqlens=...)``, a (1, N) row of documents, ``data.collate.pack_sequences``)
run with no attention mask and ``position_ids`` restarting at 0 per document (so RoPE or learned positions are each
document's own). Attention, by the model's ``attn_implementation``:

* ``sdpa``: at the first packed batch the model switches, for good, to ``rlhf_packed``, registered through
  ``transformers.AttentionInterface``: given the ``cu_seq_lens_q`` this module passes down (packed rows) it runs
  ``functional.attention.packed_causal_attention`` (per-document causal SDPA, no (N, N) mask; flash varlen on GPU);
  otherwise (padded batches, generation) it is exactly ``sdpa``, with ``sdpa``'s mask function. For good, not per
  call, so gradient checkpointing recomputes the same attention in backward.
* ``eager``, ``flex_attention``, ``flash_attention_*``: transformers' own padding-free paths (a block-diagonal mask
  from the restarting ``position_ids``, ``masking_utils.find_packed_sequence_indices``; flash varlen from
  ``cu_seq_lens_q/k``, ``max_length_q/k``, passed too).

:class:`PackingUnsupportedError`, instead of documents silently attending to each other, for a decoder whose
modelling code builds its mask without ``masking_utils`` or takes no ``position_ids``, for ALiBi and for another
attention implementation.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") goes through ``peft.get_peft_model``:
only the adapter weights train, and :meth:`HFCausalLM.adapter_disabled` (peft's ``disable_adapter``) gives the base
model's outputs. A stage that trains a LoRA policy against a frozen reference (PPO) calls :func:`reference_of`: the
trained adapter is merged into the base weights, a fresh adapter trains on top, and the reference is the merged model
with that fresh adapter disabled, i.e. the SFT model itself, without a second copy of the weights (the pretrained base
would be the wrong reference: KL > 0 at step 0 and a penalty pulling the policy back to before SFT).

A checkpoint stores the spec (:meth:`HFCausalLM.spec`: the folder, the resolved config dict, the LoRA settings); the
weights travel in the Lightning state dict, so :meth:`HFCausalLM.from_spec` rebuilds the same module (random init from
the config, then ``load_state_dict``) without reading the folder's weights again. Vocabulary growth (a pad token
added by ``tokenization_hf``) resizes the embeddings before LoRA is applied, and the resized size is in the spec.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel, StaticCache

from rlhf_lightning.functional.attention import (
    PackingUnsupportedError,
    packed_causal_attention,
    packed_position_ids,
)
from rlhf_lightning.models.factory import LoRAArgs, UntrustedCodeError

__all__ = ["AdapterDisabledView", "HFCache", "HFCausalLM", "HFStaticCache", "is_hf_folder", "reference_of"]


def is_hf_folder(path: str | Path | None) -> bool:
    """True when ``path`` is a folder holding a Hugging Face ``config.json``."""
    return path is not None and (Path(path) / "config.json").is_file()


class HFCache:
    """A transformers ``DynamicCache`` and the (B, S) bool mask of the S tokens cached so far.

    ``n_real`` (B,) long counts real tokens per row: the position id of each row's next token.
    """

    def __init__(self, batch_size: int, max_len: int, device: torch.device) -> None:
        self.inner = DynamicCache()
        self.mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.batch_size = batch_size

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class HFStaticCache:
    """A transformers ``StaticCache`` of ``max_len`` slots and the (B, L) bool ``key_mask`` of the slots written so
    far that hold real tokens, for :meth:`HFCausalLM.decode_step` (fixed shapes: compilable).

    ``n_real`` (B,) long counts real tokens per row (the next position id); ``pos`` () long is the next slot (the
    same for every row, as the ``StaticCache``'s own write pointer); ``length`` is the Python-int pointer after the
    prefill (decode steps advance ``pos`` only).
    """

    def __init__(self, config: Any, batch_size: int, max_len: int, device: torch.device) -> None:
        self.inner = StaticCache(config=config, max_cache_len=max_len)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.batch_size = batch_size
        self.static = True


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (optionally with a LoRA adapter) behind the backbone protocol.

    Args:
        model: the loaded ``PreTrainedModel`` (``*ForCausalLM``).
        source: the folder it came from (stored in the spec; export copies nothing else from it).
        lora: LoRA settings; None trains every weight.
        trust_remote_code: whether the folder's own modelling code was run (recorded in the spec for information:
            a rebuild from the spec runs such code only when its caller passes ``trust_remote_code=True``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        source: str,
        lora: LoRAArgs | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.source = str(source)
        self.lora_args = lora
        self.trust_remote_code = trust_remote_code
        self.net = model if lora is None else _with_adapter(model, lora)
        self.net.train()  # from_pretrained returns eval mode; an nn.Module starts in train mode (stages switch it)
        self.config = self.hf_model.config
        self._gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        trust_remote_code: bool = False,
        lora: LoRAArgs | None = None,
        vocab_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> HFCausalLM:
        """Load the folder's weights (never from the network); grow the embeddings to ``vocab_size`` if larger."""
        if not is_hf_folder(path):
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
        _grow_vocab(model, vocab_size)
        return cls(model, str(path), lora=lora, trust_remote_code=trust_remote_code)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, trust_remote_code: bool = False) -> HFCausalLM:
        """Rebuild (random-initialised) the module described by :meth:`spec`; load the state dict afterwards.

        Only the caller's ``trust_remote_code`` (the user's flag) runs the folder's own code; the spec's recorded
        value is read from a checkpoint file and is never honoured. A custom architecture then fails in one line.
        """
        config_dict = dict(spec["config"])
        if trust_remote_code:
            config = AutoConfig.from_pretrained(spec["path"], local_files_only=True, trust_remote_code=True)
            for key, value in config_dict.items():
                setattr(config, key, value)
        else:
            model_type = config_dict.pop("model_type")
            config_dict.pop("auto_map", None)  # a pointer to the folder's own code: never followed untrusted
            try:
                config = AutoConfig.for_model(model_type, **config_dict)
            except ValueError:
                hint = " (recorded with trust_remote_code)" if spec.get("trust_remote_code") else ""
                raise UntrustedCodeError(
                    f"checkpoint backbone from {spec['path']}{hint}: model type {model_type!r} is not built into "
                    "transformers; loading it needs your own trust_remote_code=True (a checkpoint cannot turn it "
                    "on), and only for a folder you trust"
                ) from None
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, dtype=torch.float32
        )
        lora = spec.get("lora")
        return cls(
            model,
            spec["path"],
            lora=None if lora is None else LoRAArgs(**lora),
            trust_remote_code=trust_remote_code,
        )

    def spec(self) -> dict[str, Any]:
        """Plain-dict description (kind ``hf``) that :meth:`from_spec` turns back into this module."""
        config = self.hf_model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
            config.pop(key, None)
        return {
            "kind": "hf",
            "path": self.source,
            "config": config,
            "lora": None if self.lora_args is None else asdict(self.lora_args),
            "trust_remote_code": self.trust_remote_code,
        }

    # ------------------------------------------------------------------------------------------------- parts
    @property
    def is_lora(self) -> bool:
        return self.lora_args is not None

    @property
    def hf_model(self) -> PreTrainedModel:
        """The ``*ForCausalLM`` model (inside the peft wrapper when LoRA is on; its linears carry the adapter)."""
        return self.net.get_base_model() if self.lora_args is not None else self.net

    @property
    def decoder(self) -> nn.Module:
        """The base transformer (``LlamaModel``, ``GPT2Model``, ...) whose output is after the final norm."""
        model = self.hf_model
        return getattr(model, model.base_model_prefix)

    @property
    def lm_head(self) -> nn.Module:
        """D -> V output projection."""
        return self.hf_model.get_output_embeddings()

    @property
    def accepts_4d_mask(self) -> bool:
        """Whether :meth:`hidden_states` takes a (B, 1, T, T) bool attention pattern: with the ``sdpa`` and
        ``eager`` attention implementations (transformers passes a 4D mask through as given)."""
        return getattr(self.hf_model.config, "_attn_implementation", None) in (
            "sdpa",
            "eager",
            PACKED_ATTENTION,
        )

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        if bool(value) == self._gradient_checkpointing:
            return
        self._gradient_checkpointing = bool(value)
        model = self.hf_model
        if not getattr(model, "supports_gradient_checkpointing", False):
            if value:
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            return
        # transformers 5 renamed the methods (activation_checkpointing_*); the old names still work with a warning
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            if value:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.activation_checkpointing_disable()
        elif value:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the base model without the LoRA adapter (peft ``disable_adapter``); an error without LoRA."""
        if self.lora_args is None:
            raise RuntimeError("adapter_disabled() needs a LoRA model")
        with self.net.disable_adapter():
            yield

    def merge_adapter(self, fresh: bool = True) -> None:
        """Fold the trained adapter into the base weights and start a fresh adapter with the same settings
        (``fresh=False``: no new adapter; the module is then a plain model whose every weight trains).

        The module computes the same function (up to the rounding of ``W + B A * alpha / r``), its parameter names
        are unchanged (a state dict saved afterwards loads into :meth:`from_spec`'s rebuild), and the fresh adapter's
        update is exactly zero (peft starts ``lora_B`` at 0), so :meth:`adapter_disabled` now gives the model as it
        was when this was called instead of the pretrained base. Train mode and gradient checkpointing carry over.
        """
        if self.lora_args is None:
            raise RuntimeError("merge_adapter() needs a LoRA model")
        training = self.net.training
        merged = self.net.merge_and_unload()
        if fresh:
            self.net = _with_adapter(merged, self.lora_args)
        else:
            self.net, self.lora_args = merged, None
            self.net.requires_grad_(True)
        self.net.train(training)

    # ----------------------------------------------------------------------------------------------- compute
    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> HFCache | HFStaticCache:
        """An empty :class:`HFCache` (``max_len`` is advisory: the dynamic cache grows as needed), or with ``static``
        an :class:`HFStaticCache` of exactly ``max_len`` slots for :meth:`decode_step`."""
        device = torch.device(device or self.lm_head.weight.device)
        if static:
            return HFStaticCache(self.hf_model.config, batch_size, max_len, device)
        return HFCache(batch_size, max_len, device)

    @property
    def _cache_kwarg(self) -> str:
        """The decoder's keyword for the KV cache: ``cache`` from transformers 5.25, ``past_key_values`` before."""
        name = self.__dict__.get("_cache_kwarg_name")
        if name is None:
            params = inspect.signature(self.decoder.forward).parameters
            name = "cache" if "cache" in params else "past_key_values"
            self.__dict__["_cache_kwarg_name"] = name
        return name

    def _static_mask(self, cache: HFStaticCache, q_slot: Tensor, dtype: torch.dtype) -> Tensor:
        """The attention mask of queries at slots ``q_slot`` (T,) over every slot of ``cache``: (B, 1, T, L) for
        SDPA (bool, True = attend) and eager (additive float), else the (B, L) key mask for transformers to expand.

        Key j is allowed for the query at slot i if j <= i and it holds a real token, or j == i (a pad query then
        attends to itself instead of nothing, which would give NaN), as in ``models.gpt``.
        """
        if not self.accepts_4d_mask:
            return cache.key_mask
        k_slot = torch.arange(cache.max_len, device=q_slot.device)[None, :]  # (1, L)
        q = q_slot[:, None]  # (T, 1)
        allowed = ((k_slot <= q) & cache.key_mask[:, None, None, :]) | (k_slot == q)  # (B, 1, T, L)
        return self._as_4d_mask(allowed, dtype)

    def _as_4d_mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """A (B, 1, T, S) bool pattern (True = attend) as the attention implementation reads it: bool for SDPA,
        additive float (0 or the dtype's minimum) for eager."""
        if getattr(self.hf_model.config, "_attn_implementation", None) != "eager":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def _masked_hidden_states(self, input_ids: Tensor, mask: Tensor, position_ids: Tensor | None) -> Tensor:
        """Hidden states (B, T, D) under a caller's (B, 1, T, T) bool attention pattern (see :meth:`hidden_states`)."""
        if position_ids is None:
            raise ValueError("a (B, 1, T, T) attention mask needs position_ids")
        if not self.accepts_4d_mask:
            impl = getattr(self.hf_model.config, "_attn_implementation", None)
            raise ValueError(
                f"{self.source}: attn_implementation={impl!r} takes no (B, 1, T, T) attention mask here; "
                "expected sdpa or eager"
            )
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=self._as_4d_mask(mask.bool(), self.lm_head.weight.dtype),
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def _static_forward(
        self, input_ids: Tensor, mask: Tensor, position_ids: Tensor | None, cache: HFStaticCache
    ):
        """Prefill T tokens (mask (B, T) bool) into the static cache at ``cache.length``: hidden states (B, T, D)."""
        start, t = cache.length, input_ids.shape[1]
        if start + t > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {t} tokens > max_len {cache.max_len}")
        cache.key_mask[:, start : start + t] = mask
        if position_ids is None:
            position_ids = (cache.n_real[:, None] + mask.long().cumsum(-1) - 1).clamp_(min=0)
        dtype = self.lm_head.weight.dtype
        attn = self._static_mask(cache, torch.arange(start, start + t, device=input_ids.device), dtype)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache.inner},
        )
        cache.n_real += mask.sum(-1)
        cache.length = start + t
        cache.pos.fill_(cache.length)
        return out.last_hidden_state

    def decode_step(self, input_ids: Tensor, cache: HFStaticCache) -> Tensor:
        """Final-norm hidden state (B, D) of one new real token per row, input_ids (B, 1), with a static cache filled
        by a :meth:`hidden_states` prefill; every shape is fixed (attention over all L slots under the precomputed
        key mask, the slot a tensor), so ``torch.compile`` captures it once. Advances ``cache.pos``/``n_real``."""
        slot = cache.pos.view(1)
        cache.key_mask.index_fill_(1, slot, True)
        attn = self._static_mask(cache, slot, self.lm_head.weight.dtype)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=cache.n_real[:, None],
            use_cache=True,
            **{self._cache_kwarg: cache.inner},
        )
        cache.n_real.add_(1)
        cache.pos.add_(1)
        return out.last_hidden_state[:, -1]

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HFCache | HFStaticCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, D); arguments as in ``models.gpt.GPT.hidden_states``.

        With a cache, ``attention_mask`` may be (B, T) or cover the cached prefix too (only its last T columns are
        read); the cache's own mask supplies the prefix. ``cu_seqlens`` (D + 1,): a packed (1, N) row (module notes).
        A (B, 1, T, T) bool ``attention_mask`` is the attention pattern itself (True = attend; ``position_ids``
        required, no cache; sdpa and eager only, see :attr:`accepts_4d_mask`).
        """
        if cu_seqlens is not None:
            return self._packed_hidden_states(input_ids, position_ids, cache, cu_seqlens)
        if attention_mask is not None and attention_mask.ndim == 4:
            if cache is not None:
                raise ValueError("a (B, 1, T, T) attention mask takes no cache")
            return self._masked_hidden_states(input_ids, attention_mask, position_ids)
        b, t = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=device)
        else:
            mask = attention_mask[:, -t:].bool()
        if isinstance(cache, HFStaticCache):
            return self._static_forward(input_ids, mask, position_ids, cache)
        full = mask if cache is None else torch.cat([cache.mask, mask], dim=1)  # (B, S + T)
        if position_ids is None:
            before = 0 if cache is None else cache.n_real[:, None]
            position_ids = (before + mask.long().cumsum(-1) - 1).clamp_(min=0)
        kwargs = {} if cache is None else {self._cache_kwarg: cache.inner}
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=full.long(),
            position_ids=position_ids,
            use_cache=cache is not None,
            **kwargs,
        )
        if cache is not None:
            cache.mask = full
            cache.n_real = cache.n_real + mask.sum(-1)
        return out.last_hidden_state

    def check_packing(self) -> None:
        """Raise :class:`PackingUnsupportedError` unless this architecture computes per-document attention from
        packed ``position_ids`` (see the module notes)."""
        decoder = self.decoder
        why = _packing_obstacle(decoder, self.hf_model.config)
        if why is not None:
            raise PackingUnsupportedError(
                f"{type(decoder).__name__} ({self.source}): packed batches need per-document attention, but {why}; "
                "use packing=False for this model"
            )

    def _packed_hidden_states(
        self, input_ids: Tensor, position_ids: Tensor | None, cache: HFCache | None, cu_seqlens: Tensor
    ) -> Tensor:
        """Hidden states (1, N, D) of a packed row through transformers' padding-free path."""
        if cache is not None or input_ids.shape[0] != 1:
            raise ValueError("a packed batch (cu_seqlens) is one row (1, N) and takes no cache")
        self.check_packing()
        n = input_ids.shape[1]
        cu = cu_seqlens.to(input_ids.device)
        if position_ids is None:
            position_ids = packed_position_ids(cu, n)[None]
        config = self.hf_model.config
        implementation = str(getattr(config, "_attn_implementation", None) or "eager")
        full = cu if int(cu[-1]) == n else torch.cat([cu, cu.new_tensor([n])])  # padding: one more document
        full = full.to(torch.int32)
        longest = int(full.diff().max())
        kwargs: dict[str, Any] = dict(
            cu_seq_lens_q=full, cu_seq_lens_k=full, max_length_q=longest, max_length_k=longest
        )
        if implementation == "sdpa":
            _use_packed_attention(config)
        elif implementation not in (
            "eager",
            "flex_attention",
            PACKED_ATTENTION,
        ) and not implementation.startswith("flash_attention"):
            raise PackingUnsupportedError(
                f"{self.source}: attn_implementation={implementation!r} has no packed (padding-free) path here; "
                "expected sdpa, eager, flex_attention or flash_attention_*, or use packing=False"
            )
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=None,  # padding-free: documents from cu_seq_lens / the position ids' restarts
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HFCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V)."""
        return self.lm_head(
            self.hidden_states(input_ids, attention_mask, position_ids, cache, cu_seqlens=cu_seqlens)
        )


_PACKING_CHECKED: dict[type, str | None] = {}
PACKED_ATTENTION = "rlhf_packed"


def _packed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """A transformers attention function (``AttentionInterface``): query (B, H, T, hd), key/value (B, H_kv, S, hd)
    -> ((B, T, H, hd), None). Packed rows (``kwargs['cu_seq_lens_q']``): causal within each document, the mask
    unread; anything else: transformers' ``sdpa``."""
    cu = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window")
    too_long = window is not None and int(kwargs.get("max_length_q") or 0) > int(window)
    if cu is None or too_long or kwargs.get("softcap") is not None or query.shape[2] != key.shape[2]:
        # padded batches, generation, or what the per-document loop does not cover: sdpa with transformers' mask
        # (which is block-diagonal for packed rows: masking_utils reads the restarting position ids)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head with its group of query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = packed_causal_attention(query, key, value, cu, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _use_packed_attention(config: Any) -> None:
    """Switch an ``sdpa`` model to ``rlhf_packed`` (``sdpa`` plus the packed path; see the module notes)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    config._attn_implementation = PACKED_ATTENTION


def _packing_obstacle(decoder: nn.Module, config: Any) -> str | None:
    """Why ``decoder`` cannot run packed rows, or None when its mask comes from ``transformers.masking_utils``
    (which detects restarting ``position_ids``) and its positions from ``position_ids``."""
    if any("alibi" in str(key).lower() and value for key, value in config.to_dict().items()):
        return "it uses ALiBi position biases"
    cls = type(decoder)
    if cls not in _PACKING_CHECKED:
        import inspect

        reason = None
        if "position_ids" not in inspect.signature(cls.forward).parameters:
            reason = "its forward takes no position_ids"
        else:
            try:
                source = inspect.getsource(inspect.getmodule(cls))
            except (OSError, TypeError):
                source = ""
            if not any(
                name in source
                for name in (
                    "create_causal_mask(",
                    "create_sliding_window_causal_mask(",
                    "create_masks_for_generate(",
                )
            ):
                reason = "its modelling code does not build its mask with transformers.masking_utils"
        _PACKING_CHECKED[cls] = reason
    return _PACKING_CHECKED[cls]


def _with_adapter(model: PreTrainedModel, lora: LoRAArgs) -> nn.Module:
    """``model`` wrapped by peft with a new LoRA adapter (only the adapter's weights require gradients)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
        bias="none",
    )
    return get_peft_model(model, config)


def _grow_vocab(model: PreTrainedModel, vocab_size: int | None) -> None:
    """Resize the embeddings when the tokenizer has more ids than the model (e.g. an added pad token)."""
    if vocab_size is None:
        return
    current = model.get_input_embeddings().weight.shape[0]
    if vocab_size > current:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        # deterministic new rows (the mean of the old ones), so two loads of the same folder are the same model
        with torch.no_grad():
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None and module.weight.shape[0] == vocab_size:
                    module.weight[current:] = module.weight[:current].mean(0, keepdim=True)


def reference_of(policy: HFCausalLM) -> AdapterDisabledView:
    """The frozen reference of a LoRA ``policy`` about to train further, with no second copy of its weights.

    Merges the adapter trained so far (e.g. by SFT) into the base weights and starts a fresh one
    (:meth:`HFCausalLM.merge_adapter`), then returns the policy with that fresh adapter switched off: the policy
    exactly as it was when this was called, not the pretrained base. The one home of this rule for every stage that
    trains a LoRA policy against a reference (PPO now; DPO or GRPO later).
    """
    policy.merge_adapter()
    return AdapterDisabledView(policy)


class _AdapterDisabledHead(nn.Module):
    """``policy.lm_head`` called inside ``policy.adapter_disabled()``; ``weight`` is the head's (base) weight.

    Not a plain ``nn.Linear``, so the chunked LM-head path (``models.lm_head``) falls back to calling it."""

    def __init__(self, policy: HFCausalLM) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)  # not a submodule: registers no parameters twice

    @property
    def weight(self) -> Tensor:
        head = self._policy.lm_head
        return getattr(head, "base_layer", head).weight

    def forward(self, hidden: Tensor) -> Tensor:
        with self._policy.adapter_disabled():
            return self._policy.lm_head(hidden)


class AdapterDisabledView:
    """A LoRA policy with its adapter switched off (no second copy); build references with :func:`reference_of`.

    Not an ``nn.Module`` on purpose, so assigning it to a LightningModule attribute registers no parameters twice.
    Implements ``hidden_states`` / ``lm_head`` / ``config``, which is all the rollout reads from a reference, and
    ``training`` / ``new_cache``, which ``models.generation.generate`` also reads: PPO's score calibration samples
    replies from the reference.
    """

    def __init__(self, policy: HFCausalLM) -> None:
        self.policy = policy
        self.config = policy.config

    def hidden_states(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.policy.adapter_disabled():
            return self.policy.hidden_states(*args, **kwargs)

    @property
    def lm_head(self) -> nn.Module:
        """The policy's head run with the adapter off (LoRA may adapt ``lm_head`` itself: ``target_modules``)."""
        head = self.policy.lm_head
        # an unadapted head is the base head already: keep it (a plain Linear keeps the chunked LM-head path)
        return _AdapterDisabledHead(self.policy) if hasattr(head, "base_layer") else head

    @property
    def training(self) -> bool:
        return False  # frozen: eval()/train() leave the policy's own mode alone

    @property
    def accepts_4d_mask(self) -> bool:
        return self.policy.accepts_4d_mask

    def new_cache(self, *args: Any, **kwargs: Any) -> HFCache | HFStaticCache:
        return self.policy.new_cache(*args, **kwargs)

    def decode_step(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.policy.adapter_disabled():
            return self.policy.decode_step(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.policy.adapter_disabled():
            return self.policy(*args, **kwargs)

    def eval(self) -> AdapterDisabledView:
        return self

    def train(self, mode: bool = True) -> AdapterDisabledView:
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def to(self, *args: Any, **kwargs: Any) -> AdapterDisabledView:
        return self
