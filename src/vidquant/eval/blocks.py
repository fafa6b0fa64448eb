"""Per-block analysis: how each block's activations sit in a format, and what quantizing that block alone costs.

The boundary-protection HiFloat8 paper chose its BF16 blocks (the first two and last three of Wan2.1's 40) from a
per-block activation analysis; this measures the same on any model, on held-out expert calls replayed from
memory (`calib.capture.capture_calls`: the calibration prompts under other seeds), so nothing is generated twice:

- per block and timestep bin, over every input value of the block's target Linears: absmax, p99.9 and median of
  |x| (on a seeded sample), p99.9 / median, kurtosis (exact, from float64 moment sums), the fraction of
  nonzero values outside HiF8's 3-mantissa-bit band [2^-3, 2^4) (HiF8 has no scale, so this is where it loses
  precision; `formats.hif8.FULL_PRECISION_BAND`), above and below it, and the SQNR of the inputs rounded to
  HiF8 (the band weighted by energy: what the fraction alone misses when most values are small but harmless);
- with a PTQ state: the block's quantized Linears' output SQNR on the same inputs, and the block's
  *sensitivity*, the relative error of the expert's output ``sum ||y_b - y||^2 / sum ||y||^2`` when only that
  block is quantized (one replay per block), next to the error with every block quantized.

`block_sensitivity` is what ``protect_blocks: auto`` chooses from (`recipes.select.choose_blocks`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__, formats
from ..atomic import atomic_path
from ..calib.capture import ExpertCall, capture_calls, first_tensor
from ..calib.data import ForwardLoop, calibration_data, is_prompts
from ..calib.settings import CalibSettings
from ..calib.stats import CalibStats
from ..formats.hif8 import FULL_PRECISION_BAND
from ..models import adapter_for, split_name, timestep_bin
from ..nn.parts import StepContext
from ..nn.quant_linear import swap
from ..outputs import locked_output
from ..progress import progress_bar
from ..state import PTQState, quant_linear, verify
from .fidelity import HELD_OUT_SEED_OFFSET

logger = logging.getLogger(__name__)

SAMPLE_PER_CALL = 4096  # |x| values kept per Linear input per call, for the quantiles
SAMPLE_CAP = 1 << 16  # values kept per (block, bin)
CHUNK = 1 << 22  # input values folded into the moment sums at a time (32 MiB in float64)
ANALYSIS = "analysis.json"
ANALYSIS_OWNED = (ANALYSIS, "analysis.csv", "analysis.html")
HIF8 = formats.get("hif8")


@dataclass
class _Moments:
    """Running sums over every input value of a block's Linears in one timestep bin (float64: exact enough)."""

    count: int = 0
    absmax: float = 0.0
    sums: list[float] = field(default_factory=lambda: [0.0] * 4)
    above_band: int = 0
    below_band: int = 0
    hif8_noise: float = 0.0
    sample: list[Tensor] = field(default_factory=list)
    signal: float = 0.0
    noise: float = 0.0

    def add(self, x: Tensor, generator: torch.Generator) -> None:
        """Fold one Linear input in, ``CHUNK`` values at a time: a 75k-token x 13824 input is never copied whole
        to float64 (that alone would be 8 GB); the quantile sample is drawn by index, not by a permutation."""
        flat = x.detach().reshape(-1)
        for start in range(0, len(flat), CHUNK):
            v = flat[start:start + CHUNK].double()
            v = v[torch.isfinite(v)]
            if not len(v):
                continue
            a = v.abs()
            self.count += len(v)
            self.absmax = max(self.absmax, float(a.max()))
            power = torch.ones_like(v)
            for k in range(4):
                power = power * v
                self.sums[k] += float(power.sum())
            lo, hi = FULL_PRECISION_BAND
            self.above_band += int((a >= hi).sum())
            self.below_band += int(((a > 0) & (a < lo)).sum())
            self.hif8_noise += float((HIF8.quantize_dequantize(v.float()).double() - v).square().sum())
        if len(flat):
            pick = torch.randint(len(flat), (min(SAMPLE_PER_CALL, len(flat)),), generator=generator)
            sample = flat[pick.to(flat.device)].detach().float().abs().cpu()
            self.sample.append(sample[torch.isfinite(sample)])

    def row(self, generator: torch.Generator) -> dict[str, float]:
        n = max(self.count, 1)
        mean, m2, m3, m4 = (s / n for s in self.sums)
        var = m2 - mean**2
        central4 = m4 - 4 * mean * m3 + 6 * mean**2 * m2 - 3 * mean**4
        sample = torch.cat(self.sample) if self.sample else torch.zeros(1)
        if len(sample) > SAMPLE_CAP:
            sample = sample[torch.randperm(len(sample), generator=generator)[:SAMPLE_CAP]]
        p999, median = (float(q) for q in torch.quantile(sample, torch.tensor([0.999, 0.5])))
        return {
            "values": self.count,
            "absmax": self.absmax,
            "p99_9": p999,
            "median": median,
            "p99_9_over_median": p999 / median if median > 0 else math.inf,
            "kurtosis": central4 / var**2 if var > 0 else math.nan,
            "out_of_band": (self.above_band + self.below_band) / n,
            "above_band": self.above_band / n,
            "below_band": self.below_band / n,
            "act_hif8_sqnr_db": _db(self.sums[1], self.hif8_noise),
            "layer_sqnr_db": _db(self.signal, self.noise),
        }


def _db(signal: float, noise: float) -> float:
    if signal <= 0:
        return math.nan
    return math.inf if noise <= 0 else 10 * math.log10(signal / noise)


def _edges(state: PTQState | None, expert: str, fallback: list[float]) -> list[float]:
    return (state.timestep_bins.get(expert) if state is not None else None) or fallback


def block_statistics(model: Any, calls: dict[str, list[ExpertCall]], state: PTQState | None = None,
                     bins: dict[str, list[float]] | None = None, seed: int = 0,
                     progress: bool = False) -> list[dict[str, Any]]:
    """One row per (expert, block, timestep bin), and per (expert, block) with ``bin = "all"``: the activation
    statistics of the module docstring and, with ``state``, the quantized Linears' output SQNR."""
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("block statistics", total=sum(len(c) for c in calls.values()))
        for expert, expert_calls in calls.items():
            module = adapter.experts()[expert]
            layers = adapter.target_linears(expert)
            blocks = adapter.block_indices(expert, layers)
            edges = _edges(state, expert, (bins or adapter.bin_edges(1))[expert])
            n_bins = len(edges) - 1
            acc = {(b, k): _Moments() for b in set(blocks) if b is not None for k in range(n_bins)}
            current = [0]
            context = StepContext()
            quantized = _quant_layers(adapter, expert, state, context) if state is not None else {}
            handles = []
            for (name, linear), block in zip(layers.items(), blocks, strict=True):
                if block is not None:
                    handles.append(linear.register_forward_hook(
                        _observer(acc, block, current, quantized.get(name), generator)))
            try:
                with torch.no_grad():
                    for call in expert_calls:
                        current[0] = context.timestep_bin = _bin(call, edges)
                        call.replay(module)
                        bar.advance(task)
            finally:
                for handle in handles:
                    handle.remove()
            for block in sorted({b for b, _ in acc}):
                total = _Moments()
                for k in range(n_bins):
                    m = acc[(block, k)]
                    if m.count:
                        rows.append({"expert": expert, "block": block, "bin": k, **m.row(generator)})
                    _merge(total, m)
                rows.append({"expert": expert, "block": block, "bin": "all", **total.row(generator)})
    return rows


def _merge(into: _Moments, m: _Moments) -> None:
    into.count += m.count
    into.absmax = max(into.absmax, m.absmax)
    into.sums = [a + b for a, b in zip(into.sums, m.sums, strict=True)]
    into.above_band += m.above_band
    into.below_band += m.below_band
    into.hif8_noise += m.hif8_noise
    into.sample += m.sample
    into.signal += m.signal
    into.noise += m.noise


def _observer(acc: dict, block: int, current: list[int], quantized: nn.Module | None, generator: torch.Generator):
    def hook(_module: nn.Module, args: tuple, output: Tensor) -> None:
        m = acc[(block, current[0])]
        m.add(args[0], generator)
        if quantized is not None:
            y = output.double()
            m.signal += float(y.square().sum())
            m.noise += float((quantized(args[0]).double() - y).square().sum())

    return hook


def _bin(call: ExpertCall, edges: list[float]) -> int:
    return 0 if call.info.timestep is None else timestep_bin(call.info.timestep, edges)


def _quant_layers(adapter: Any, expert: str, state: PTQState, context: StepContext,
                  names: set[str] | None = None, runtime: str = "fake") -> dict[str, nn.Module]:
    """The `QuantLinear` of each of ``expert``'s layers in ``state`` (only ``names`` when given), by layer name."""
    out = {}
    for qualified, layer in state.layers.items():
        owner, name = split_name(qualified)
        if owner == expert and (names is None or name in names):
            chosen = runtime if formats.get(layer.weight_format).bits_per_value < 16 else "fake"
            out[name] = quant_linear(adapter.linear(qualified), layer, context, qualified, chosen)
    return out


@contextmanager
def _swapped(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[None]:
    """``layers`` swapped into ``model`` for the block, the original Linears put back after (they are untouched)."""
    originals = {name: swap(model, name, layer) for name, layer in layers.items()}
    try:
        yield
    finally:
        for name, original in originals.items():
            swap(model, name, original)


def block_sensitivity(model: Any, state: PTQState, calls: dict[str, list[ExpertCall]],
                      progress: bool = False) -> dict[str, dict[str, Any]]:
    """Per expert: ``blocks``, the relative output error with only that block quantized (one per block), and
    ``all``, the error with every quantized layer of the state in place; ``bins``: the same per timestep bin.

    Errors are ``sum ||y_q - y||^2 / sum ||y||^2`` over the expert's replayed calls. One block's layers are
    quantized at a time (fake runtime: one block's dense copy); the all-layers pass uses the packed runtime where
    the weight format is below 16 bits, so it holds about what the quantized model holds.
    """
    adapter = adapter_for(model)
    result = {}
    with progress_bar(progress) as bar:
        total = sum(len(c) * (len(adapter.blocks(e)) + 2) for e, c in calls.items())
        task = bar.add_task("block sensitivity", total=total)
        for expert, expert_calls in calls.items():
            result[expert] = _expert_sensitivity(adapter, expert, state, expert_calls, lambda: bar.advance(task))
            logger.info("%s: block sensitivity %s (all blocks: %.3g)", expert,
                        ", ".join(f"{v:.3g}" for v in result[expert]["blocks"]), result[expert]["all"])
    return result


def trajectory_sensitivity(model: Any, state: PTQState, prompts: list[str], settings: CalibSettings,
                           seed_offset: int, candidates: dict[str, list[int]] | None = None,
                           progress: bool = False) -> dict[str, dict[str, Any]]:
    """Per expert: ``blocks``, the relative error of the final latents, ``sum ||z_b - z||^2 / sum ||z||^2`` over
    whole denoising trajectories of ``prompts`` (the calibration protocol ``settings``, seeds
    ``settings.seed_for(seed_offset + i)``), with only that block's layers of ``state`` quantized (NaN for a
    block not in ``candidates``, when given); ``all``: with every layer of the state.

    Why, next to `block_sensitivity`'s one-call error: a block's error also changes the latents every later step
    starts from, and one replayed call cannot see that compounding (on the tiny Wan2.1 the last three blocks are
    not more sensitive than the middle ones one call at a time, yet protecting them matters more end to end).
    Costs one trajectory per prompt per measured block: at full size, measure the candidates a one-call ranking
    leaves (`ptq._auto_protect` does).
    """
    adapter = adapter_for(model)
    experts = adapter.experts()
    contexts = {expert: StepContext() for expert in experts}
    todo = [(e, b) for e in experts for b in range(len(adapter.blocks(e)))
            if candidates is None or b in candidates.get(e, [])]
    model.set_progress_bar_config(disable=True)
    result: dict[str, dict[str, Any]] = {e: {"blocks": [math.nan] * len(adapter.blocks(e)), "prompts": len(prompts),
                                             "steps": settings.steps} for e in experts}
    adapter.publish_bins(state.timestep_bins, lambda expert, b: setattr(contexts[expert], "timestep_bin", b))
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task("trajectory sensitivity", total=len(prompts) * (len(todo) + 2))

            def latents() -> list[Tensor]:
                out = []
                for i, prompt in enumerate(prompts):
                    kwargs = adapter.call_kwargs(settings, prompt, settings.seed_for(seed_offset + i))
                    out.append(first_tensor(model(**kwargs, output_type="latent")).double().cpu())
                    bar.advance(task)
                return out

            def error(quantized: dict[str, dict[str, nn.Module]]) -> float:
                with ExitStack() as stack:
                    for expert, layers in quantized.items():
                        stack.enter_context(_swapped(experts[expert], layers))
                    got = latents()
                num = sum(float((g - r).square().sum()) for g, r in zip(got, reference, strict=True))
                den = sum(float(r.square().sum()) for r in reference)
                return num / den if den > 0 else math.nan

            reference = latents()
            for expert, index in todo:
                layers = list(adapter.target_linears(expert))
                names = {n for n, b in zip(layers, adapter.block_indices(expert, layers), strict=True) if b == index}
                one = _quant_layers(adapter, expert, state, contexts[expert], names)
                result[expert]["blocks"][index] = error({expert: one})
            everything = error({e: _quant_layers(adapter, e, state, contexts[e], runtime="packed") for e in experts})
    finally:
        adapter.publish_bins({}, None)
    for expert in experts:
        result[expert]["all"] = everything
        logger.info("%s: trajectory sensitivity %s (all blocks: %.3g)", expert,
                    ", ".join(f"{v:.3g}" for v in result[expert]["blocks"]), everything)
    return result


def _expert_sensitivity(adapter: Any, expert: str, state: PTQState, calls: list[ExpertCall],
                        advance: Callable[[], None]) -> dict[str, Any]:
    module = adapter.experts()[expert]
    layers = list(adapter.target_linears(expert))
    blocks = adapter.block_indices(expert, layers)
    edges = _edges(state, expert, [0.0, math.inf])
    context = StepContext()
    with torch.no_grad():
        reference = []
        for call in calls:
            reference.append(call.replay(module).double().cpu())
            advance()
        per_block, per_block_bins = [], []
        for index in range(len(adapter.blocks(expert))):
            names = {name for name, b in zip(layers, blocks, strict=True) if b == index}
            quantized = _quant_layers(adapter, expert, state, context, names)
            value, by_bin = _replay_error(module, quantized, calls, reference, context, edges, advance)
            per_block.append(value)
            per_block_bins.append(by_bin)
        quantized = _quant_layers(adapter, expert, state, context, runtime="packed")
        everything, everything_bins = _replay_error(module, quantized, calls, reference, context, edges, advance)
    return {"blocks": per_block, "all": everything, "bins": per_block_bins, "all_bins": everything_bins,
            "calls": len(calls)}


def _replay_error(module: nn.Module, quantized: dict[str, nn.Module], calls: list[ExpertCall],
                  reference: list[Tensor], context: StepContext, edges: list[float],
                  advance: Callable[[], None]) -> tuple[float, list[float]]:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over ``calls`` with ``quantized`` swapped in, overall and per bin."""
    num, den = [0.0] * (len(edges) - 1), [0.0] * (len(edges) - 1)
    with _swapped(module, quantized):
        for call, y in zip(calls, reference, strict=True):
            k = context.timestep_bin = _bin(call, edges)
            num[k] += float((call.replay(module).double().cpu() - y).square().sum())
            den[k] += float(y.square().sum())
            advance()
    per_bin = [n / d if d > 0 else math.nan for n, d in zip(num, den, strict=True)]
    return (sum(num) / sum(den) if sum(den) > 0 else math.nan), per_bin


@dataclass
class Analysis:
    """What `analyze` measured; saved as analysis.json / analysis.csv and rendered as analysis.html."""

    rows: list[dict[str, Any]]
    sensitivity: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def table(self) -> list[dict[str, Any]]:
        """One row per (expert, block) over all bins, with its sensitivity, most sensitive first."""
        out = []
        for row in self.rows:
            if row["bin"] != "all":
                continue
            sens = self.sensitivity.get(row["expert"], {}).get("blocks")
            out.append({**row, "sensitivity": None if sens is None else sens[row["block"]]})
        return sorted(out, key=lambda r: (-(r["sensitivity"] or 0.0), r["expert"], r["block"]))

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"library_version": __version__, **asdict(self)}
        with atomic_path(out / ANALYSIS) as tmp:
            tmp.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False))
        buf = io.StringIO()
        table = self.table()
        if table:
            writer = csv.DictWriter(buf, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        with atomic_path(out / "analysis.csv") as tmp:
            tmp.write_text(buf.getvalue())
        from .blocks_report import render  # matplotlib only when writing

        with atomic_path(out / "analysis.html") as tmp:
            tmp.write_text(render(self))
        return out / "analysis.html"


def _jsonable(value: Any) -> Any:
    """NaN / inf as strings (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def analyze(model: Any, stats: CalibStats, state: PTQState | None = None, *, prompts: list[str] | None = None,
            forward_loop: ForwardLoop | None = None, held_out_prompts: int = 2, max_calls: int = 8,
            out: str | Path | None = None, progress: bool = False) -> Analysis:
    """The per-block analysis stage: held-out calls of the calibration protocol, statistics, and with a state
    the layer SQNR and block sensitivity; written to ``out`` (analysis.json / .csv / .html) when given.

    ``prompts`` / ``forward_loop``: the calibration data of ``stats`` (checked by hash, as quantizing does); the
    first ``held_out_prompts`` prompts are replayed under held-out seeds, a forward loop as it is (then nothing
    is held out).
    """
    adapter = adapter_for(model)
    if stats.meta["model_fingerprint"] != adapter.fingerprint():
        raise ValueError("these statistics were calibrated on another model (weights or dtype differ)")
    if state is not None:
        verify(model, state)  # before any long work
    data, settings = calibration_data(stats, prompts, forward_loop)
    if is_prompts(data):
        data = data[:held_out_prompts]
    else:
        logger.warning("analyzing on the calibration forward loop itself: nothing is held out")
    calls = capture_calls(model, data, settings, max_calls, seed_offset=HELD_OUT_SEED_OFFSET)
    bins = adapter.bin_edges(settings.bins)
    rows = block_statistics(model, calls, state, bins, seed=settings.seed, progress=progress)
    sensitivity = block_sensitivity(model, state, calls, progress) if state is not None else {}
    meta = {
        "model_fingerprint": stats.meta["model_fingerprint"],
        "stats_fingerprint": stats.fingerprint(),
        "recipe": None if state is None else state.recipe,
        "state_fingerprint": None if state is None else state.fingerprint(),
        "calls": {expert: len(c) for expert, c in calls.items()},
        "held_out_seed_offset": HELD_OUT_SEED_OFFSET if is_prompts(data) else None,
        "settings": settings.model_dump(mode="json"),
    }
    analysis = Analysis(rows, sensitivity, meta)
    if out is not None:
        with locked_output(out, ANALYSIS_OWNED, "analysis folder"):
            analysis.save(out)
    return analysis
