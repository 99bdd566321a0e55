"""Ready-made rule-based reward functions for PPO (``rewards.functions: ["rlhf_lightning.reward_functions:NAME"]``).

Each takes ``(prompt, response, row)``: the prompt messages, the decoded response (truncated at EOS) and the prompt
row's extra fields, and returns a float. Write your own with the same signature in any importable module.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_correct(prompt: list[dict[str, str]], response: str, row: dict[str, Any]) -> float:
    """1.0 when the last number in the response (or the one after ``####``) equals the row's ``answer``, else 0.0."""
    if "answer" not in row:
        raise KeyError("gsm8k_correct needs an 'answer' field in each prompt row")
    tail = response.split("####")[-1]
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return 0.0
    try:
        return float(float(numbers[-1].replace(",", "")) == float(str(row["answer"]).replace(",", "")))
    except ValueError:
        return 0.0


def brevity(prompt: list[dict[str, str]], response: str, row: dict[str, Any]) -> float:
    """Higher for shorter responses: ``1 - words / 50`` floored at -1 (a toy objective for tests and demos)."""
    return max(-1.0, 1.0 - len(response.split()) / 50.0)


def contains_target(prompt: list[dict[str, str]], response: str, row: dict[str, Any]) -> float:
    """1.0 when the response contains the row's ``target`` string (default ``"the"``), else 0.0."""
    return float(str(row.get("target", "the")) in response)
