"""Deploy settings a user gives by a flag or, for a whole session (CI, a test run), by an environment variable:
read from the flag, else the variable, else the default; a bad value is one line naming where it came from."""
from __future__ import annotations

import os

from convnext_deploy.pipeline.core.errors import UserError


def _flag_or_env(given: str | None, flag: str, var: str, default: str, parse, rule: str):
    """A deploy setting from its flag, else its environment variable, else `default`; `parse` gives None for a value
    that breaks `rule`, which is refused in one line naming where the value came from."""
    raw = given if given is not None else os.environ.get(var, default)
    value = parse(raw)
    if value is None:
        raise UserError(f"{flag if given is not None else var} {raw!r} must be {rule}")
    return value


def _positive_seconds(raw: str) -> float | None:
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def timing_budget(given: str | None) -> float:
    return _flag_or_env(given, "--timing-budget", "CONVNEXT_DEPLOY_TIMING_BUDGET_S", "60", _positive_seconds,
                        "a number of seconds > 0 (the most one decision adds timing rounds for)")


def loads(given: str | None) -> int:
    return _flag_or_env(given, "--loads", "CONVNEXT_DEPLOY_LOADS", "3",
                        lambda raw: int(raw) if raw.isdigit() and int(raw) >= 1 else None,
                        "a whole number ≥ 1 (fresh loads of each artifact the timing is spread over)")


def _batch_list(raw: str) -> tuple[int, ...] | None:
    parts = [p.strip() for p in raw.split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts) or 1 not in {int(p) for p in parts}:
        return None
    return tuple(sorted({int(p) for p in parts}))


def batches(given: str | None) -> tuple[int, ...]:
    return _flag_or_env(given, "--batches", "CONVNEXT_DEPLOY_BATCHES", "1,8", _batch_list,
                        "batch sizes separated by commas, 1 among them (the gates read batch 1), e.g. 1,8")
