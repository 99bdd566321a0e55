"""Bounded oneDNN caches: resident memory that stays flat when bf16 matmuls on CPU see many distinct shapes.

Why: under bf16 autocast on CPU, torch runs every matmul / linear through oneDNN (fp32 goes to MKL's sgemm, which
keeps nothing per shape). oneDNN builds a primitive for each distinct problem shape (JIT-compiled kernels plus the
buffers the primitive owns, about 0.3-2 MB each, growing with the shape) and keeps it in two caches of 1024 entries
each by default: oneDNN's own primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's, torch's oneDNN
wrapper (``LRU_CACHE_CAPACITY``). PPO trims every forward to the columns its rows use (``stages/rollout.py``), so
nearly every micro-batch has a new sequence length, and each new length adds primitives for every weight shape,
forward and backward: the resident set grew ~100 MB per PPO iteration while the live tensors stayed constant, up to
about 2 x 1024 primitives (several GB). Measured (``benchmarks/probes/ppo_rss.py``, 2-layer tiny Llama, 8 PPO
iterations, bf16-mixed): RSS 0.90 -> 1.63 GB and still rising with the default capacities; 0.90 -> 0.96-0.98 GB
(flat after the second iteration) with both capacities at 64; float32 0.88-0.92 GB. Lowering only one of the two
caches only slows the growth (the other still holds the primitives). A fixed-shape training step needs about 3
primitives (forward, two backward) per distinct weight shape, ~15-20 for a Llama, so 64 keeps them all cached.

How: :func:`bound_onednn_caches` sets both variables' defaults in ``os.environ``; it runs when ``rlhf_lightning`` is
imported (departure from "``__init__.py``: version only": the pipeline runs SFT, reward and PPO in one process, and
both libraries read the variables once, at the first oneDNN primitive the process creates, so the only dependable
moment is before any stage runs; this module imports nothing heavy). A value set by the user (``ONEDNN_`` or the
older ``DNNL_`` name) is kept; a process that ran a oneDNN op before importing ``rlhf_lightning`` keeps the defaults.
Never set either to 0: ``LRU_CACHE_CAPACITY=0`` crashes torch 2.13's bf16 matmul (segmentation fault).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: entries per cache (oneDNN's primitive cache and ideep's LRU cache); the libraries' default is 1024 each
ONEDNN_CACHE_CAPACITY = 64

#: the variables each cache reads, first the one this module sets (oneDNN also reads the older ``DNNL_`` name)
CACHE_VARIABLES = {
    "oneDNN primitive cache": ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"),
    "ideep LRU cache": ("LRU_CACHE_CAPACITY",),
}


def bound_onednn_caches(
    capacity: int = ONEDNN_CACHE_CAPACITY, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set the capacity of each oneDNN cache to ``capacity`` in ``environ`` (default ``os.environ``) unless one of
    its variables is already set; returns the variables set now (name -> value). Effective only before the
    process creates its first oneDNN primitive (see the module docstring)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 (0 crashes torch's bf16 matmul), got {capacity}")
    env = os.environ if environ is None else environ
    set_now = {}
    for names in CACHE_VARIABLES.values():
        if not any(name in env for name in names):
            env[names[0]] = set_now[names[0]] = str(capacity)
    return set_now
