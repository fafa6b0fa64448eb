"""One way to say what a pydantic schema refused: "key: what is wrong (got value)", for every artifact."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

MAX_SHOWN = 200  # characters of an offending value echoed back


def _increasing(edges: list[float]) -> list[float]:
    if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError("timestep-bin edges must be finite and increasing")
    return edges


# Timestep-bin edges of one expert, as statistics and states record them.
BinEdges = Annotated[list[float], Field(min_length=2), AfterValidator(_increasing)]


def describe_error(error: Any, prefix: str = "") -> str:
    """One pydantic error as "key: what is wrong (got value)", with the key's dotted path."""
    key = ".".join(str(part) for part in ((prefix,) if prefix else ()) + tuple(error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not key:  # a model-level rule: the message names its keys
        return message
    return f"{key}: {message} (got {_short(error['input'])})"


def describe(err: ValidationError, prefix: str = "", limit: int = 5) -> str:
    """The first ``limit`` problems of a ValidationError, joined."""
    problems = [describe_error(e, prefix) for e in err.errors()]
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."
