"""torchrun scale-out: the one place that knows ranks, the process group and how work is dealt.

`vidquant calibrate | run | sweep | quantize` run as one process or as ``torchrun --nproc_per_node=N`` ranks.
Every rule about ranks lives here, so the stages only ask: which items are mine (`deal`), wait for the others
(`barrier`), let rank 0 do a step and tell the others its result or its error (`on_main`), share a small
JSON-able object (`broadcast`, `all_gather`). Outside torchrun (no process group) the rank is 0 of 1 and
each of these is the single-process behaviour, so one code path serves both.

Small objects travel as JSON bytes in a uint8 tensor (no pickle, unlike ``broadcast_object_list``), on the
backend's device (nccl needs CUDA tensors). Large data (statistics, layer states, videos) is never sent:
each rank writes its own files and the others read them after a `barrier`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT = timedelta(hours=6)  # one rank may quantize or generate for hours while the others wait at a barrier


def rank() -> int:
    """This process's rank (0 outside torchrun or before the process group is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    """The number of ranks (1 outside torchrun or before the process group is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes shared files, evaluates, reports and prints."""
    return rank() == 0


def env_rank() -> int:
    """The rank torchrun gave this process (``RANK``), readable before the process group exists (logging set-up)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def init_from_env() -> bool:
    """Join torchrun's process group when ``WORLD_SIZE`` is set (nccl with CUDA, gloo on CPU); True when joined.

    Called by the CLI only: the Python API uses whatever group the caller initialised (or none).
    """
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    logger.info("rank %d of %d (%s)", rank(), world(), backend)
    return True


def quiet_other_ranks(log_format: str, level: int = logging.WARNING) -> None:
    """Log below ``level`` on rank 0 only (N ranks would print every line N times); warnings still show on
    every rank, ``log_format`` prefixed with the rank so that a rank's own trouble is findable."""
    r = env_rank()
    if r == 0:
        return
    root = logging.getLogger()
    root.setLevel(max(root.level, level))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {r}] {log_format}"))


def barrier() -> None:
    """Wait until every rank got here (nothing outside torchrun)."""
    if world() > 1:
        dist.barrier()


def deal(items: Iterable[T], rank: int, world: int, weights: Sequence[float] | None = None) -> list[T]:
    """The items ``rank`` of ``world`` takes, in their given order.

    Without ``weights``: round-robin (items ``rank, rank + world, ...``), stable whatever the item. With
    ``weights`` (one cost per item): longest-first greedy onto the least-loaded rank, ties broken by item
    position and then by rank, so every rank computes the same split; it bounds the heaviest rank's load by
    4/3 of the optimum (Graham), where round-robin can put every heavy item on one rank.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}: needs 0 <= rank < world")
    items = list(items)
    if weights is None:
        return items[rank::world]
    if len(weights) != len(items):
        raise ValueError(f"{len(weights)} weights for {len(items)} items")
    load = [0.0] * world
    owner = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (-float(weights[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(weights[i])
    return [item for item, o in zip(items, owner, strict=True) if o == rank]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(obj: Any) -> torch.Tensor:
    data = json.dumps(obj, allow_nan=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _decode(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().numpy().tobytes()).decode())


def broadcast(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (JSON-able) on every rank; ``obj`` itself outside torchrun."""
    if world() <= 1:
        return obj
    device = _device()
    payload = _encode(obj).to(device) if rank() == src else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src)
    return _decode(payload)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-able), in rank order, on every rank; ``[obj]`` outside torchrun."""
    if world() <= 1:
        return [obj]
    device = _device()
    payload = _encode(obj).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world())]
    dist.all_gather(parts, padded)
    return [_decode(p[: int(s.item())]) for p, s in zip(parts, sizes, strict=True)]


def on_main(step: Callable[[], T]) -> T | Any:
    """Run ``step`` on rank 0 only and give every rank its JSON-able result.

    An error ``step`` raises is raised on every rank with the same message (a ValueError as such, anything else
    as a RuntimeError), so the others fail with rank 0's reason instead of waiting at a barrier until torchrun's
    timeout. Outside torchrun: ``step()``.
    """
    if world() <= 1:
        return step()
    outcome: dict[str, Any] | None = None
    if is_main():
        try:
            outcome = {"result": step()}
        except Exception as err:
            broadcast({"error": str(err), "value_error": isinstance(err, ValueError)})
            raise
    outcome = broadcast(outcome)
    if "error" in outcome:
        if outcome["value_error"]:
            raise ValueError(outcome["error"])
        raise RuntimeError(f"rank 0 failed: {outcome['error']}")
    return outcome["result"]


def rank_path(path: str | Path, rank: int, world: int) -> Path:
    """``path`` for one rank of ``world`` (``NAME.rank{r}-of-{w}``, a sibling), or ``path`` itself for one process:
    the file or folder that rank alone writes."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}-of-{world}")


def rank_paths(path: str | Path) -> list[Path]:
    """``path`` and every `rank_path` of it that exists, of any world size (what an interrupted run left)."""
    path = Path(path)
    found = [p for p in sorted(path.parent.glob(f"{_glob_escape(path.name)}.rank*-of-*")) if p.exists()]
    return ([path] if path.exists() else []) + found


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
