"""Ablations as one command: a grid of recipe and calibration settings, run with shared artifacts, one report.

A grid file (YAML, read by `safeyaml`, validated by pydantic: an unknown key is an error naming it) says what
varies from a base recipe::

    base_recipe: tail-aware-hif4        # default for --base-recipe
    model: tiny                          # default for --model
    set: {max_protected_blocks: null}    # applied to every cell
    grid:                                # the product of the axes, one cell per combination
      smoothing.percentile: [99, 99.9, 99.99]
      calib.num_prompts: [4, 8]
    cells:                               # and/or named cells, each a set of changes
      max: {smoothing.statistic: max}

A key is a dotted path into the recipe as its YAML spells it (``smoothing.alpha``, ``protect_blocks``,
``weights``, ``svdquant-gptq.lowrank.rank``) or a calibration setting (``calib.num_prompts``, ``calib.bins``,
``calib.tail_keys``). Every cell's recipe is validated, and its layer plan checked against the model (block
indices, the protection budget), before any long work; errors name the cell.

Layout of ``--out`` (one lock; every artifact reused when its inputs are unchanged, as `job.run` does, so an
interrupted sweep resumes where it stopped)::

    grid.json                 the resolved cells (recipe and calibration settings of each)
    stats/<calib-key>/        one calibration per distinct calibration setting
    videos/bf16/              one set of BF16 videos for every cell
    cells/<cell>/state/       the cell's PTQ state (reused: same recipe, statistics and base model)
    cells/<cell>/videos/      its quantized videos (reused: same source and protocol)
    cells/<cell>/sqnr.json    per-layer SQNR on held-out inputs (reused: same state and prompts)
    cells/<cell>/report/      evaluation.json (reused: same video folders) and the cell's own report.html
    report/sweep.html         the comparison (+ sweep.json, sweep.csv, sweep_categories.csv)

Cell and calibration folder names are made here from sanitized text ([A-Za-z0-9._+-], at most 80 bytes), never
taken as paths from the grid file, so nothing is written outside ``--out``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import dist
from .atomic import atomic_path
from .calib.calibrate import CalibSettings, calibrate
from .calib.prompts import categorize, prompt_set_hash
from .calib.stats import CalibStats
from .eval.evaluate import EVALUATION, Evaluation, evaluate, load_evaluation, report
from .eval.fidelity import state_fidelity
from .eval.generate import folder_info, generate, load_records
from .eval.protocol import Protocol
from .eval.sweep_report import CellResult, write_sweep_report
from .eval.vbench import check_vbench_paths, vbench_status
from .job import _check_writable, state_in
from .models import adapter_for
from .outputs import check_output, locked_output_ranks
from .progress import progress_bar
from .ptq import method_class
from .recipes import Recipe, plan
from .safeyaml import bundled_names, load_named_mapping
from .state import PTQState
from .validation import describe

logger = logging.getLogger(__name__)

SWEEP_OWNED = ("grid.json", "stats", "videos", "cells", "report", "vbench")  # what a sweep folder may hold
CELL_OWNED = ("cell.json", "state", "videos", "report", "vbench", "sqnr.json")
CALIB_KEYS = ("num_prompts", "bins", "tail_keys")  # calib.<key>: the calibration settings a grid may vary
MAX_CELLS = 256  # a typo in an axis must not start a thousand-cell product
MAX_NAME_BYTES = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_GRIDS = resources.files("vidquant.recipes") / "grids"


class GridSpec(BaseModel):
    """The schema of a grid file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str = ""
    model: str | None = None  # default for --model
    base_recipe: str | None = None  # default for --base-recipe
    common: dict[str, Any] = Field(default_factory=dict, alias="set")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"axis '{key}' has no values")
            texts = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(texts)) != len(texts):
                raise ValueError(f"axis '{key}' repeats a value: {values}")
        return grid


@dataclass
class Cell:
    """One configuration of the sweep: its changes to the base recipe and calibration, resolved and validated."""

    name: str
    changes: dict[str, Any]
    recipe: Recipe
    calib: CalibSettings
    calib_key: str | None  # None: the recipe needs no statistics

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changes": self.changes, "recipe": self.recipe.to_dict(),
                "calib": self.calib.model_dump(mode="json"), "calib_key": self.calib_key}


@dataclass
class Sweep:
    """What `run_sweep` needs besides the model: the cells, prompts, protocol and where to write."""

    cells: list[Cell]
    calib_prompts: list[str]  # the pool: a cell calibrates on its first calib.num_prompts
    eval_prompts: list[str]
    protocol: Protocol
    out: Path
    model: str = "tiny"
    base_recipe: str = ""
    grid_name: str = ""
    vbench: bool = True
    fidelity_prompts: int = 1  # held-out evaluation prompts whose layer inputs score per-layer SQNR (0: skip)
    categories: dict[str, str] = field(default_factory=dict)  # prompt -> category (see calib.prompts)
    cell_reports: bool = True  # each cell's own report.html (frames, per-layer SQNR, tails), linked from the table


# ---------------------------------------------------------------- grid files


def grid_names() -> list[str]:
    """The bundled grids (``recipes/grids/*.yaml``), by name."""
    return bundled_names(_GRIDS)


def load_grid(name_or_path: str | Path) -> GridSpec:
    """A bundled grid by name or a user's YAML file, validated; errors name the file and the key."""
    data, source, _ = load_named_mapping(name_or_path, _GRIDS, "grid")
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: invalid grid: {describe(err, limit=10)}") from None
    return spec


def resolve_cells(spec: GridSpec, base: Recipe, calib: CalibSettings, calib_prompts: list[str]) -> list[Cell]:
    """The grid's cells (the product of ``grid`` axes, then the named ``cells``), each validated.

    ``calib`` is the default calibration; ``calib_prompts`` the pool a cell's calibration takes its first
    prompts from. ValueError naming the key (unknown) or the cell (an invalid recipe or setting).
    """
    base_dict = base.to_dict()
    keys = [*spec.common, *spec.grid, *(k for changes in spec.cells.values() for k in changes)]
    for key in dict.fromkeys(keys):
        _check_key(key, base_dict, base)
    raw: list[tuple[str, dict[str, Any]]] = []
    if spec.grid:
        axes = list(spec.grid)
        labels = _axis_labels(axes)
        combos = list(itertools.product(*spec.grid.values()))
        if len(combos) + len(spec.cells) > MAX_CELLS:
            raise ValueError(f"the grid has {len(combos) + len(spec.cells)} cells, more than {MAX_CELLS}")
        for combo in combos:
            name = "__".join(f"{labels[k]}-{_value_text(v)}" for k, v in zip(axes, combo, strict=True))
            raw.append((name, dict(zip(axes, combo, strict=True))))
    raw += [(name, dict(changes)) for name, changes in spec.cells.items()]
    if not raw:
        raise ValueError("the grid has no cells: give `grid:` axes and/or named `cells:`")
    if len(raw) > MAX_CELLS:
        raise ValueError(f"the grid has {len(raw)} cells, more than {MAX_CELLS}")
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    configs: dict[str, str] = {}
    for given, changes in raw:
        name = cell_name(given)
        if name in seen:
            raise ValueError(f"cells '{seen[name]}' and '{given}' get the same folder name '{name}'; rename one")
        seen[name] = given
        cell = _cell(name, {**spec.common, **changes}, base_dict, calib, calib_prompts)
        config = json.dumps([cell.recipe.to_dict() | {"name": ""}, cell.calib.model_dump(mode="json")],
                            sort_keys=True)
        if config in configs:
            raise ValueError(f"cells '{configs[config]}' and '{name}' are the same configuration")
        configs[config] = name
        cells.append(cell)
    return cells


def cell_name(text: str) -> str:
    """A folder name from any text: runs of characters outside [A-Za-z0-9._+-] become '_', no leading dot or dash,
    at most 80 bytes (longer names keep a hash of the whole), never empty."""
    name = _UNSAFE.sub("_", str(text)).strip("._-")
    if len(name) > MAX_NAME_BYTES:
        digest = hashlib.sha256(str(text).encode()).hexdigest()[:8]
        name = name[: MAX_NAME_BYTES - 9].rstrip("._-") + "-" + digest
    return name or "cell"


def _check_key(key: str, base_dict: dict[str, Any], base: Recipe) -> None:
    """Refuse a key that names no recipe field nor calibration setting (a typo must not be a silent no-op)."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ValueError(f"key '{key}': an empty part in a dotted key")
    if parts[0] == "calib":
        if len(parts) != 2 or parts[1] not in CALIB_KEYS:
            raise ValueError(f"unknown key '{key}': calibration keys are {', '.join('calib.' + k for k in CALIB_KEYS)}")
        return
    if parts[0] == "name":
        raise ValueError("key 'name': each cell is named by the grid, not by its recipe")
    if parts[0] not in base_dict:
        from .ptq.registry import method_names

        if parts[0] in method_names():  # another method's section: its schema judges it once `method` changes
            return
        if parts[0] in Recipe.model_fields and parts[0] != "options":  # a field the base leaves unused (rotation,
            return  # auto_stand_out): the cell's recipe is validated whole before any work
        fields = [k for k in Recipe.model_fields if k not in ("name", "options")]
        raise ValueError(f"unknown key '{key}': recipe '{base.name}' has no field '{parts[0]}' (fields: "
                         f"{', '.join(fields)}; calibration: calib.<setting>)")
    node: Any = base_dict
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"unknown key '{key}': '{'.'.join(parts[:i]) or base.name}' has no field '{part}'")
        node = node[part]


def _axis_labels(axes: list[str]) -> dict[str, str]:
    """Each axis's label in cell names: its last dotted part, or the whole key where two axes share it."""
    last = [k.rsplit(".", 1)[-1] for k in axes]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(axes, last, strict=True)}


def _value_text(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "_".join(_value_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _cell(name: str, changes: dict[str, Any], base_dict: dict[str, Any], calib: CalibSettings,
          calib_prompts: list[str]) -> Cell:
    data = copy.deepcopy(base_dict)
    calib_changes = {}
    for key, value in changes.items():
        parts = key.split(".")
        if parts[0] == "calib":
            calib_changes[parts[1]] = value
            continue
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = copy.deepcopy(value)
    data["name"] = f"{base_dict['name']}@{name}"
    try:
        recipe = Recipe.model_validate(data)
    except (ValidationError, ValueError) as err:
        why = describe(err, limit=10) if isinstance(err, ValidationError) else str(err)
        raise ValueError(f"cell '{name}': invalid recipe: {why}") from None
    try:
        settings = CalibSettings.model_validate({**calib.model_dump(), **calib_changes})
    except ValidationError as err:
        raise ValueError(f"cell '{name}': invalid calibration setting: {describe(err, 'calib')}") from None
    if settings.num_prompts > len(calib_prompts):
        raise ValueError(f"cell '{name}': calib.num_prompts {settings.num_prompts}, but the calibration prompt set "
                         f"has {len(calib_prompts)}")
    key = None
    if method_class(recipe.method)().needs_stats(recipe):
        key = calib_key(settings, calib_prompts[: settings.num_prompts])
    return Cell(name, changes, recipe, settings, key)


def calib_key(settings: CalibSettings, prompts: list[str]) -> str:
    """The folder name of one calibration setting: readable counts, and a hash of everything it depends on."""
    digest = hashlib.sha256(f"{settings.model_dump_json()}\n{prompt_set_hash(prompts)}".encode()).hexdigest()
    tail = "" if settings.tail_keys == "total" else f"-{settings.tail_keys}"
    return cell_name(f"prompts{settings.num_prompts}-bins{settings.bins}{tail}-{digest[:10]}")


def held_out_prompts(pool: list[str], start: int, count: int, categories: dict[str, str] | None = None) -> list[str]:
    """``count`` prompts from ``pool[start:]`` dealt round-robin over their categories (in order of appearance),
    so that a few evaluation prompts still cover several categories of the bundled set."""
    groups: dict[str, list[str]] = {}
    for prompt, category in zip(pool[start:], categorize(pool[start:], categories), strict=True):
        groups.setdefault(category, []).append(prompt)
    dealt = [p for row in itertools.zip_longest(*groups.values()) for p in row if p is not None]
    if len(dealt) < count:
        raise ValueError(f"--num-prompts {count}: only {len(dealt)} prompts are left after the {start} calibration "
                         "prompts; give --prompts or fewer")
    return dealt[:count]


# ---------------------------------------------------------------- the run


class _Models:
    """The BF16 model, loaded again after a state was applied to it (generation applies states in place)."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load, self._model, self._dirty = load, None, False

    def pristine(self) -> Any:
        if self._model is None or self._dirty:
            self._model, self._dirty = None, False
            self._model = self._load()
        return self._model

    def consume(self) -> Any:
        """The pristine model, for a call that changes it."""
        model = self.pristine()
        self._dirty = True
        return model


def check_sweep(model: Any, sweep: Sweep) -> None:
    """Everything checkable before long work: the protocol, each calibration setting, each cell's layer plan."""
    adapter = adapter_for(model)
    adapter.check_protocol(sweep.protocol)
    for cell in sweep.cells:
        try:
            adapter.check_protocol(cell.calib)
            if cell.calib_key is not None:
                adapter.check_calibration(cell.calib)
            plan(adapter, cell.recipe)
        except ValueError as err:
            raise ValueError(f"cell '{cell.name}': {err}") from None
    if sweep.vbench and vbench_status()[0]:
        check_vbench_paths(sweep.out / "videos" / "bf16", sweep.out / "vbench", *(sweep.out / "cells" / c.name / part
                                                            for c in sweep.cells for part in ("videos", "vbench")))


def run_sweep(load: Callable[[], Any], sweep: Sweep, *, progress: bool = True) -> Path:
    """Run every cell (reusing whatever artifact's inputs are unchanged) and return the path of sweep.html.

    ``load`` returns the BF16 model, fresh: it is called again for each cell whose quantized videos are made,
    since applying a state changes the model in place.
    """
    models = _Models(load)
    check_sweep(models.pristine(), sweep)
    with locked_output_ranks(sweep.out, SWEEP_OWNED, "vidquant sweep folder"):
        dist.on_main(lambda: _check_writable(sweep.out))
        dist.on_main(lambda: _write_json(sweep.out / "grid.json", {
            "grid": sweep.grid_name, "model": sweep.model, "base_recipe": sweep.base_recipe,
            "protocol": sweep.protocol.model_dump(mode="json"), "eval_prompts": sweep.eval_prompts,
            "cells": [c.to_dict() for c in sweep.cells]}))
        stats = _calibrations(models, sweep, progress)
        base = next((s.meta["model_fingerprint"] for s in stats.values()), None) or \
            adapter_for(models.pristine()).fingerprint()
        bf16 = sweep.out / "videos" / "bf16"
        generate(models.pristine(), sweep.eval_prompts, sweep.protocol, bf16, model_fingerprint=base,
                 progress=progress, replace_stale=True)
        results = []
        with progress_bar(progress and dist.is_main()) as bar:
            task = bar.add_task("cells", total=len(sweep.cells))
            for cell in sweep.cells:
                logger.info("cell %s: %s", cell.name, cell.changes)
                stat = stats.get(cell.calib_key) if cell.calib_key else None
                results.append(_run_cell(models, sweep, cell, stat, base, bf16, progress))
                bar.advance(task)
        return Path(dist.on_main(lambda: str(write_sweep_report(
            sweep.out / "report", results, title=f"vidquant sweep: {sweep.grid_name}", model=sweep.model,
            base_recipe=sweep.base_recipe, protocol=sweep.protocol.model_dump(mode="json"),
            categories=sweep.categories))))


def _calibrations(models: _Models, sweep: Sweep, progress: bool) -> dict[str, CalibStats]:
    """One calibration per distinct setting the cells need (each resumed or reused by `calibrate` itself)."""
    stats = {}
    for cell in sweep.cells:
        if cell.calib_key is not None and cell.calib_key not in stats:
            prompts = sweep.calib_prompts[: cell.calib.num_prompts]
            stats[cell.calib_key] = calibrate(models.pristine(), prompts, cell.calib,
                                              sweep.out / "stats" / cell.calib_key, progress=progress)
    return stats


def _run_cell(models: _Models, sweep: Sweep, cell: Cell, stats: CalibStats | None, base: str, bf16: Path,
              progress: bool) -> CellResult | None:
    """One cell's state, SQNR, videos and evaluation (reused where current). Under torchrun every rank makes the
    state and its share of the videos; rank 0 alone scores, evaluates and returns the result (others: None)."""
    folder = dist.on_main(lambda: str(_cell_folder(sweep.out / "cells" / cell.name)))
    folder = Path(folder)
    prompts = sweep.calib_prompts[: cell.calib.num_prompts]
    state = state_in(models.pristine(), cell.recipe, stats, folder / "state", prompts)
    sqnr = _sqnr(models, sweep, cell, state, folder / "sqnr.json") if dist.is_main() else []
    videos = folder / "videos"
    source = hashlib.sha256(f"{base}\n{state.fingerprint()}".encode()).hexdigest()  # as `generate` records it
    if all(dist.all_gather(_videos_done(videos, sweep.eval_prompts, sweep.protocol, source))):
        logger.info("cell %s: reusing its %d videos", cell.name, len(sweep.eval_prompts))
    else:
        generate(models.consume(), sweep.eval_prompts, sweep.protocol, videos, state=state, model_fingerprint=base,
                 progress=progress, replace_stale=True)
    if not dist.is_main():
        return None
    report_dir = folder / "report"
    use_vbench = sweep.vbench and vbench_status()[0]
    key = _evaluation_key(bf16, videos, use_vbench)
    record = _read_json(folder / "cell.json")
    evaluation: Evaluation | None = None
    if record.get("evaluation_key") == key and (report_dir / EVALUATION).is_file():
        try:
            evaluation = load_evaluation(report_dir / EVALUATION)
            logger.info("cell %s: reusing its evaluation", cell.name)
        except ValueError as err:
            logger.warning("cell %s: evaluating again (%s)", cell.name, err)
    fresh = evaluation is None
    if evaluation is None:
        evaluation = evaluate(bf16, videos, vbench=sweep.vbench, vbench_out=folder / "vbench",
                              vbench_bf16_out=sweep.out / "vbench" / "bf16")  # the BF16 videos scored once
        report_dir.mkdir(exist_ok=True)
        evaluation.save(report_dir / EVALUATION)
    if sweep.cell_reports and (fresh or not (report_dir / "report.html").is_file()):
        report(evaluation, report_dir, state=state, stats=stats, sqnr=sqnr, model=sweep.model,
               state_path=str(folder / "state"))
    done = {**cell.to_dict(), "state_fingerprint": state.fingerprint(), "evaluation_key": key}
    if json.loads(json.dumps(done, default=str)) != record:  # a finished cell is left as it is
        _write_json(folder / "cell.json", done)
    href = f"../cells/{cell.name}/report/report.html" if (report_dir / "report.html").is_file() else None
    return CellResult(cell.name, cell.changes, cell.recipe.to_dict(), cell.calib_key, evaluation, sqnr, href)


def _cell_folder(path: Path) -> Path:
    """The cell's folder, checked and created (by rank 0 under torchrun: one writer of the shared tree)."""
    folder = check_output(path, CELL_OWNED, "sweep cell folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sqnr(models: _Models, sweep: Sweep, cell: Cell, state: PTQState, path: Path) -> list[dict]:
    """Per-layer SQNR of the cell's state on held-out prompts, reused from ``path`` when made for this state."""
    n = sweep.fidelity_prompts
    if not n:
        return []
    prompts = sweep.eval_prompts[:n]
    key = hashlib.sha256(json.dumps([state.fingerprint(), prompts, cell.calib.model_dump(mode="json")]).encode())
    old = _read_json(path)
    rows = old.get("rows")
    if old.get("key") == key.hexdigest() and isinstance(rows, list) and all(
            isinstance(r, dict) and {"expert", "layer", "sqnr_db"} <= set(r) for r in rows):
        return rows
    rows = state_fidelity(models.pristine(), state, prompts, cell.calib)
    _write_json(path, {"key": key.hexdigest(), "rows": rows})
    return rows


def _videos_done(folder: Path, prompts: list[str], protocol: Protocol, source: str) -> bool:
    """Whether ``folder`` already holds every video of ``prompts`` under ``protocol`` from ``source``."""
    try:
        info = folder_info(folder)
        if info is None or info.source != source or info.fingerprint != protocol.fingerprint():
            return False
        records = {r.index: r for r in load_records(folder)}
    except ValueError:
        return False  # `generate` says what is wrong
    return all(i in records and records[i].prompt == p and records[i].fingerprint == info.fingerprint
               and all(f.is_file() for f in records[i].paths.values()) for i, p in enumerate(prompts))


def _evaluation_key(bf16: Path, quantized: Path, vbench: bool) -> str:
    """What an evaluation depends on: both folders' protocol, source and videos, and whether VBench scored it."""
    parts: list[Any] = [vbench]
    for folder in (bf16, quantized):
        info = folder_info(folder)
        parts.append([None if info is None else [info.fingerprint, info.source],
                      [[r.index, r.prompt, r.seed] for r in load_records(folder)]])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON record of ours, or {} when missing or unreadable (it only decides what to reuse)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=True, default=str))
