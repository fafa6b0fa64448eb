"""Calibration statistics: per expert and distinct Linear input, keyed by timestep bin and CFG branch.

Everything here merges exactly (sums of counts, maxima, tail histograms that merge exactly), so the
statistics of N prompts, calls, bins, branches or processes equal those of one stream over the same
samples — "the same percentile rule is applied to the aggregated activation samples", never an average
of per-call percentiles. Memory does not grow with tokens, steps or prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_path
from ..checksum import tensors_sha256
from ..formats.base import use_cpu_kernels
from ..methods.smoothing import guarded_range
from ..models import BRANCHES
from ..safeio import TensorSpec, read_header, read_safetensors
from ..validation import BinEdges, describe
from . import histogram
from .histogram import TailHistogram
from .settings import CalibSettings

logger = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
META_FILE = "meta.json"
STATS_OWNED = (STATS_FILE, META_FILE, "rank*-of-*.safetensors")  # what a statistics folder may hold
FORMAT_VERSION = 2  # 2: a checksum of metadata and tensors in the header
READABLE_VERSIONS = (1, 2)  # version 1 has no checksum to verify
CHECKSUM_KEY = "vidquant_sha256"
# Per-token absmax distribution: quarter-octave buckets over [2^-32, 2^32), plus underflow/overflow.
TOKEN_MIN_EXP, TOKEN_MAX_EXP = -32, 32
TOKEN_BUCKETS = (TOKEN_MAX_EXP - TOKEN_MIN_EXP) * 4 + 2


@dataclass
class InputStats:
    """Statistics of one distinct input of one expert (shared by e.g. self-attention q/k/v).

    ``absmax`` (bins, 2, C) over finite values; ``tokens`` (bins, 2) rows seen; ``token_absmax``
    (bins, 2, TOKEN_BUCKETS) counts of per-token absmax; ``tails`` one per-channel tail histogram of |x|
    for the totals, or one per (bin, branch) when the statistics keep them by key
    (``tail_keys="bin_branch"``); the tails also count the NaN/Inf values, which everything else excludes.
    """

    layers: list[str]
    absmax: Tensor
    tokens: Tensor
    token_absmax: Tensor
    tails: list[TailHistogram] = field(default_factory=list)

    @classmethod
    def empty(cls, layers: list[str], channels: int, bins: int, tail_keys: str, device: torch.device) -> InputStats:
        n_tails = 1 if tail_keys == "total" else bins * len(BRANCHES)
        return cls(
            layers=layers,
            absmax=torch.zeros(bins, len(BRANCHES), channels, device=device),
            tokens=torch.zeros(bins, len(BRANCHES), dtype=torch.int64, device=device),
            token_absmax=torch.zeros(bins, len(BRANCHES), TOKEN_BUCKETS, dtype=torch.int64, device=device),
            tails=[histogram.empty(channels, device=device) for _ in range(n_tails)],
        )

    @property
    def nonfinite(self) -> int:
        """NaN/Inf values seen (the tail histograms count them per channel and exclude them elsewhere)."""
        return int(sum(int(t.nonfinite.sum()) for t in self.tails))

    @property
    def channels(self) -> int:
        return self.absmax.shape[-1]

    def update(self, x: Tensor, bin_: int, branch: int) -> None:
        """Add the activations ``x`` (..., C) seen at timestep bin ``bin_`` in CFG branch ``branch``.

        All on ``x``'s device and dtype, with no host synchronization (max is exact in any dtype).
        """
        x = x.detach().reshape(-1, x.shape[-1])
        tail = self.tails[0] if len(self.tails) == 1 else self.tails[bin_ * len(BRANCHES) + branch]
        histogram.update(tail, x)
        absmax, tokens = self.absmax[bin_, branch], self.tokens[bin_, branch]
        token_absmax = self.token_absmax[bin_, branch]
        if x.dtype == torch.float32 and use_cpu_kernels(x):  # one pass instead of ~10 small torch ops
            _key_update(x.contiguous().numpy(), absmax.numpy(), tokens.view(1).numpy(), token_absmax.numpy())
            return
        a = x.abs().nan_to_num_(nan=0.0, posinf=0.0)
        torch.maximum(absmax, a.amax(0).float(), out=absmax)
        tokens += a.shape[0]
        token_absmax += token_buckets(a.amax(1).float())

    def tail(self, bin_: int | None, branch: int | None) -> TailHistogram:
        """The tail histogram over the selected keys (all when None), merged exactly."""
        if len(self.tails) == 1:
            if bin_ is not None or branch is not None:
                raise ValueError(
                    "percentiles per timestep bin or CFG branch need statistics calibrated with "
                    "--tail-keys bin_branch; these keep tail histograms for the totals only"
                )
            return self.tails[0]
        n_branches = len(BRANCHES)
        picked = [
            h
            for i, h in enumerate(self.tails)
            if (bin_ is None or i // n_branches == bin_) and (branch is None or i % n_branches == branch)
        ]
        out = picked[0]
        for h in picked[1:]:
            out = histogram.merge(out, h)
        return out

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {
            f"{prefix}/absmax": self.absmax,
            f"{prefix}/tokens": self.tokens,
            f"{prefix}/token_absmax": self.token_absmax,
        }
        for i, tail in enumerate(self.tails):
            out.update(histogram.state_dict(tail, f"{prefix}/tail{i}/"))
        return out

    @classmethod
    def from_tensors(cls, layers: list[str], prefix: str, tensors: dict[str, Tensor], n_tails: int) -> InputStats:
        tails = [histogram.from_state_dict(tensors, f"{prefix}/tail{i}/") for i in range(n_tails)]
        return cls(
            layers,
            tensors[f"{prefix}/absmax"],
            tensors[f"{prefix}/tokens"],
            tensors[f"{prefix}/token_absmax"],
            tails,
        )


def token_buckets(token_absmax: Tensor) -> Tensor:
    """Histogram (TOKEN_BUCKETS,) of per-token absmax values (fp32, >= 0) on the fixed grid.

    Bucket = fp32 exponent plus the top two mantissa bits (four linear sub-buckets per octave) over
    [2^TOKEN_MIN_EXP, 2^TOKEN_MAX_EXP); bucket 0 holds smaller values, the last one larger values.
    """
    ids = token_absmax.view(torch.int32) >> (23 - 2)
    ids = (ids - ((127 + TOKEN_MIN_EXP) << 2) + 1).clamp_(0, TOKEN_BUCKETS - 1)
    return torch.bincount(ids, minlength=TOKEN_BUCKETS)


def token_bucket_edges() -> np.ndarray:
    """Edges of `token_buckets`' histogram (TOKEN_BUCKETS + 1 values; the under- and overflow buckets open)."""
    inner = [2.0 ** (TOKEN_MIN_EXP + j // 4) * (1 + (j % 4) / 4) for j in range(TOKEN_BUCKETS - 2)]
    return np.array([0.0, *inner, 2.0 ** (TOKEN_MIN_EXP + (TOKEN_BUCKETS - 2) // 4), np.inf])


@numba.njit(cache=True)
def _key_update(x, absmax, tokens, token_absmax):
    """`InputStats.update`'s per-key statistics of fp32 rows ``x`` (R, C), fused: the same results as the
    torch ops (max of the finite |x| per channel, one `token_buckets` count per row, the row count)."""
    inf = np.float32(np.inf)
    for i in range(x.shape[0]):
        peak = np.float32(0)
        for j in range(x.shape[1]):
            v = abs(x[i, j])
            if v < inf:  # NaN and Inf are excluded
                absmax[j] = max(absmax[j], v)
                peak = max(peak, v)
        bucket = np.int64(np.float32(peak).view(np.int32) >> 21) - ((127 + TOKEN_MIN_EXP) << 2) + 1
        token_absmax[min(max(bucket, 0), TOKEN_BUCKETS - 1)] += 1
    tokens[0] += x.shape[0]


@dataclass
class CalibStats:
    """All statistics of one calibration: ``inputs[expert][observer]`` plus what produced them.

    ``meta`` records the library version, model fingerprint, prompt-set hash, settings, the bin edges
    per expert and how many prompts are done; the layer map sends every target Linear to the observer
    of its input.
    """

    inputs: dict[str, dict[str, InputStats]]
    meta: dict

    @property
    def bins(self) -> int:
        return int(self.meta["settings"]["bins"])

    def experts(self) -> list[str]:
        return list(self.inputs)

    def layers(self, expert: str) -> list[str]:
        """Every target Linear of ``expert`` with statistics, in model order."""
        return [layer for obs in self._expert(expert).values() for layer in obs.layers]

    def input_of(self, expert: str, layer: str) -> InputStats:
        for obs in self._expert(expert).values():
            if layer in obs.layers:
                return obs
        raise ValueError(f"no statistics for layer '{layer}' of expert '{expert}'")

    def absmax(self, expert: str, layer: str, bin: int | None = None, branch: int | str | None = None) -> Tensor:
        """Per-channel max |x| of the input of ``layer``, over the selected bin / branch (all when None)."""
        obs = self.input_of(expert, layer)
        sel = obs.absmax
        if bin is not None:
            sel = sel[self._bin(bin)].unsqueeze(0)
        if branch is not None:
            sel = sel[:, self._branch(branch)].unsqueeze(1)
        return sel.reshape(-1, obs.channels).amax(0)

    def percentile(
        self, expert: str, layer: str, p: float, bin: int | None = None, branch: int | str | None = None
    ) -> Tensor:
        """Per-channel p-th percentile (numpy's linear rule) of |x| over all aggregated samples."""
        obs = self.input_of(expert, layer)
        b = None if bin is None else self._bin(bin)
        br = None if branch is None else self._branch(branch)
        return histogram.percentile(obs.tail(b, br), p)

    def activation_range(self, expert: str, layer: str, percentile: float, max_ratio: float | None = None) -> Tensor:
        """``a_i`` of ``layer``'s input: the max for p = 100, else the p-th percentile guarded by ``max_ratio``
        (`methods.smoothing.guarded_range`)."""
        a_max = self.absmax(expert, layer)
        a_p = None if percentile == 100.0 else self.percentile(expert, layer, percentile)
        return guarded_range(a_max, a_p, max_ratio)

    def tokens(self, expert: str, layer: str) -> int:
        return int(self.input_of(expert, layer).tokens.sum())

    # ---- storage --------------------------------------------------------------------------------------
    def save(self, directory: str | Path, filename: str = STATS_FILE) -> None:
        """Write ``filename`` (the metadata inside its header) and a readable ``meta.json`` beside it.

        The safetensors file is written to a temporary name and renamed, so an interrupted write
        leaves the previous complete file; its header, not meta.json, is what `load_stats` trusts.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for expert, observers in self.inputs.items():
            for name, obs in observers.items():
                tensors.update(obs.tensors(f"{expert}/{name}"))
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        header = json.dumps(self.meta, sort_keys=True)
        with atomic_path(directory / filename) as tmp:
            save_file(tensors, tmp, metadata={"vidquant": header, CHECKSUM_KEY: stats_checksum(header, tensors)})
        if filename == STATS_FILE:
            with atomic_path(directory / META_FILE) as tmp:
                tmp.write_text(json.dumps(self.meta, indent=1))

    def fingerprint(self) -> str:
        """sha256 of the metadata and every statistic: what a state made from these statistics records."""
        tensors = {}
        for expert, observers in self.inputs.items():
            for name, obs in observers.items():
                tensors.update(obs.tensors(f"{expert}/{name}"))
        return stats_checksum(json.dumps(self.meta, sort_keys=True), tensors)

    def _expert(self, expert: str) -> dict[str, InputStats]:
        if expert not in self.inputs:
            raise ValueError(f"no statistics for expert '{expert}'; have {', '.join(self.inputs)}")
        return self.inputs[expert]

    def _bin(self, bin_: int) -> int:
        if not 0 <= bin_ < self.bins:
            raise ValueError(f"timestep bin {bin_} out of range: these statistics have {self.bins} bins")
        return bin_

    @staticmethod
    def _branch(branch: int | str) -> int:
        if isinstance(branch, str):
            if branch not in BRANCHES:
                raise ValueError(f"unknown CFG branch '{branch}'; use one of {BRANCHES}")
            return BRANCHES.index(branch)
        if branch not in (0, 1):
            raise ValueError(f"CFG branch must be 0 (cond) or 1 (uncond), got {branch}")
        return branch


class _ExpertMeta(BaseModel):
    observers: dict[str, list[str]] = Field(min_length=1)
    bin_edges: BinEdges


class StatsMeta(BaseModel):
    """The schema of the statistics metadata (in the safetensors header): checked before any tensor is read."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    library_version: str = Field(min_length=1)
    model_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    prompt_set_hash: str | None
    settings: dict[str, Any]
    experts: dict[str, _ExpertMeta] = Field(min_length=1)
    prompts_done: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> StatsMeta:
        settings = CalibSettings.model_validate(self.settings)
        for expert, info in self.experts.items():
            if len(info.bin_edges) - 1 != settings.bins:
                raise ValueError(f"{expert}: {len(info.bin_edges) - 1} timestep bins, the settings say {settings.bins}")
        return self


def stats_checksum(header: str, tensors: dict[str, Tensor]) -> str:
    """sha256 of the metadata JSON and the named tensors (layout-independent): a flipped byte changes it."""
    return hashlib.sha256(f"{header}\n{tensors_sha256(tensors)}".encode()).hexdigest()


def read_meta(path: str | Path) -> dict:
    """The metadata stored in the header of a stats file (the header is validated, no tensor is read)."""
    _, metadata = read_header(path)
    header = metadata.get("vidquant")
    if header is None:
        raise ValueError(f"{path}: not a vidquant statistics file (no 'vidquant' metadata in its header)")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable statistics metadata ({err})") from None
    try:
        StatsMeta.model_validate(meta)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid statistics metadata: {describe(err)}") from None
    return meta


def load_stats(path: str | Path, device: str | torch.device = "cpu") -> CalibStats:
    """Load statistics written by `CalibStats.save` (a directory or its stats.safetensors)."""
    path = Path(path)
    file = path / STATS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no {STATS_FILE} here; run `vidquant calibrate --out {path}` first")
    meta = read_meta(file)
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{file}: statistics format version {meta.get('format_version')} is not one this vidquant reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}); recalibrate with this vidquant"
        )
    try:
        prefixes = tuple(f"{expert}/{name}/" for expert, info in meta["experts"].items() for name in info["observers"])
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{file}: statistics metadata without a valid 'experts' map ({err!r})") from None

    def known(name: str) -> TensorSpec | None:  # tensors of the observers the metadata lists, nothing else
        return TensorSpec() if name.startswith(prefixes) else None

    tensors, metadata = read_safetensors(file, known, device=device, what="calibration statistics")
    if meta["format_version"] >= 2 and metadata.get(CHECKSUM_KEY) != stats_checksum(metadata["vidquant"], tensors):
        raise ValueError(f"{file}: checksum differs from the one written with the statistics (corrupted or edited); "
                         "calibrate again")
    try:
        n_tails = 1 if meta["settings"]["tail_keys"] == "total" else meta["settings"]["bins"] * len(BRANCHES)
        inputs = {
            expert: {
                name: InputStats.from_tensors(layers, f"{expert}/{name}", tensors, n_tails)
                for name, layers in info["observers"].items()
            }
            for expert, info in meta["experts"].items()
        }
    except (KeyError, TypeError) as err:
        raise ValueError(f"{file}: statistics metadata and tensors do not match ({err!r})") from None
    return CalibStats(inputs, meta)
