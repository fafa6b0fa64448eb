"""The `vidquant` command line (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, dist, formats
from .models import TINY_MODELS, load_model, tiny_sizes

app = typer.Typer(add_completion=False, no_args_is_help=True, help=f"vidquant {__version__}: PTQ for video DiTs")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    log_format = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=log_format)
    dist.quiet_other_ranks(log_format)  # under torchrun: rank 0 logs, the others only warnings


@app.command("formats")
def formats_cmd(long: bool = typer.Option(False, "--long", help="Also print each format's description.")) -> None:
    """Print the table of numeric formats."""
    table = Table(title="vidquant formats (vidquant formats --long adds descriptions)")
    for col in ("name", "bits/value", "block", "element", "scale", "max |value|"):
        table.add_column(col)
    for name in formats.names():
        f = formats.get(name)
        block = "row" if f.block_size is None else str(f.block_size)
        table.add_row(name, f"{f.bits_per_value:g}", block, f.element, f.scale, f"{f.max_value:.6g}")
    console.print(table)
    if long:
        for name in formats.names():
            console.print(f"[bold]{name}[/bold]: {formats.get(name).description}")


FULL_SIZE = {"height": 720, "width": 1280, "frames": 61}  # the papers' protocol
RUN_TINY_SIZE = {"height": 48, "width": 48}  # larger frames for the tiny Wan run's videos (frames and steps: below)
MODEL_HELP = "A diffusers video pipeline directory or hub id (Wan, CogVideoX, LTX-Video), or a tiny model: " + \
    ", ".join(TINY_MODELS) + "."


def _load(model: str, i2v: bool):
    """A tiny model, a quantized export (``export.json``), or a diffusers pipeline of any family."""
    from .export import MANIFEST, load_quantized

    if (Path(model) / MANIFEST).is_file():
        if i2v:
            raise ValueError("--i2v: a quantized export says itself what it is")
        return load_quantized(model)
    return load_model(model, i2v=i2v)


def _fail(message: str) -> NoReturn:
    err_console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)
    raise typer.Exit(2)


def _sizes(model: str, height: int | None, width: int | None, frames: int | None, run: bool = False) -> dict:
    """The frame size and count: what was given, else the tiny model's or the papers' defaults (0 is refused)."""
    defaults = tiny_sizes(model) or FULL_SIZE
    if run and model == "tiny":
        defaults = {**defaults, **RUN_TINY_SIZE}
    given = {"height": height, "width": width, "frames": frames}
    for key, value in given.items():
        if value is not None and value < 1:
            raise ValueError(f"--{key} must be at least 1, got {value}")
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def _protocol(model: str, steps: int | None, height: int | None, width: int | None, frames: int | None, cfg: float,
              seed: int, run: bool = False):
    """The generation protocol of `run`, `sweep` and `route`: the options given, else 40 steps (8 for a tiny model)
    and `_sizes`' frames."""
    from .eval.protocol import Protocol

    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    return Protocol(steps=(8 if model in TINY_MODELS else 40) if steps is None else steps, cfg=cfg, seed=seed,
                    **_sizes(model, height, width, frames, run=run))


@app.command()
def calibrate(
    model: str = typer.Option(..., help=MODEL_HELP),
    out: Path = typer.Option(..., help="Statistics directory (resumed if it exists)."),
    prompts: Path | None = typer.Option(
        None, help="Prompt file (.json OpenS2V 'cap', .jsonl, .txt); default: bundled."
    ),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny'; a directory says what it is)."),
    num_prompts: int = typer.Option(16, min=1),
    steps: int = typer.Option(40, min=1),
    height: int | None = typer.Option(None, help="Default 720 (the tiny model's for a tiny model)."),
    width: int | None = typer.Option(None, help="Default 1280 (the tiny model's for a tiny model)."),
    frames: int | None = typer.Option(None, help="Default 61 (the tiny model's for a tiny model)."),
    cfg: float = typer.Option(3.5, help="Classifier-free guidance scale."),
    seed: int = typer.Option(42, help="Prompt i is generated with seed + i."),
    bins: int = typer.Option(4, min=1, max=64, help="Timestep bins per expert."),
    tail_keys: str = typer.Option("total", help="Tail histograms for 'total' or per 'bin_branch' (x2*bins memory)."),
) -> None:
    """Run the BF16 pipeline on calibration prompts and record activation statistics."""
    from .calib.calibrate import CalibSettings
    from .calib.calibrate import calibrate as run_calibration
    from .calib.prompts import default_prompts, load_prompts

    try:
        settings = CalibSettings(num_prompts=num_prompts, steps=steps, cfg=cfg, seed=seed, bins=bins,
                                 tail_keys=tail_keys, **_sizes(model, height, width, frames))
        prompt_list = load_prompts(prompts) if prompts else default_prompts()
        _enough(prompt_list, num_prompts, "--num-prompts", prompts)
        dist.init_from_env()
        pipe = _load(model, i2v)
        run_calibration(pipe, prompt_list, settings, out)
    except (ValueError, ValidationError) as err:
        _fail(str(err))
    if dist.is_main():
        console.print(f"statistics written to {out}")


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    out: Path = typer.Option(..., help="Directory for the PTQ state (manifest.json + tensors.safetensors)."),
    stats: Path | None = typer.Option(None, help="Statistics from `vidquant calibrate` (needed for smoothing)."),
    recipe: str = typer.Option("tail-aware-hif4", help="A bundled recipe name or a YAML file."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
    prompts: Path | None = typer.Option(
        None, help="svdquant-gptq: the calibration prompts the statistics were made from (default: bundled)."
    ),
    hessian_budget_gb: float = typer.Option(16.0, min=0.001, help="svdquant-gptq: fp32 Hessians held at once."),
) -> None:
    """Turn calibration statistics and a recipe into a compact PTQ state.

    svdquant-gptq runs the pipeline again on the calibration prompts (the statistics' protocol) for each
    layer's Hessian and per-timestep-bin inputs; finished layers are kept in OUT/.partial for a rerun. Under
    torchrun its ranks share the layers (each collects and quantizes its own); other methods run on rank 0.
    """
    from .calib.prompts import load_prompts
    from .calib.stats import load_stats
    from .outputs import locked_output_ranks
    from .ptq import quantize_into
    from .recipes import load_recipe
    from .state import STATE_OWNED

    try:
        the_recipe = load_recipe(recipe)  # bad input fails before anything is created
        calibration = load_stats(stats) if stats else None
        prompt_list = load_prompts(prompts) if prompts else None
        dist.init_from_env()
        with locked_output_ranks(out, STATE_OWNED, "PTQ state"):
            pipe = _load(model, i2v)
            quantize_into(pipe, the_recipe, calibration, out, prompts=prompt_list, hessian_budget_gb=hessian_budget_gb)
    except ValueError as err:
        _fail(str(err))
    if dist.is_main():
        _print_state(out)


@app.command("finetune")
def finetune_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    state: Path = typer.Option(..., help="The PTQ state to fine-tune (from `vidquant quantize`)."),
    out: Path = typer.Option(..., help="Directory for the fine-tuned state (a PTQ state with QAT deltas)."),
    stats: Path = typer.Option(..., help="The statistics the state was made from (their protocol and prompts)."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
    prompts: Path | None = typer.Option(None, help="The calibration prompts of the statistics (default: bundled)."),
    steps: int = typer.Option(200, min=1, help="Optimizer steps (one teacher call each)."),
    lr: float = typer.Option(1e-3, min=0.0, help="AdamW learning rate."),
    rank: int = typer.Option(4, min=1, help="LoRA rank of each quantized Linear's delta."),
    train: str = typer.Option("lora", help="What trains, comma-separated: lora, masks, clips."),
    calls_per_bin: int = typer.Option(4, min=1, help="Teacher calls kept per expert and timestep bin."),
    held_out_prompts: int = typer.Option(2, min=1, help="Calibration prompts replayed under held-out seeds."),
    eval_every: int = typer.Option(25, min=1, help="Steps between held-out evaluations (best one kept)."),
    checkpoint_every: int = typer.Option(50, min=1, help="Steps between checkpoints in OUT/.partial."),
    seed: int = typer.Option(0, help="Seed of the LoRA init and the call order."),
) -> None:
    """Quantization-aware fine-tuning: distil the state against the BF16 teacher's own trajectories (LoRA deltas,
    masks, clips); keeps the PTQ state unchanged when no step beats it on held-out calls. Resumes from OUT/.partial."""
    from pydantic import ValidationError

    from .calib.prompts import load_prompts
    from .calib.stats import load_stats
    from .outputs import locked_output
    from .ptq.finetune import QATSettings, finetune, remove_checkpoint
    from .state import STATE_OWNED, checkpoint_of, load_state
    from .validation import describe

    partial = checkpoint_of(out)
    try:
        try:
            settings = QATSettings(steps=steps, lr=lr, rank=rank, train=tuple(t.strip() for t in train.split(",")),
                                   calls_per_bin=calls_per_bin, held_out_prompts=held_out_prompts,
                                   eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
        except ValidationError as err:
            raise ValueError(f"finetune settings: {describe(err)}") from None
        ptq_state, calibration = load_state(state), load_stats(stats)
        prompt_list = load_prompts(prompts) if prompts else None
        if out.resolve() == state.resolve():
            raise ValueError("--out must differ from --state (the PTQ state is kept as it is)")
        with locked_output(out, STATE_OWNED, "PTQ state"):
            pipe = _load(model, i2v)
            result = finetune(pipe, ptq_state, calibration, settings, prompts=prompt_list, checkpoint_dir=partial,
                              progress=True)
            result.save(out)
            remove_checkpoint(partial)
    except ValueError as err:
        _fail(str(err))
    _print_state(out)
    loss = result.qat["loss"]
    console.print(f"QAT ({result.qat['kept']} kept): held-out loss {loss['held_out_before']:.4g} -> "
                  f"{loss['held_out_after']:.4g}, train {loss['train_before']:.4g} -> {loss['train_after']:.4g}")


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    stats: Path = typer.Option(..., help="Statistics from `vidquant calibrate` (their protocol is replayed)."),
    out: Path = typer.Option(..., help="Folder for analysis.json, analysis.csv and analysis.html."),
    recipe: str | None = typer.Option(None, help="Also quantize under this recipe: layer SQNR and block sensitivity."),
    state: Path | None = typer.Option(None, help="Or an existing PTQ state of this model (instead of --recipe)."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with a tiny model)."),
    prompts: Path | None = typer.Option(None, help="The calibration prompts of the statistics (default: bundled)."),
    held_out_prompts: int = typer.Option(2, min=1, help="Calibration prompts replayed under held-out seeds."),
    max_calls: int = typer.Option(8, min=1, help="Expert calls kept per expert (each replayed once per block)."),
) -> None:
    """Per-block analysis: activation statistics per block and timestep bin, and with a recipe or state each
    block's sensitivity (the expert's output error when only that block is quantized), most sensitive first."""
    from .calib.prompts import load_prompts
    from .calib.stats import load_stats
    from .eval.blocks import analyze
    from .ptq import quantize
    from .recipes import load_recipe
    from .state import load_state

    try:
        if recipe is not None and state is not None:
            raise ValueError("give --recipe or --state, not both")
        the_recipe = None if recipe is None else load_recipe(recipe)
        calibration = load_stats(stats)
        prompt_list = load_prompts(prompts) if prompts else None
        the_state = None if state is None else load_state(state)
        pipe = _load(model, i2v)
        if the_recipe is not None:
            the_state = quantize(pipe, the_recipe, calibration, progress=True, prompts=prompt_list)
        result = analyze(pipe, calibration, the_state, prompts=prompt_list, held_out_prompts=held_out_prompts,
                         max_calls=max_calls, out=out, progress=True)
    except ValueError as err:
        _fail(str(err))
    table = Table(title=f"blocks, most sensitive first ({out / 'analysis.html'})")
    for col in ("expert", "block", "sensitivity", "layer SQNR dB", "inputs in HiF8 dB", "p99.9/median"):
        table.add_column(col)
    for r in result.table():
        table.add_row(str(r["expert"]), str(r["block"]), "-" if r["sensitivity"] is None else f"{r['sensitivity']:.3g}",
                      f"{r['layer_sqnr_db']:.1f}", f"{r['act_hif8_sqnr_db']:.1f}", f"{r['p99_9_over_median']:.3g}")
    console.print(table)


@app.command("apply")
def apply_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    state: Path = typer.Option(..., help="A PTQ state directory."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
) -> None:
    """Check that a state applies to a base model, apply it, and print what it changes (layers, weight bytes)."""
    from .eval.probes import weight_bytes
    from .state import apply, load_state

    try:
        the_state = load_state(state)
        pipe = _load(model, i2v)
        before = weight_bytes(pipe)
        apply(pipe, the_state)
        after = weight_bytes(pipe)
    except ValueError as err:
        _fail(str(err))
    console.print(f"{state} applies to {model}: {len(the_state.layers)} Linears quantized; transformer weights "
                  f"{before.bf16 / 2**20:.2f} MiB at BF16 -> {after.stored / 2**20:.2f} MiB as stored "
                  f"({100 * after.stored / before.bf16:.1f} %)")


@app.command("export")
def export_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    state: Path = typer.Option(..., help="A PTQ state directory."),
    out: Path = typer.Option(..., help="Folder for the self-contained quantized checkpoint."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
) -> None:
    """Write a self-contained quantized checkpoint (packed weights, no BF16 base needed to load it)."""
    from .export import export
    from .state import load_state

    try:
        the_state = load_state(state)
        export(_load(model, i2v), the_state, out)
    except ValueError as err:
        _fail(str(err))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(f"quantized checkpoint written to {out} ({total / 2**20:.2f} MiB); load it with "
                  f"`vidquant.load_quantized('{out}')` or `--model {out}`")


@app.command("generate")
def generate_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    out: Path = typer.Option(..., help="Video folder ({prompt}-{i}.mp4, exact frames, latents, sidecars)."),
    state: Path | None = typer.Option(None, help="A PTQ state to apply first (none: the BF16 model)."),
    prompts: Path | None = typer.Option(None, help="Prompt file; default: bundled."),
    num_prompts: int = typer.Option(8, min=1),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
    steps: int = typer.Option(40, min=1),
    height: int | None = typer.Option(None, help="Default 720 (the tiny model's for a tiny model)."),
    width: int | None = typer.Option(None, help="Default 1280 (the tiny model's for a tiny model)."),
    frames: int | None = typer.Option(None, help="Default 61 (the tiny model's for a tiny model)."),
    cfg: float = typer.Option(3.5),
    seed: int = typer.Option(42, help="Prompt i is generated with seed + i."),
) -> None:
    """Generate videos of a base model, or of the base model with a state applied, under one protocol (resumable)."""
    from .calib.prompts import default_prompts, load_prompts
    from .eval.generate import generate
    from .eval.protocol import Protocol
    from .state import load_state

    try:
        protocol = Protocol(steps=steps, cfg=cfg, seed=seed, **_sizes(model, height, width, frames))
        prompt_list = load_prompts(prompts) if prompts else default_prompts()
        _enough(prompt_list, num_prompts, "--num-prompts", prompts)
        the_state = load_state(state) if state else None
        dist.init_from_env()  # under torchrun the prompts are dealt across ranks
        pipe = _load(model, i2v)
        records = generate(pipe, prompt_list[:num_prompts], protocol, out, state=the_state)
    except (ValueError, ValidationError) as err:
        _fail(str(err))
    if dist.is_main():
        console.print(f"{len(records)} videos in {out}")


@app.command("evaluate")
def evaluate_cmd(
    bf16: Path = typer.Option(..., help="Folder of the BF16 videos (`vidquant generate` without a state)."),
    quantized: Path = typer.Option(..., help="Folder of the quantized videos (same prompts and protocol)."),
    out: Path = typer.Option(..., help="Where to write evaluation.json."),
    vbench: bool = typer.Option(False, help="Also score VBench's five dimensions (when it is installed)."),
) -> None:
    """Compare two video folders: fidelity to BF16, temporal scores, costs (and VBench) -> evaluation.json."""
    from .eval.evaluate import EVALUATION, REPORT_OWNED, evaluate
    from .outputs import check_output

    try:
        check_output(out, REPORT_OWNED, "report folder").mkdir(parents=True, exist_ok=True)
        path = evaluate(bf16, quantized, vbench=vbench, vbench_out=out / "vbench").save(out / EVALUATION)
    except (ValueError, OSError) as err:
        _fail(str(err))
    console.print(f"evaluation written to {path}")


@app.command("report")
def report_cmd(
    evaluation: Path = typer.Option(..., help="evaluation.json from `vidquant evaluate`."),
    out: Path = typer.Option(..., help="Folder for report.html and metrics.json."),
    state: Path | None = typer.Option(None, help="The PTQ state of the quantized videos (recipe, fingerprints)."),
    stats: Path | None = typer.Option(None, help="Calibration statistics (the activation-tail panel)."),
) -> None:
    """Write the HTML report (and metrics.json) of an evaluation."""
    from .calib.stats import load_stats
    from .eval.evaluate import load_evaluation, report
    from .state import load_state

    try:
        page = report(load_evaluation(evaluation), out, state=load_state(state) if state else None,
                      stats=load_stats(stats) if stats else None, state_path=str(state) if state else None)
    except (ValueError, OSError) as err:
        _fail(str(err))
    console.print(f"report: {page}")


def _enough(prompts: list[str], wanted: int, option: str, source: Path | None) -> None:
    if wanted > len(prompts):
        where = source or "the bundled prompt set"
        raise ValueError(f"{option} {wanted}: {where} has only {len(prompts)} prompts")


def _print_state(path: Path) -> None:
    from .recipes import Recipe
    from .state import load_state

    state = load_state(path)
    plan, recipe = state.plan, Recipe.model_validate(state.recipe)  # the manifest's recipe is validated on load
    size, base = state.nbytes(), state.base["transformer_bf16_bytes"]
    console.print(f"[bold]{path}[/bold]: PTQ state, vidquant {state.library_version}, recipe '{recipe.name}' "
                  f"(method {recipe.method}, W {recipe.weights}, A {recipe.activations}, "
                  f"smoothing {recipe.smoothing.statistic})")
    table = Table(title="layers per expert")
    for col in ("expert", "quantized", "protected", "boundary (BF16)", "protected blocks"):
        table.add_column(col)
    for expert, counts in plan.get("counts", {}).items():
        blocks = ", ".join(map(str, plan.get("protected_blocks", {}).get(expert, []))) or "-"
        table.add_row(expert, str(counts["quantized"]), str(counts["protected"]), str(counts["boundary"]), blocks)
    console.print(table)
    console.print(f"state tensors {size / 2**20:.3f} MiB = {100 * size / base:.4f} % of the BF16 transformer "
                  f"weights ({base / 2**30:.3f} GiB)")
    if chosen := {name: layer.info["gptq"] for name, layer in state.layers.items() if "gptq" in layer.info}:
        kept = sum(not str(choice).startswith("rtn") for choice in chosen.values())
        console.print(f"GPTQ kept on {kept} of {len(chosen)} layers by held-out error, RTN on the others")
    if warned := {name: layer.info["warning"] for name, layer in state.layers.items() if "warning" in layer.info}:
        console.print(f"[yellow]{len(warned)} layers warned at quantization:[/yellow]")
        for name, warning in list(warned.items())[:20]:
            console.print(f"  {name}: {warning}")
        if len(warned) > 20:
            console.print(f"  ... and {len(warned) - 20} more (the manifest's layer info lists them all)")


@app.command("inspect")
def inspect_cmd(path: Path = typer.Argument(..., help="A statistics or PTQ state directory.")) -> None:
    """Print a readable summary of a statistics or PTQ state directory."""
    from .calib.stats import load_stats
    from .eval.tails import tail_rows

    if (path / "manifest.json").is_file():
        try:
            _print_state(path)
        except ValueError as err:
            _fail(str(err))
        return
    try:
        stats = load_stats(path)
    except ValueError as err:
        _fail(str(err))
    meta = stats.meta
    console.print(
        f"[bold]{path}[/bold]: vidquant {meta['library_version']}, {meta['model_class']}, "
        f"{meta['prompts_done']} prompts, settings {meta['settings']}"
    )
    table = Table(title="worst tails: max |x| / p99.9 per layer input (top 10)")
    for col in ("expert", "layers", "tokens", "NaN/Inf", "max", "p99.9", "ratio"):
        table.add_column(col)
    for expert in stats.experts():
        console.print(
            f"{expert}: {len(stats.layers(expert))} target Linears, {len(stats.inputs[expert])} distinct inputs"
        )
    for row in tail_rows(stats)[:10]:
        obs = stats.inputs[row.expert][row.observer]
        table.add_row(row.expert, ",".join(obs.layers), str(int(obs.tokens.sum())), str(obs.nonfinite),
                      f"{row.absmax.max().item():.4g}", f"{row.percentile.max().item():.4g}", f"{row.ratio:.1f}")
    console.print(table)


@app.command("run")
def run_cmd(
    out: Path = typer.Option(..., help="Output folder: stats/, state/, videos/, report/ (each stage reused)."),
    model: str = typer.Option("tiny", help=MODEL_HELP),
    recipe: str = typer.Option("tail-aware-hif4", help="A bundled recipe name or a YAML file."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
    prompts: Path | None = typer.Option(None, help="Evaluation prompts (default: bundled, disjoint from calibration)."),
    calib_prompts: Path | None = typer.Option(None, help="Calibration prompts (default: bundled)."),
    num_prompts: int = typer.Option(8, min=1, help="Evaluation prompts to generate."),
    num_calib_prompts: int = typer.Option(8, min=1, help="Calibration prompts."),
    steps: int | None = typer.Option(None, help="Default 40 (8 for a tiny model)."),
    height: int | None = typer.Option(None, help="Default 720 (a tiny model's own otherwise)."),
    width: int | None = typer.Option(None, help="Default 1280 (a tiny model's own otherwise)."),
    frames: int | None = typer.Option(None, help="Default 61 (a tiny model's own otherwise)."),
    cfg: float = typer.Option(3.5),
    seed: int = typer.Option(42),
    bins: int = typer.Option(4, min=1, max=64, help="Timestep bins per expert for the statistics."),
    vbench: bool = typer.Option(True, help="Score VBench's five dimensions when VBench is installed."),
    fidelity_prompts: int = typer.Option(1, min=0, help="Held-out prompts for the per-layer SQNR plot (0: skip)."),
) -> None:
    """Calibrate, quantize, generate BF16 and quantized videos, evaluate and write report.html."""
    from .calib.calibrate import CalibSettings
    from .calib.prompts import default_prompts, load_prompts
    from .job import Job, run
    from .recipes import load_recipe

    try:
        protocol = _protocol(model, steps, height, width, frames, cfg, seed, run=True)
        bundled = default_prompts()
        calib_all = load_prompts(calib_prompts) if calib_prompts else bundled
        _enough(calib_all, num_calib_prompts, "--num-calib-prompts", calib_prompts)
        calib = calib_all[:num_calib_prompts]
        evaluation = load_prompts(prompts) if prompts else bundled[len(calib):]
        _enough(evaluation, num_prompts, "--num-prompts", prompts or Path("the bundled prompts left after calibration"))
        settings = CalibSettings(**protocol.model_dump(), num_prompts=len(calib), bins=bins)
        job = Job(load_recipe(recipe), calib, evaluation[:num_prompts], protocol, settings, out, model, vbench,
                  fidelity_prompts)
        dist.init_from_env()
        report = run(_load(model, i2v), job)
    except (ValueError, ValidationError) as err:
        _fail(str(err))
    if dist.is_main():
        console.print(f"report: {report}")


@app.command("sweep")
def sweep_cmd(
    grid: str | None = typer.Option(None, help="A bundled grid name (--list-grids) or a grid YAML file."),
    out: Path | None = typer.Option(None, help="Sweep folder: stats/, videos/bf16/, cells/<cell>/, report/."),
    model: str | None = typer.Option(None, help=MODEL_HELP + " Default: the grid's model, else tiny."),
    base_recipe: str | None = typer.Option(None, help="A bundled recipe or YAML file (default: the grid's)."),
    list_grids: bool = typer.Option(False, "--list-grids", help="Print the bundled grids and exit."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
    prompts: Path | None = typer.Option(None, help="Evaluation prompts (default: bundled, held out from every "
                                        "cell's calibration, dealt across the prompt categories)."),
    calib_prompts: Path | None = typer.Option(None, help="Calibration prompts (default: bundled)."),
    num_prompts: int = typer.Option(8, min=1, help="Evaluation prompts to generate (shared by every cell)."),
    num_calib_prompts: int = typer.Option(8, min=1,
                                          help="Calibration prompts (unless the grid sets calib.num_prompts)."),
    steps: int | None = typer.Option(None, help="Default 40 (8 for a tiny model)."),
    height: int | None = typer.Option(None, help="Default 720 (a tiny model's own otherwise)."),
    width: int | None = typer.Option(None, help="Default 1280 (a tiny model's own otherwise)."),
    frames: int | None = typer.Option(None, help="Default 61 (a tiny model's own otherwise)."),
    cfg: float = typer.Option(3.5),
    seed: int = typer.Option(42),
    bins: int = typer.Option(4, min=1, max=64, help="Timestep bins per expert, unless the grid sets calib.bins."),
    vbench: bool = typer.Option(True, help="Score VBench's five dimensions when VBench is installed."),
    fidelity_prompts: int = typer.Option(1, min=0, help="Held-out prompts for per-layer SQNR per cell (0: skip)."),
    cell_reports: bool = typer.Option(True, help="Write each cell's own report.html too (linked from the table)."),
) -> None:
    """Run a grid of recipe and calibration settings with shared artifacts; write one comparison report."""
    from .sweep import grid_names, load_grid

    if list_grids:
        for name in grid_names():
            spec = load_grid(name)
            console.print(f"[bold]{name}[/bold] (model {spec.model or '-'}, base recipe {spec.base_recipe or '-'}): "
                          f"{spec.description}")
        return
    try:
        if grid is None or out is None:
            raise ValueError("give --grid and --out (or --list-grids)")
        report = _sweep(load_grid(grid), grid, out, model, base_recipe, i2v, prompts, calib_prompts, num_prompts,
                        num_calib_prompts, steps, height, width, frames, cfg, seed, bins, vbench, fidelity_prompts,
                        cell_reports)
    except (ValueError, ValidationError) as err:
        _fail(str(err))
    if dist.is_main():
        console.print(f"sweep report: {report}")


def _sweep(spec, grid: str, out: Path, model: str | None, base_recipe: str | None, i2v: bool, prompts: Path | None,
           calib_prompts: Path | None, num_prompts: int, num_calib_prompts: int, steps: int | None,
           height: int | None, width: int | None, frames: int | None, cfg: float, seed: int, bins: int,
           vbench: bool, fidelity_prompts: int, cell_reports: bool) -> Path:
    """Resolve the sweep's inputs (everything checked before the model is loaded) and run it."""
    from .calib.calibrate import CalibSettings
    from .calib.prompts import default_prompts, load_prompts, prompt_categories
    from .recipes import load_recipe
    from .sweep import Sweep, held_out_prompts, resolve_cells, run_sweep

    model = model or spec.model or "tiny"
    recipe = base_recipe or spec.base_recipe
    if recipe is None:
        raise ValueError(f"--base-recipe: the grid '{grid}' names no base recipe; give one")
    protocol = _protocol(model, steps, height, width, frames, cfg, seed, run=True)
    bundled = default_prompts()
    calib_all = load_prompts(calib_prompts) if calib_prompts else bundled
    _enough(calib_all, num_calib_prompts, "--num-calib-prompts", calib_prompts)
    settings = CalibSettings(**protocol.model_dump(), num_prompts=num_calib_prompts, bins=bins)
    cells = resolve_cells(spec, load_recipe(recipe), settings, calib_all)
    categories = prompt_categories()
    for source in (calib_prompts, prompts):
        if source is not None:
            categories.update(prompt_categories(source))
    if prompts:
        evaluation = load_prompts(prompts)
        _enough(evaluation, num_prompts, "--num-prompts", prompts)
        evaluation = evaluation[:num_prompts]
    else:
        start = max(c.calib.num_prompts for c in cells) if calib_prompts is None else 0
        evaluation = held_out_prompts(bundled, start, num_prompts, categories)
    sweep = Sweep(cells, calib_all, evaluation, protocol, out, model, recipe, spec.name or grid, vbench,
                  fidelity_prompts, categories, cell_reports)
    dist.init_from_env()
    return run_sweep(lambda: _load(model, i2v), sweep)


@app.command("route")
def route_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    policy: str = typer.Option(..., help="A routing policy: a bundled name (route/policies) or a YAML file."),
    out: Path = typer.Option(..., help="Routing folder: precisions/<rung>/, videos/ (accepted), route.html/json."),
    prompts: Path | None = typer.Option(None, help="Prompts to route (default: bundled, after the calibration ones)."),
    num_prompts: int = typer.Option(8, min=1),
    state: list[str] = typer.Option([], help="NAME=DIR: the state folder of a policy precision (repeatable)."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Draft identity threshold (overrides)."),
    gate_calibration: Path | None = typer.Option(None, help="A gate-calibration.json to take the threshold from."),
    calibrate_gate: bool = typer.Option(False, "--calibrate-gate",
                                        help="Fit the threshold on calibration prompts vs BF16 (OUT/calibration)."),
    calib_prompts: Path | None = typer.Option(None, help="Calibration prompts (default: bundled)."),
    num_calib_prompts: int = typer.Option(8, min=1),
    gate_rules: Path | None = typer.Option(None, help="Prompt-gate rules YAML (default: the policy's, else bundled)."),
    compare: bool = typer.Option(False, "--compare", help="Also all-BF16 and all-draft videos: quality, gate recall."),
    i2v: bool = typer.Option(False, "--i2v", help="Image-to-video (with 'tiny')."),
    steps: int | None = typer.Option(None, help="Default 40 (8 for a tiny model)."),
    height: int | None = typer.Option(None, help="Default 720 (the tiny model's for a tiny model)."),
    width: int | None = typer.Option(None, help="Default 1280 (the tiny model's for a tiny model)."),
    frames: int | None = typer.Option(None, help="Default 61 (the tiny model's for a tiny model)."),
    cfg: float = typer.Option(3.5),
    seed: int = typer.Option(42, help="Prompt i is generated with seed + i at every rung."),
) -> None:
    """Route prompts through one model at several precisions: prompt gate, draft, identity gate, escalation.

    Writes every rung's videos (resumable), the accepted video of each prompt in OUT/videos and the routing
    report (per prompt the path and why; fallback and rejection rates, cost per accepted clip, per category).
    """
    from .calib.prompts import default_prompts, load_prompts, prompt_categories
    from .outputs import locked_output
    from .route.gate import PromptGate
    from .route.policy import load_policy
    from .route.route import ROUTE_OWNED, calibrate_threshold, check_signal, load_threshold, route_prompts
    from .route.switch import RoutedModel

    try:
        protocol = _protocol(model, steps, height, width, frames, cfg, seed)
        if sum(x is not None for x in (threshold, gate_calibration)) + calibrate_gate > 1:
            raise ValueError("give one of --threshold, --gate-calibration and --calibrate-gate")
        the_policy, base_dir = load_policy(policy)
        check_signal(the_policy)  # a VBench draft gate without VBench: refused before any model is loaded
        overrides = {}
        for item in state:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--state {item!r}: expected NAME=DIR")
            overrides[name] = path
        paths = the_policy.state_paths(base_dir, overrides)
        rules = gate_rules or the_policy.escalation.gate_rules
        if rules is not None and gate_rules is None and base_dir is not None and not Path(rules).is_absolute():
            rules = base_dir / rules
        gate = PromptGate.load(rules)
        bundled = default_prompts()
        calib_all = load_prompts(calib_prompts) if calib_prompts else bundled
        if calibrate_gate:
            _enough(calib_all, num_calib_prompts, "--num-calib-prompts", calib_prompts)
        route_all = load_prompts(prompts) if prompts else bundled[num_calib_prompts:]
        _enough(route_all, num_prompts, "--num-prompts", prompts or Path("the bundled prompts after calibration"))
        categories = prompt_categories()
        if prompts is not None:
            categories.update(prompt_categories(prompts))
        with locked_output(out, ROUTE_OWNED, "routing folder"), RoutedModel.load(_load(model, i2v), paths) as routed:
            chosen = threshold
            if gate_calibration is not None:
                chosen = load_threshold(gate_calibration, routed, the_policy, protocol)
            elif calibrate_gate:
                fitted = calibrate_threshold(routed, the_policy, calib_all[:num_calib_prompts], protocol,
                                             out / "calibration")
                chosen = fitted["threshold"]
                console.print(f"draft gate: threshold {chosen:.4f} on {num_calib_prompts} calibration prompts "
                              f"({fitted['bad']} bad drafts; precision {fitted['precision']}, recall "
                              f"{fitted['recall']}); saved in {out / 'calibration' / 'gate-calibration.json'}")
            elif chosen is None:
                chosen = the_policy.escalation.threshold
            data = route_prompts(routed, the_policy, route_all[:num_prompts], protocol, out, gate=gate,
                                 threshold=chosen, compare=compare, categories=categories)
    except (ValueError, ValidationError) as err:
        _fail(str(err))
    t = data["totals"]
    console.print(f"{t['prompts']} prompts routed: fallback {100 * t['fallback_rate']:.1f} %, "
                  f"{t['seconds_per_accepted_clip']:.3g} s per accepted clip; final rungs {t['final_rungs']}; "
                  f"report: {out / 'route.html'}")


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("out/demo"), help="Output folder.")) -> None:
    """`vidquant run` on the built-in tiny Wan2.2 pipeline with the bundled prompts (a few minutes on a CPU)."""
    run_cmd(out=out, model="tiny", recipe="tail-aware-hif4", i2v=False, prompts=None, calib_prompts=None,
            num_prompts=8, num_calib_prompts=8, steps=None, height=None, width=None, frames=None, cfg=3.5,
            seed=42, bins=2, vbench=True, fidelity_prompts=1)
