"""The oneDNN cache bound (rlhf_lightning/onednn.py): set on import, before any stage runs, never over a user's value.

The memory effect itself (resident set flat under bf16 autocast with many distinct matmul shapes) is measured by
benchmarks/probes/ppo_rss.py, not asserted here; these tests check the mechanism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_lightning.onednn import ONEDNN_CACHE_CAPACITY, bound_onednn_caches

VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def test_both_caches_are_bounded_when_unset():
    env: dict[str, str] = {}
    set_now = bound_onednn_caches(environ=env)
    expected = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
    assert env == set_now == expected
    assert ONEDNN_CACHE_CAPACITY == 64


def test_a_users_value_is_kept_under_either_name():
    env = {"DNNL_PRIMITIVE_CACHE_CAPACITY": "512"}
    assert bound_onednn_caches(8, environ=env) == {"LRU_CACHE_CAPACITY": "8"}
    assert env == {"DNNL_PRIMITIVE_CACHE_CAPACITY": "512", "LRU_CACHE_CAPACITY": "8"}
    env = {"LRU_CACHE_CAPACITY": "2048", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}
    assert bound_onednn_caches(environ=env) == {}
    assert env == {"LRU_CACHE_CAPACITY": "2048", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def test_zero_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        bound_onednn_caches(0, environ={})


def test_importing_the_package_bounds_the_caches_before_torch_runs_anything():
    """A fresh process with neither variable set has both set by ``import rlhf_lightning`` alone (the libraries read
    them at the process's first oneDNN primitive, so a stage's import comes early enough)."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    code = (
        "import json, os, sys; import rlhf_lightning; "
        f"print(json.dumps({{k: os.environ.get(k) for k in {VARIABLES!r}}})); "
        "print(json.dumps('torch' in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert json.loads(out[0]) == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
        "DNNL_PRIMITIVE_CACHE_CAPACITY": None,
        "LRU_CACHE_CAPACITY": "64",
    }
    assert json.loads(out[1]) is False  # importing the package stays cheap
