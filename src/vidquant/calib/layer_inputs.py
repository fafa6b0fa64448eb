"""What GPTQ and the clip-ratio search need of each Linear input: X^T X and a per-timestep-bin sample.

`collect_layer_inputs` runs the calibration data again (prompts with seeds ``seed + i``, as `calibrate`,
or the user's forward loop) and, for each distinct input of the chosen target Linears (the adapter's
`input_groups`: Linears reading one tensor share one record), accumulates the Hessian
``H = sum_t x_t^T x_t`` in fp32 on the activations' device and keeps a bounded uniform sample of rows per
timestep bin (`capture.Reservoir`, on the CPU). Rows holding NaN/Inf are left out of both. Memory is
designed, not hoped for: ``hessian_nbytes`` says what a set of inputs costs before anything is allocated,
so the caller can split the layers into passes.

Held-out rows (``held_out_tokens > 0``): anything fitted to the calibration data (GPTQ's damping, the
low-rank refinement's stopping point, the clip ratios) is judged on rows it was not fitted on. Each row
draws a seeded uniform key; rows with a key below ``held_out_fraction`` are candidates, and per timestep
bin the ``held_out_tokens`` candidates with the smallest keys are held out (`HeldOutRows`): they are in
neither the Hessian nor the bin sample. A candidate pushed out of the held-out set by a smaller key later
is added to the Hessian then, so at the end ``H`` is exactly ``X^T X`` over every row not held out, with
bounded memory (``held_out_tokens`` rows per bin, on the CPU, in the activations' dtype: 28 MB per bin at
13824 wide, bf16, 1024 rows). At 75k tokens a few hundred held-out rows cost the Hessian nothing; at 200
tokens the fraction bounds what is given up (25 rows at 1/8).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import adapter_for
from .calibrate import CalibSettings
from .capture import Reservoir
from .collector import observing
from .data import CalibData, generate, is_prompts, run_loop

logger = logging.getLogger(__name__)

ROWS_PER_MATMUL = 8192  # rows of x per X^T X update: bounds the fp32 copy of a 75k-token activation
HELD_OUT_FRACTION = 0.125  # share of the calibration rows that may be held out (candidates)
_SPLIT_STREAM = 1 << 50  # the row-key generator's seed is seed * 64 + this, clear of the bin samples' seed * 64 + bin


class HeldOutRows:
    """The ``capacity`` candidate rows with the smallest keys of a stream, kept on the CPU.

    `offer` takes candidate rows with their keys and returns the rows it does not keep (new ones that lost,
    and kept ones they displaced): the caller adds those to the Hessian, so nothing is lost or counted twice.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys = torch.empty(0, dtype=torch.float64)
        self.positions = torch.empty(0, dtype=torch.int64)
        self.rows: Tensor | None = None

    def offer(self, rows: Tensor, keys: Tensor, positions: Tensor) -> Tensor | None:
        """Keep the smallest keys among the kept and the offered rows; return the others (None: none)."""
        if rows.shape[0] == 0:
            return None
        rows = rows.detach().cpu()
        all_rows = rows if self.rows is None else torch.cat([self.rows, rows])
        all_keys = torch.cat([self.keys, keys])
        all_positions = torch.cat([self.positions, positions])
        if all_keys.numel() <= self.capacity:
            self.rows, self.keys, self.positions = all_rows, all_keys, all_positions
            return None
        order = all_keys.argsort(stable=True)
        keep, drop = order[:self.capacity], order[self.capacity:]
        self.rows, self.keys, self.positions = all_rows[keep], all_keys[keep], all_positions[keep]
        return all_rows[drop]

    @property
    def count(self) -> int:
        return int(self.keys.numel())

    def sample(self) -> Tensor | None:
        """The held-out rows in stream order (None: none)."""
        if self.rows is None or self.count == 0:
            return None
        return self.rows[self.positions.argsort()]


@dataclass
class LayerInputs:
    """One distinct Linear input: the Linears that read it, ``hessian`` (K, K) fp32, rows seen, bin samples.

    With ``held_out`` (one `HeldOutRows` per bin) and its ``split`` generator, a seeded share of the rows is
    held out of the Hessian and of the bin samples (module docstring).
    """

    layers: list[str]
    hessian: Tensor | None  # None: samples only
    tokens: int  # finite rows seen, held out or not
    samples: list[Reservoir]
    held_out: list[HeldOutRows] | None = None
    split: torch.Generator | None = None
    held_out_fraction: float = HELD_OUT_FRACTION

    def update(self, x: Tensor, timestep_bin: int, _branch: int = 0) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        finite = torch.isfinite(rows).all(dim=-1)
        if not bool(finite.all()):
            rows = rows[finite]
        fitted = rows
        if self.held_out is not None and rows.shape[0]:
            keys = torch.rand(rows.shape[0], generator=self.split, dtype=torch.float64)
            candidate = keys < self.held_out_fraction
            if bool(candidate.any()):
                index = candidate.nonzero().squeeze(1)
                fitted = rows[~candidate.to(rows.device)]
                returned = self.held_out[timestep_bin].offer(rows[index.to(rows.device)], keys[index],
                                                             index + self.tokens)
                if returned is not None:  # candidates not held out after all: fitted, not sampled
                    self._accumulate(returned.to(rows.device))
        self._accumulate(fitted)
        self.tokens += rows.shape[0]
        self.samples[timestep_bin].add(fitted)

    def _accumulate(self, rows: Tensor) -> None:
        for start in range(0, rows.shape[0] if self.hessian is not None else 0, ROWS_PER_MATMUL):
            chunk = rows[start : start + ROWS_PER_MATMUL].float()
            self.hessian.addmm_(chunk.T, chunk)

    @property
    def held_out_tokens(self) -> int:
        """Rows held out of the Hessian and the bin samples."""
        return 0 if self.held_out is None else sum(h.count for h in self.held_out)

    @property
    def fitted_tokens(self) -> int:
        """Rows in the Hessian (every finite row not held out)."""
        return self.tokens - self.held_out_tokens

    def bin_samples(self) -> list[Tensor | None]:
        """The kept rows of each timestep bin (None for a bin no call fell into, or whose rows are all held out)."""
        return [r.sample() if r.seen and bool(torch.isfinite(r.keys).any()) else None for r in self.samples]

    def held_out_samples(self) -> list[Tensor | None]:
        """The held-out rows of each timestep bin (None: none; all None without a held-out split)."""
        if self.held_out is None:
            return [None] * len(self.samples)
        return [h.sample() for h in self.held_out]

    def mean_hessian(self) -> Tensor:
        """``H / fitted tokens`` (scale does not change GPTQ, but keeps magnitudes readable)."""
        if self.hessian is None:
            raise ValueError(f"{self.layers[0]}: collected without its Hessian")
        if self.fitted_tokens == 0:
            raise ValueError(f"no finite input reached {self.layers[0]} during calibration"
                             + (f" outside its {self.held_out_tokens} held-out rows" if self.held_out_tokens else ""))
        return self.hessian / self.fitted_tokens


def hessian_nbytes(in_features: int) -> int:
    """Bytes of one fp32 Hessian of a Linear with ``in_features`` inputs."""
    return 4 * in_features * in_features


def collect_layer_inputs(
    model,
    data: CalibData,
    settings: CalibSettings,
    groups: dict[str, list[list[str]]],
    edges: dict[str, list[float]],
    max_tokens: int = 256,
    *,
    hessians: bool = True,
    on_prompt: Callable[[], None] | None = None,
    held_out_tokens: int = 0,
    held_out_fraction: float = HELD_OUT_FRACTION,
) -> dict[str, dict[str, LayerInputs]]:
    """Per expert and input group (keyed by its first Linear), the `LayerInputs` over the calibration data.

    ``data``: the calibration prompts (the first ``settings.num_prompts`` run) or a forward loop.
    ``groups[expert]`` lists groups of target Linears that read one input (the adapter's `input_groups`);
    ``edges[expert]`` the timestep-bin edges; at most ``max_tokens`` rows are kept per bin. ``hessians=False``
    keeps the samples only (held-out inputs for scoring). ``on_prompt`` is called after each prompt (progress).
    ``held_out_tokens`` > 0 holds out up to that many rows per bin, drawn from the ``held_out_fraction`` of
    rows that are candidates (module docstring): they are fitted on by nothing and judge what is.
    """
    if isinstance(held_out_tokens, bool) or not isinstance(held_out_tokens, int) or held_out_tokens < 0:
        raise ValueError(f"held_out_tokens must be an integer >= 0, got {held_out_tokens!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    prompts = is_prompts(data)
    if prompts and len(data) < settings.num_prompts:
        raise ValueError(f"{settings.num_prompts} calibration prompts asked for, the prompt set has {len(data)}")
    adapter = adapter_for(model)
    records: dict[str, dict[str, LayerInputs]] = {}
    for expert, expert_groups in groups.items():
        linears = adapter.target_linears(expert)
        records[expert] = {}
        for group in expert_groups:
            lin = linears[group[0]]
            k = lin.in_features
            seed = settings.seed + zlib.crc32(f"{expert}.{group[0]}".encode())  # whatever else is collected along
            bins = len(edges[expert]) - 1
            records[expert][group[0]] = LayerInputs(
                list(group),
                torch.zeros(k, k, dtype=torch.float32, device=lin.weight.device) if hessians else None,
                0,
                [Reservoir(max_tokens, seed=seed * 64 + b) for b in range(bins)],
                [HeldOutRows(held_out_tokens) for _ in range(bins)] if held_out_tokens else None,
                torch.Generator().manual_seed(seed * 64 + _SPLIT_STREAM) if held_out_tokens else None,
                held_out_fraction,
            )
    observers = {expert: {first: rec.update for first, rec in recs.items()} for expert, recs in records.items()}
    with observing(adapter, edges, observers):
        if not prompts:
            run_loop(model, data, on_batch=on_prompt)
            return records
        model.set_progress_bar_config(disable=True)
        for i in range(settings.num_prompts):
            logger.info("(%d/%d) layer inputs of prompt %d: %s", i + 1, settings.num_prompts, i, data[i][:80])
            generate(model, data[i], settings, seed=settings.seed_for(i))
            if on_prompt is not None:
                on_prompt()
    return records
