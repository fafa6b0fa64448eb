"""The self-contained quantized checkpoint: loads without the BF16 base, generates bit-identically, refuses damage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import vidquant
from vidquant.cli import app
from vidquant.export import export, load_quantized
from vidquant.models import load_pipeline, tiny
from vidquant.nn import QuantLinear

DATA = Path(__file__).parent / "data"


def latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red car with a licence plate", height=32, width=32, num_frames=5, num_inference_steps=3,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent").frames


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny.build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.mark.parametrize("recipe", ["tail-aware-hif4", "svdquant-gptq-hif4"])
def test_an_export_generates_what_the_state_on_its_base_does(base_dir: Path, tmp_path: Path, recipe: str) -> None:
    state = vidquant.load_state(DATA / f"state-v2-{recipe}")  # masks, packed GPTQ residuals, low-rank, bins
    export(load_pipeline(base_dir), state, tmp_path / "q")
    quantized = load_quantized(tmp_path / "q")
    expected = load_file(str(DATA / "state-v2-latents.safetensors"))[recipe]
    assert torch.equal(latents(quantized).float(), expected)
    layers = [m for m in quantized.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 20 and all(m.packed is not None and m.weight is None for m in layers)
    # the quantized weights exist only as packed bytes: the exported experts hold no copy of them
    rest = load_file(str(tmp_path / "q" / "experts" / "transformer.safetensors"))
    assert not any(k.endswith(".weight") and k.startswith("blocks.") and "norm" not in k for k in rest)


def test_a_damaged_export_is_refused_by_name(base_dir: Path, tmp_path: Path) -> None:
    state = vidquant.load_state(DATA / "state-v2-tail-aware-hif4")
    export(load_pipeline(base_dir), state, tmp_path / "q")
    manifest = tmp_path / "q" / "export.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "family": "ltx"}))
    with pytest.raises(ValueError, match="manifest_sha256"):
        load_quantized(tmp_path / "q")
    manifest.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ValueError, match="export format version 99"):
        load_quantized(tmp_path / "q")
    manifest.write_text(json.dumps(data))
    experts = tmp_path / "q" / "experts" / "transformer.safetensors"
    experts.write_bytes(experts.read_bytes()[:-100])
    with pytest.raises(ValueError, match="transformer.safetensors"):
        load_quantized(tmp_path / "q")
    with pytest.raises(ValueError, match="not a vidquant export"):
        load_quantized(tmp_path)


def test_an_export_with_a_truncated_file_is_refused_by_name_before_loading(base_dir: Path, tmp_path: Path) -> None:
    """Each file an export holds, cut short: the state's tensors and manifest, the experts' weights and every
    pipeline component: a ValueError naming that file; the intact export still loads."""
    export(load_pipeline(base_dir), vidquant.load_state(DATA / "state-v2-svdquant-gptq-hif4"), tmp_path / "q")
    files = [tmp_path / "q" / "state" / "tensors.safetensors", tmp_path / "q" / "state" / "manifest.json",
             *sorted((tmp_path / "q" / "experts").glob("*.safetensors")),
             *sorted((tmp_path / "q" / "pipeline").rglob("*.safetensors"))]
    assert len(files) == 6
    for file in files:
        good = file.read_bytes()
        for cut in (len(good) // 2, len(good) - 1):
            file.write_bytes(good[:cut])
            with pytest.raises(ValueError, match=re.escape(str(file))):
                load_quantized(tmp_path / "q")
        file.write_bytes(good)
    assert sum(isinstance(m, QuantLinear) for m in load_quantized(tmp_path / "q").transformer.modules()) == 20


def test_cli_export_and_generate_from_it(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["quantize", "--model", "tiny", "--recipe", "rtn-nvfp4", "--out",
                               str(tmp_path / "state")]).exit_code == 0
    result = runner.invoke(app, ["export", "--model", "tiny", "--state", str(tmp_path / "state"), "--out",
                                 str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "v"),
                                 "--num-prompts", "1", "--steps", "2", "--height", "32", "--width", "32",
                                 "--frames", "9"])  # an export is not a tiny model: the default is 720p
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v" / "prompts.json").is_file()
