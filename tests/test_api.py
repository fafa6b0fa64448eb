"""The Python API on models other than Wan: any nn.Module with a forward loop, CogVideoX and LTX-Video pipelines.

Every bundled recipe calibrates, quantizes, saves, reloads and applies bit-identically to the in-memory result,
through the same code paths as Wan. Every model is built offline and goes through save_pretrained /
from_pretrained, so the real loading path runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXPipeline, LTXPipeline
from transformers import BertConfig, BertModel

import vidquant
from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.prompts import default_prompts
from vidquant.models import adapter_for, load_pipeline
from vidquant.models.tiny_cogvideox import build_tiny_cogvideox_pipeline
from vidquant.models.tiny_ltx import build_tiny_ltx_pipeline
from vidquant.nn import QuantLinear
from vidquant.recipes import Recipe, load_recipe, recipe_names

SETTINGS = CalibSettings(num_prompts=2, steps=2, height=32, width=32, frames=9, bins=2)


def small(name: str) -> Recipe:
    """A bundled recipe, svdquant-gptq with fewer refinement rounds (the tiny layers converge at once), and
    without fixed protected blocks: "first 2, last 3" needs 5 blocks, these models have 2 (tiny-wan21 has 8:
    tests/eval/test_blocks.py); auto protection keeps at most one."""
    data = load_recipe(name).to_dict()
    if data["method"] == "svdquant-gptq":
        data["svdquant-gptq"]["lowrank"]["iters"] = 1
    if data["protect_blocks"] != "auto":
        data["protect_blocks"] = []
    else:  # auto may spend its whole budget: leave a block quantized
        data["max_protected_blocks"] = 1
    return Recipe.model_validate(data)


# ---- any nn.Module: a tiny BERT encoder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("bert")
    BertModel(config).eval().save_pretrained(path)
    return path


def bert(path: Path) -> BertModel:
    return BertModel.from_pretrained(path, local_files_only=True).eval()


def batches(seed: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 99, (2, 24), generator=g)} for _ in range(count)]


def bert_out(model: BertModel) -> torch.Tensor:
    with torch.no_grad():
        return model(**batches(99, 1)[0]).last_hidden_state


def test_the_generic_adapter_finds_linears_and_blocks(bert_dir: Path) -> None:
    adapter = adapter_for(bert(bert_dir))
    assert adapter.family == "generic" and list(adapter.experts()) == ["model"]
    assert adapter.blocks("model") == ["encoder.layer.0", "encoder.layer.1"]
    assert len(adapter.target_linears("model")) == 2 * 6 + 1  # q, k, v, out, up, down per layer + the pooler
    assert adapter.block_index("model", "encoder.layer.1.output.dense") == 1
    assert adapter.block_index("model", "pooler.dense") is None


@pytest.mark.parametrize("name", recipe_names())
def test_any_module_with_a_forward_loop_for_every_recipe(bert_dir: Path, tmp_path: Path, name: str) -> None:
    model = bert(bert_dir)
    reference = bert_out(model)
    loop = batches(0)
    stats = vidquant.calibrate(model, loop)
    assert stats.meta["data_kind"] == "forward_loop" and stats.meta["data_hash"]
    state = vidquant.quantize(model, small(name), stats, forward_loop=loop)
    assert torch.equal(bert_out(model), reference)  # quantize does not change the model
    vidquant.apply(model, state)
    quantized = bert_out(model)
    assert not torch.equal(quantized, reference)
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) > 0.9
    state.save(tmp_path / "state")
    restored = bert(bert_dir)
    vidquant.apply(restored, vidquant.load_state(tmp_path / "state"))
    assert torch.equal(bert_out(restored), quantized)
    kept = len(state.plan["protected"])  # auto protection keeps a block of 6 Linears
    assert sum(isinstance(m, QuantLinear) for m in restored.modules()) == 13 - kept and kept in (0, 6)


def test_a_callable_forward_loop_and_protection_by_pattern(bert_dir: Path) -> None:
    model = bert(bert_dir)

    def loop(m: BertModel) -> None:
        for batch in batches(1):
            m(**batch)

    stats = vidquant.calibrate(model, loop)
    recipe = Recipe.model_validate({**load_recipe("tail-aware-hif4").to_dict(), "protect": ["model.pooler.*"],
                                    "protect_blocks": [-1]})
    state = vidquant.quantize(model, recipe, stats)
    assert sorted({n.split(".")[3] for n in state.layers}) == ["0"]  # model.encoder.layer.0 only
    with pytest.raises(ValueError, match="forward loop"):
        vidquant.calibrate(model)
    with pytest.raises(ValueError, match="never called"):
        vidquant.calibrate(model, lambda m: None)


# ---- non-Wan diffusers video DiTs ---------------------------------------------------------------------------

DITS = {"cogvideox": (build_tiny_cogvideox_pipeline, CogVideoXPipeline),
        "ltx": (build_tiny_ltx_pipeline, LTXPipeline)}


@pytest.fixture(scope="module", params=list(DITS))
def dit(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    build, _ = DITS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    build().save_pretrained(path)
    return request.param, path


def fresh(path: Path):
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe) -> torch.Tensor:
    return pipe(prompt="a red car with a licence plate", height=32, width=32, num_frames=9, num_inference_steps=2,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent").frames


@pytest.fixture(scope="module")
def dit_stats(dit):
    family, path = dit
    return vidquant.calibrate(fresh(path), default_prompts(), SETTINGS)


def test_dit_adapters_are_found_and_batched_cfg_is_told_apart(dit, dit_stats) -> None:
    family, path = dit
    pipe = fresh(path)
    adapter = adapter_for(pipe)
    assert adapter.family == family and isinstance(pipe, DITS[family][1])
    assert adapter.blocks("transformer") == ["transformer_blocks.0", "transformer_blocks.1"]
    assert not any("norm" in name for name in adapter.target_linears("transformer"))  # AdaLN stays BF16
    for obs in dit_stats.inputs["transformer"].values():  # [uncond; cond] rows of one call, counted apart
        assert torch.equal(obs.tokens[:, 0], obs.tokens[:, 1]) and obs.tokens.sum() > 0


@pytest.mark.parametrize("name", recipe_names())
def test_dit_every_recipe_saves_reloads_and_applies_bit_identically(dit, dit_stats, tmp_path: Path,
                                                                     name: str) -> None:
    _, path = dit
    pipe = fresh(path)
    reference = latents(pipe)
    state = vidquant.quantize(pipe, small(name), dit_stats)
    vidquant.apply(pipe, state)
    quantized = latents(pipe)
    assert not torch.equal(quantized, reference)
    state.save(tmp_path / "state")
    restored = fresh(path)
    vidquant.apply(restored, vidquant.load_state(tmp_path / "state"))
    assert torch.equal(latents(restored), quantized)
