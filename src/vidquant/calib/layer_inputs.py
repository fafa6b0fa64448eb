"""What GPTQ and the clip-ratio search need of each Linear input: X^T X and a per-timestep-bin sample.

`collect_layer_inputs` runs the calibration data again (prompts with seeds ``seed + i``, as `calibrate`,
or the user's forward loop) and, for each distinct input of the chosen target Linears (the adapter's
`input_groups`: Linears reading one tensor share one record), accumulates the Hessian
``H = sum_t x_t^T x_t`` in fp32 on the activations' device and keeps a bounded uniform sample of rows per
timestep bin (`capture.Reservoir`, on the CPU). Rows holding NaN/Inf are left out of both. Memory is
designed, not hoped for: ``hessian_nbytes`` says what a set of inputs costs before anything is allocated,
so the caller can split the layers into passes.
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


@dataclass
class LayerInputs:
    """One distinct Linear input: the Linears that read it, ``hessian`` (K, K) fp32, rows seen, bin samples."""

    layers: list[str]
    hessian: Tensor | None  # None: samples only
    tokens: int
    samples: list[Reservoir]

    def update(self, x: Tensor, timestep_bin: int, _branch: int = 0) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        finite = torch.isfinite(rows).all(dim=-1)
        if not bool(finite.all()):
            rows = rows[finite]
        for start in range(0, rows.shape[0] if self.hessian is not None else 0, ROWS_PER_MATMUL):
            chunk = rows[start : start + ROWS_PER_MATMUL].float()
            self.hessian.addmm_(chunk.T, chunk)
        self.tokens += rows.shape[0]
        self.samples[timestep_bin].add(rows)

    def bin_samples(self) -> list[Tensor | None]:
        """The kept rows of each timestep bin (None for a bin no call fell into)."""
        return [r.sample() if r.seen else None for r in self.samples]

    def mean_hessian(self) -> Tensor:
        """``H / tokens`` (scale does not change GPTQ, but keeps magnitudes readable)."""
        if self.hessian is None:
            raise ValueError(f"{self.layers[0]}: collected without its Hessian")
        if self.tokens == 0:
            raise ValueError(f"no finite input reached {self.layers[0]} during calibration")
        return self.hessian / self.tokens


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
) -> dict[str, dict[str, LayerInputs]]:
    """Per expert and input group (keyed by its first Linear), the `LayerInputs` over the calibration data.

    ``data``: the calibration prompts (the first ``settings.num_prompts`` run) or a forward loop.
    ``groups[expert]`` lists groups of target Linears that read one input (the adapter's `input_groups`);
    ``edges[expert]`` the timestep-bin edges; at most ``max_tokens`` rows are kept per bin. ``hessians=False``
    keeps the samples only (held-out inputs for scoring). ``on_prompt`` is called after each prompt (progress).
    """
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
            records[expert][group[0]] = LayerInputs(
                list(group),
                torch.zeros(k, k, dtype=torch.float32, device=lin.weight.device) if hessians else None,
                0,
                [Reservoir(max_tokens, seed=seed * 64 + b) for b in range(len(edges[expert]) - 1)],
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
