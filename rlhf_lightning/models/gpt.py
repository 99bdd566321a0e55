"""The built-in decoder-only transformer with a preallocated KV cache.

Architecture (a compact Llama/GPT-NeoX-style decoder):

- pre-norm residual blocks with RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization");
- rotary position embeddings, RoPE (Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position
  Embedding"), in the "rotate half" layout of GPT-NeoX/Llama, computed from explicit ``position_ids`` so that
  left-padded rows get positions 0, 1, ... on their real tokens;
- attention through ``torch.nn.functional.scaled_dot_product_attention``: the fast ``is_causal`` path (flash kernels)
  whenever nothing is cached yet and no row has left padding or holes (right padding needs no mask: causality already
  hides trailing pads from real queries), an explicit (B, 1, T, S) boolean mask otherwise;
- SwiGLU MLP (Shazeer, 2020, "GLU Variants Improve Transformer") or GELU MLP (GPT-2);
- GPT-2 initialisation (Radford et al., 2019): N(0, 0.02) everywhere, residual output projections scaled by
  1/sqrt(2 * n_layer); optional tied input/output embeddings (Press & Wolf, 2017).

Masking conventions. ``attention_mask`` is (B, T) bool, True on real tokens. A key that is padding is never attended
to. A query that is padding (left padding) would attend to nothing and produce NaN, so every query may always attend
to its own key; the output at pad positions is meaningless but finite, and never used.

Position ids default to ``attention_mask.cumsum(-1) - 1`` clamped at 0. With a :class:`KVCache`, new positions continue
from each row's count of real tokens seen so far, so a prefill + decode run yields exactly the positions that one full
forward over the final sequence would use.

Deliberate choices beyond docs/ARCHITECTURE.md: ``GPTConfig`` also has ``mlp`` ("swiglu" | "gelu"),
``attn_dropout`` (None = same as ``dropout``) and ``init_std``; ``new_cache`` also takes ``device``/``dtype``; the
model has a ``gradient_checkpointing`` flag (per-block ``torch.utils.checkpoint`` while training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlhf_lightning.functional.attention import packed_causal_attention, packed_position_ids
from rlhf_lightning.functional.masked import is_right_padded

__all__ = ["GPT", "PRESETS", "GPTConfig", "KVCache", "RMSNorm", "create_model"]


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT`. Validated on construction."""

    vocab_size: int
    """Number of token ids (V)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; ``n_embd // n_head`` (the head dim) must be even for RoPE."""
    n_embd: int = 256
    """Hidden size (D)."""
    max_seq_len: int = 512
    """Longest sequence (prompt + response) the model accepts, and the largest KV cache it hands out."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of ``n_embd`` (for SwiGLU, 2/3 of it per branch, rounded up to a multiple of 32)."""
    dropout: float = 0.0
    """Dropout on embeddings and residual branches while training (keep 0 for RLHF policies)."""
    attn_dropout: float | None = None
    """Dropout on attention probabilities while training; None = same as ``dropout``."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection (``lm_head``)."""
    rope_theta: float = 10000.0
    """RoPE base: frequencies are ``rope_theta ** (-2i / head_dim)``."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP kind: gated SiLU (three matrices) or GPT-2 GELU (two matrices)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation (GPT-2)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim n_embd/n_head = {self.head_dim} must be even for rotary embeddings")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be > 0")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")

    @property
    def head_dim(self) -> int:
        """Per-head size, ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """Width of the MLP hidden layer."""
        if self.mlp == "gelu":
            return int(self.mlp_ratio * self.n_embd)
        hidden = int(2 * self.mlp_ratio * self.n_embd / 3)
        return 32 * math.ceil(hidden / 32)


PRESETS: dict[str, dict] = {
    # Unit tests: a few milliseconds per forward.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, max_seq_len=256),
    # A 2-core CPU: ~3.2M non-embedding parameters; SFT on ~300 conversations of ~200 tokens in a few minutes.
    "small": dict(n_layer=4, n_head=4, n_embd=256, max_seq_len=512),
    # GPT-2 small scale (~85M non-embedding, ~125M with a 50k vocab).
    "medium": dict(n_layer=12, n_head=12, n_embd=768, max_seq_len=1024),
    # GPT-2 medium scale (~300M non-embedding, ~350M with a 50k vocab).
    "large": dict(n_layer=24, n_head=16, n_embd=1024, max_seq_len=2048),
}


def create_model(preset: str = "small", *, vocab_size: int, **overrides) -> GPT:
    """Build a freshly initialised :class:`GPT` from a preset, overriding any :class:`GPTConfig` field.

    Raises ``ValueError`` for an unknown preset or an unknown override name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
    return GPT(GPTConfig(vocab_size=vocab_size, **{**PRESETS[preset], **overrides}))


class KVCache:
    """Preallocated keys/values for incremental decoding.

    Per layer ``k``/``v`` are (B, H, L, hd) with L = ``max_len``. ``length`` is the write pointer (slots filled so
    far, the same for every row); ``key_mask`` (B, L) bool is True on filled slots that hold real tokens; ``n_real``
    (B,) long counts the real tokens per row (the next token's position id).

    A ``static`` cache also keeps the write pointer as a 0-d long tensor ``pos`` for :meth:`GPT.decode_step`, which
    advances ``pos`` (not the Python int ``length``, so a compiled step never sees a changing constant): fill it with
    one :meth:`GPT.hidden_states` prefill, then decode with ``decode_step`` only.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        *,
        device,
        dtype,
        static: bool = False,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, L)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0
        self.max_len = max_len
        self.batch_size = batch_size
        self.static = static
        self.pos = torch.zeros((), dtype=torch.long, device=device) if static else None  # () next slot

    def append(self, mask: Tensor) -> int:
        """Reserve slots for T new tokens with key mask ``mask`` (B, T) bool; return their first slot."""
        start, t = self.length, mask.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"KV cache overflow: {start} + {t} tokens > max_len {self.max_len}")
        self.key_mask[:, start : start + t] = mask
        self.n_real += mask.sum(-1)
        self.length = start + t
        if self.pos is not None:
            self.pos.fill_(self.length)
        return start

    def update(self, layer: int, start: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` (B, H, T, hd) at ``start`` for ``layer``; return all keys/values so far (B, H, S, hd).

        ``start`` a (T,) long tensor of slots (static decoding): written in place with ``index_copy_`` and the whole
        (B, H, L, hd) buffers are returned (the caller's key mask hides the slots not written yet)."""
        if isinstance(start, Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, T, hd) by the angles whose cos/sin are (B, 1, T, hd)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.residual_scale = True  # marks the GPT-2 scaled init
        self.attn_dropout = config.dropout if config.attn_dropout is None else config.attn_dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, D); cos/sin (B, 1, T, hd); mask (B, 1, T, S) bool or None (= causal) -> (B, T, D).

        ``cu_seqlens`` (D + 1,): x is one packed row (1, N, D) of documents that attend only within themselves."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cu_seqlens is not None:
            dropout_p = self.attn_dropout if self.training else 0.0
            y = packed_causal_attention(q, k, v, cu_seqlens, dropout_p=dropout_p)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask is None,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu(up(x)))``) feed-forward."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden
        self.gated = config.mlp == "swiglu"
        self.up = nn.Linear(config.n_embd, (2 if self.gated else 1) * hidden, bias=False)
        self.down = nn.Linear(hidden, config.n_embd, bias=False)
        self.down.residual_scale = True

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    """Pre-norm block: ``x + drop(attn(norm(x)))`` then ``x + drop(mlp(norm(x)))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, start, cu_seqlens))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only language model. See the module docstring for masking and position conventions.

    Attributes: ``config`` (:class:`GPTConfig`), ``wte`` (token embedding), ``blocks``, ``norm`` (final RMSNorm),
    ``lm_head`` (D -> V, weight shared with ``wte`` when tied), ``gradient_checkpointing`` (bool, default False).
    """

    accepts_4d_mask = True  # hidden_states takes a (B, 1, T, T) attention pattern (functional.prefix_sharing)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        inv_freq = config.rope_theta ** (
            -torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            scale = (
                1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_scale", False) else 1.0
            )
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of (unique) parameters; ``non_embedding`` leaves out the token embedding (and an untied head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows of up to ``max_len`` tokens (default: model device/dtype);
        ``static`` for :meth:`decode_step`."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len {max_len} > model max_seq_len {self.config.max_seq_len}")
        p = self.wte.weight
        c = self.config
        return KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            c.head_dim,
            max_len,
            device=device or p.device,
            dtype=dtype or p.dtype,
            static=static,
        )

    def decode_step(self, input_ids: Tensor, cache: KVCache) -> Tensor:
        """Final-norm hidden state (B, D) of one new real token per row, input_ids (B, 1), with a ``static`` cache
        already filled by a :meth:`hidden_states` prefill.

        Every shape is fixed from step to step: the token's slot is the tensor ``cache.pos``, keys/values are
        written in place, and attention runs over all L slots under the cache's key mask (slots not written yet are
        False; the newest slot is the last one filled, so causality needs nothing more). So ``torch.compile``
        captures the step once (and can replay it as a CUDA graph). The same numbers as :meth:`hidden_states` with a
        cache, up to float rounding. Advances ``cache.pos`` and ``cache.n_real``.
        """
        slot = cache.pos.view(1)  # (1,)
        cache.key_mask.index_fill_(1, slot, True)
        position_ids = cache.n_real[:, None]  # (B, 1): each row's count of real tokens so far
        mask = cache.key_mask[:, None, None, :]  # (B, 1, 1, L)
        x = self.wte(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i, slot)
        cache.n_real.add_(1)
        cache.pos.add_(1)
        return self.norm(x)[:, -1]

    def _rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, T) -> cos, sin (B, 1, T, hd) in ``dtype`` (angles computed in float32)."""
        freqs = position_ids.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, D).

        input_ids (B, T) long. attention_mask (B, T) bool/int, True on real tokens (None = all real); with a cache it
        may also cover the cached prefix too, (B, S + T) as in Hugging Face, and only its last T columns are read.
        A (B, 1, T, T) bool attention_mask is the attention pattern itself (True = query may attend to key; no
        cache, ``position_ids`` required), as ``functional.prefix_sharing`` builds it.
        position_ids (B, T) long (default: see module docstring). cache: written in place and advanced by T.
        cu_seqlens (D + 1,) int: a packed row (B = 1, ``data.collate.pack_sequences``) of documents that attend only
        within themselves; ``position_ids`` then default to restarting at 0 in each document.
        """
        if cu_seqlens is not None:
            return self._packed_hidden_states(input_ids, position_ids, cache, cu_seqlens)
        if attention_mask is not None and attention_mask.ndim == 4:
            return self._masked_hidden_states(input_ids, attention_mask, position_ids, cache)
        b, t = input_ids.shape
        device = input_ids.device
        if attention_mask is not None:
            attention_mask = attention_mask[:, -t:].bool()

        if cache is None and t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.config.max_seq_len}")
        if cache is not None and attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=device)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(t, device=device).expand(b, t)
            else:
                before = 0 if cache is None else cache.n_real[:, None]  # real tokens already cached
                position_ids = (before + attention_mask.long().cumsum(-1) - 1).clamp_(min=0)

        start = 0 if cache is None else cache.append(attention_mask)
        end = start + t
        # Fast path (SDPA is_causal, flash kernels): nothing cached before and no key to hide from a real query,
        # i.e. no padding or right padding only (causality already hides trailing pads from real tokens).
        mask = None
        if start > 0 or (attention_mask is not None and not is_right_padded(attention_mask)):
            # Query i sits at slot start + i; key j is allowed if j <= start + i and real, or j == start + i
            # (so a pad query attends to itself instead of nothing, which would give NaN).
            keys = attention_mask if cache is None else cache.key_mask[:, :end]  # (B, S)
            q_slot = torch.arange(start, end, device=device)[:, None]  # (T, 1)
            k_slot = torch.arange(end, device=device)[None, :]  # (1, S)
            mask = ((k_slot <= q_slot) & keys[:, None, None, :]) | (k_slot == q_slot)  # (B, 1, T, S)

        return self._trunk(input_ids, position_ids, mask, cache, start)

    def _trunk(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        start: int = 0,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Embed, run every block (checkpointed when ``gradient_checkpointing`` applies: training, grad on, no
        cache) and the final norm: hidden states (B, T, D). ``mask`` (B, 1, T, S) bool or None, as in
        :class:`Attention`."""
        x = self.drop(self.wte(input_ids))
        cos, sin = self._rope(position_ids, x.dtype)
        use_ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                x = checkpoint(block, x, cos, sin, mask, None, 0, 0, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, start, cu_seqlens)
        return self.norm(x)

    def _masked_hidden_states(
        self, input_ids: Tensor, mask: Tensor, position_ids: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """Hidden states (B, T, D) under a caller's (B, 1, T, T) bool attention mask (True = attend; e.g.
        ``functional.prefix_sharing``), RoPE from ``position_ids`` (required: the mask says nothing of positions)."""
        if cache is not None or position_ids is None:
            raise ValueError("a (B, 1, T, T) attention mask needs position_ids and takes no KV cache")
        longest = int(position_ids.max()) + 1
        if longest > self.config.max_seq_len:
            raise ValueError(f"position {longest - 1} >= max_seq_len {self.config.max_seq_len}")
        return self._trunk(input_ids, position_ids, mask.bool())

    def _packed_hidden_states(
        self, input_ids: Tensor, position_ids: Tensor | None, cache: KVCache | None, cu_seqlens: Tensor
    ) -> Tensor:
        """Hidden states (1, N, D) of a packed row: per-document causal attention, RoPE from ``position_ids``."""
        if cache is not None or input_ids.shape[0] != 1:
            raise ValueError("a packed batch (cu_seqlens) is one row (1, N) and takes no KV cache")
        n = input_ids.shape[1]
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens.to(input_ids.device), n)[None]
        longest = int(position_ids.max()) + 1
        if longest > self.config.max_seq_len:
            raise ValueError(f"packed document of {longest} tokens > max_seq_len {self.config.max_seq_len}")
        return self._trunk(input_ids, position_ids, None, cu_seqlens=cu_seqlens)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for every position; arguments as in :meth:`hidden_states`."""
        return self.lm_head(
            self.hidden_states(input_ids, attention_mask, position_ids, cache, cu_seqlens=cu_seqlens)
        )
