"""Recipe schema, loading with errors that name the file and key, bundled recipes, and layer selection."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import WanTransformer3DModel

from vidquant.models import wan
from vidquant.models.tiny import MEDIUM_EXPERT, build_tiny_pipeline
from vidquant.patterns import matches
from vidquant.recipes import (
    DEFAULT_ALPHA,
    DEFAULT_PERCENTILE,
    Recipe,
    load_recipe,
    plan,
    recipe_names,
)

BASE: dict[str, Any] = {"name": "test", "weights": "hif4", "activations": "hif4"}


def recipe(**changes: Any) -> Recipe:
    return Recipe.model_validate({**BASE, **changes})


@pytest.fixture(scope="module")
def pipe() -> Any:
    """Two experts x 2 blocks x 10 target Linears (+ 6 boundary Linears each); only names matter here."""
    return build_tiny_pipeline(outliers=False)


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- selection -----------------------------------------------------------------------------------


def test_default_recipe_quantizes_every_target_and_keeps_every_boundary_linear(pipe: Any) -> None:
    result = plan(pipe, recipe())
    expected = [f"{e}.{layer}" for e, m in wan.experts(pipe).items() for layer in wan.target_linears(m)]
    assert result.quantized == expected and len(expected) == 40
    assert result.boundary == [
        f"{e}.{layer}" for e, m in wan.experts(pipe).items() for layer in wan.boundary_linears(m)
    ]
    assert result.protected == {}
    assert result.protected_blocks == {"transformer": [], "transformer_2": []}
    assert result.counts() == {
        "transformer": {"quantized": 20, "protected": 0, "boundary": 6},
        "transformer_2": {"quantized": 20, "protected": 0, "boundary": 6},
        "total": {"quantized": 40, "protected": 0, "boundary": 12},
    }
    assert "total: 40 quantized, 0 protected, 12 boundary" in result.summary()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["quantized"] == expected and data["counts"] == result.counts() and data["experts"] == result.experts


def test_protect_patterns_shell_and_regex(pipe: Any) -> None:
    regex = r"re:transformer_2\.blocks\.(0|1)\.attn2\..*"
    result = plan(pipe, recipe(protect=["*.ffn.*", regex, "transformer.blocks.1.attn1.to_q"]))
    ffn = {n for n in result.protected if ".ffn." in n}
    assert len(ffn) == 8 and all(result.protected[n] == "protect pattern '*.ffn.*'" for n in ffn)
    attn2 = {n for n, reason in result.protected.items() if reason == f"protect pattern '{regex}'"}
    assert attn2 == {
        f"transformer_2.blocks.{b}.attn2.{p}" for b in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert result.protected["transformer.blocks.1.attn1.to_q"] == "protect pattern 'transformer.blocks.1.attn1.to_q'"
    assert len(result.protected) == 17 and len(result.quantized) == 23
    assert not set(result.protected) & set(result.quantized)


def test_patterns_match_the_whole_name() -> None:
    name = "transformer.blocks.3.attn1.to_q"
    assert matches("*.attn1.*", name) and matches("transformer.blocks.?.attn1.to_q", name)
    assert not matches("blocks.3.*", name)  # shell patterns are anchored too
    assert matches(r"re:transformer\.blocks\.\d+\.attn1\.to_q", name)
    assert not matches(r"re:blocks\.3", name)  # fullmatch, not search
    assert not matches("Transformer.*", name)  # case-sensitive


def test_include_leaves_the_rest_protected_as_not_included(pipe: Any) -> None:
    result = plan(pipe, recipe(include=["transformer.*"]))
    assert len(result.quantized) == 20 and all(n.startswith("transformer.") for n in result.quantized)
    assert len(result.protected) == 20 and set(result.protected.values()) == {"not included"}


def test_protect_blocks_with_negative_indices(pipe: Any) -> None:
    result = plan(pipe, recipe(protect_blocks=[-1, 1], protect=["*.blocks.1.ffn.*"]))
    assert result.protected_blocks == {"transformer": [1], "transformer_2": [1]}
    every = plan(pipe, recipe()).quantized
    assert list(result.protected) == [n for n in every if ".blocks.1." in n]
    assert set(result.protected.values()) == {"protected block 1"}  # the block decides before the pattern
    assert all(".blocks.0." in n for n in result.quantized) and len(result.quantized) == 20
    assert "20 protected: protected block 1" in result.summary()


@pytest.mark.parametrize("index", [2, -3])
def test_protect_blocks_out_of_range_names_the_expert(pipe: Any, index: int) -> None:
    with pytest.raises(ValueError, match=f"block {index} is out of range for expert 'transformer', which has 2 blocks"):
        plan(pipe, recipe(protect_blocks=[index]))


def test_protected_block_budget(pipe: Any) -> None:
    assert plan(pipe, recipe(protect_blocks=[0, -2], max_protected_blocks=2)).protected_blocks["transformer"] == [0]
    with pytest.raises(ValueError, match=r"keeps 2 \(expert, block\) pairs .* over the budget max_protected_blocks=1"):
        plan(pipe, recipe(protect_blocks=[0], max_protected_blocks=1))


def test_patterns_that_match_nothing_are_warned(pipe: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vidquant.recipes.select"):
        plan(pipe, recipe(include=["*", "transformer_3.*"], protect=["*.proj_out", "*.attn1.*"]))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2  # proj_out is a boundary Linear, not a target
    assert "include pattern 'transformer_3.*' matches no target Linear" in warned[0]
    assert "protect pattern '*.proj_out' matches no target Linear" in warned[1]


def test_plan_takes_a_mapping_of_experts_and_one_expert_pipelines() -> None:
    single = build_tiny_pipeline(two_experts=False, outliers=False)
    assert plan(single, recipe()).counts()["total"] == {"quantized": 20, "protected": 0, "boundary": 6}
    mapping = plan({"transformer_2": single.transformer}, recipe(protect_blocks=[0]))
    assert mapping.experts == ["transformer_2"] and mapping.protected_blocks == {"transformer_2": [0]}
    with pytest.raises(ValueError, match="no experts"):
        plan({}, recipe())
    with pytest.raises(ValueError, match=r"cannot contain '\.'.*\['a\.b'\]"):
        plan({"a.b": single.transformer}, recipe())


def test_a14b_default_plan_on_the_meta_device() -> None:
    """Wan2.2-A14B shapes (40 blocks, 40 x 128 heads, FFN 13824), no memory: 400 + 6 Linears per expert (paper §V-B)."""
    with torch.device("meta"):
        high = WanTransformer3DModel.from_config({**MEDIUM_EXPERT, "num_layers": 40})
        low = WanTransformer3DModel.from_config({**MEDIUM_EXPERT, "num_layers": 40})
    result = plan({"transformer": high, "transformer_2": low}, load_recipe("tail-aware-hif4"))
    assert result.counts() == {
        "transformer": {"quantized": 400, "protected": 0, "boundary": 6},
        "transformer_2": {"quantized": 400, "protected": 0, "boundary": 6},
        "total": {"quantized": 800, "protected": 0, "boundary": 12},
    }
    last = plan({"transformer": high, "transformer_2": low}, recipe(protect_blocks=[-1], max_protected_blocks=2))
    assert last.protected_blocks == {"transformer": [39], "transformer_2": [39]} and len(last.quantized) == 780


# ---- schema and loading --------------------------------------------------------------------------


def test_every_bundled_recipe_loads() -> None:
    names = recipe_names()
    for fmt in ("hif4", "mxfp4", "nvfp4"):
        for kind, statistic in (("tail-aware", "percentile"), ("max", "max"), ("rtn", "none")):
            name = f"{kind}-{fmt}"
            assert name in names
            loaded = load_recipe(name)
            assert (loaded.name, loaded.weights, loaded.activations) == (name, fmt, fmt)
            assert loaded.smoothing.statistic == statistic and loaded.description
            assert loaded.smoothing.alpha == DEFAULT_ALPHA and loaded.smoothing.percentile == DEFAULT_PERCENTILE
            assert loaded.max_protected_blocks == 2 and loaded.protect_blocks == []


def test_svdquant_gptq_recipes_load() -> None:
    for fmt in ("hif4", "mxfp4", "nvfp4"):
        loaded = load_recipe(f"svdquant-gptq-{fmt}")
        assert (loaded.method, loaded.weights, loaded.activations) == ("svdquant-gptq", fmt, fmt)
        o = loaded.options  # the method's own section
        assert (o.lowrank.rank, o.gptq.block_size, o.gptq.damp, o.clip_search.bins) == (32, 128, [0.01, 0.1, 1.0], 4)
        assert o.clip_search.enabled and o.gptq.enabled and 1.0 in o.clip_search.grid
    lowrank = load_recipe("svdquant-gptq-hif4").options.lowrank
    assert (lowrank.rank_for(5120, 13824), lowrank.rank_for(32, 32), lowrank.rank_for(96, 64)) == (32, 4, 8)
    data = load_recipe("tail-aware-hif4").to_dict()
    assert "lowrank" not in data and "svdquant-gptq" not in data and "smoothquant" not in data
    assert set(load_recipe("svdquant-gptq-hif4").to_dict()["svdquant-gptq"]) == {
        "lowrank", "gptq", "clip_search", "held_out", "sequential_experts"}


def test_options_written_at_the_top_level_still_load() -> None:
    """Recipes and states of state format 2 kept the svdquant-gptq options at the top level."""
    old = {**BASE, "method": "svdquant-gptq", "lowrank": {"rank": 8}, "clip_search": {"bins": 2}}
    migrated = Recipe.model_validate(old)
    assert (migrated.options.lowrank.rank, migrated.options.clip_search.bins) == (8, 2)
    assert Recipe.model_validate(migrated.to_dict()) == migrated


def test_round_trip_to_dict() -> None:
    for name in recipe_names():
        loaded = load_recipe(name)
        assert Recipe.model_validate(json.loads(json.dumps(loaded.to_dict()))) == loaded
    custom = recipe(protect=[r"re:x\.y"], protect_blocks=[0, -1], act_clip=0.9, smoothing={"alpha": 0.3})
    assert Recipe.model_validate(custom.to_dict()) == custom


def test_defaults() -> None:
    r = recipe()
    assert (r.method, r.include, r.protect, r.protect_blocks, r.max_protected_blocks, r.act_clip) == (
        "smoothquant", ["*"], [], [], None, None)  # fmt: skip
    assert (r.smoothing.statistic, r.smoothing.percentile, r.smoothing.alpha) == (
        "percentile", DEFAULT_PERCENTILE, DEFAULT_ALPHA)  # fmt: skip


def test_user_file_loads_and_takes_its_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "weights: hif4\nactivations: null\nprotect: ['*.ffn.*']\nsmoothing: {alpha: 0.6}\n")
    loaded = load_recipe(path)
    assert (loaded.name, loaded.activations, loaded.protect, loaded.smoothing.alpha) == ("mine", None, ["*.ffn.*"], 0.6)
    assert load_recipe(str(path)) == loaded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weights: hif4\nactivations: hif4\nalpha: 0.5\n", "unknown key 'alpha'"),
        ("weights: hif4\nactivations: hif4\nsmoothing: {alpah: 0.5}\n", "unknown key 'smoothing.alpah'"),
        ("weights: hif4\nactivations: hif4\nsmoothing: {alpha: 1.5}\n", r"smoothing.alpha: .*less than or equal to 1"),
        ("weights: hif4\nactivations: hif4\nsmoothing: {percentile: 50}\n", r"smoothing.percentile: .*(got 50)"),
        ("weights: hif4\nactivations: hif4\nsmoothing: {eps: 0}\n", "smoothing.eps: "),
        ("weights: hif4\nactivations: hif4\nsmoothing: {statistic: mean}\n", "smoothing.statistic: "),
        ("weights: hif4\nactivations: hif4\nact_clip: 0\n", "act_clip: .*greater than 0"),
        ("weights: hif5\nactivations: hif4\n", "weights: unknown format 'hif5'"),
        ("weights: hif4\nactivations: int3\n", "activations: unknown format 'int3'"),
        ("weights: hif4\nactivations: hif4\nmethod: gptq\n", "unknown method 'gptq'; known methods: "),
        ("weights: hif4\nactivations: hif4\nlowrank: {rank: 8}\n", "lowrank: only with method svdquant-gptq"),
        ("weights: hif4\nactivations: hif4\nmethod: svdquant-gptq\nact_clip: 0.9\n", "exclude each other"),
        ("weights: hif4\nactivations: hif4\nmethod: svdquant-gptq\nclip_search: {grid: [0.5]}\n", "hold 1.0"),
        ("weights: hif4\nactivations: hif4\nmethod: svdquant-gptq\nclip_search: {grid: [0, 1]}\n", r"\(0, 1\]"),
        ("weights: hif4\nactivations: hif4\nmethod: svdquant-gptq\ngptq: {damp: 0}\n", "svdquant-gptq.gptq.damp: "),
        ("weights: hif4\nactivations: hif4\nmethod: svdquant-gptq\nlowrank: {rnak: 8}\n",
         "unknown key 'svdquant-gptq.lowrank.rnak'"),
        ("weights: hif4\nactivations: hif4\nmethod: svdquant-gptq\nsvdquant-gptq: {clip_search: {bins: 100000000}}\n",
         "svdquant-gptq.clip_search.bins: "),
        ("weights: hif4\nactivations: hif4\nsvdquant-gptq: {gptq: {damp: 1}}\n", "unknown key 'svdquant-gptq'"),
        ("weights: hif4\nactivations: hif4\nprotect_blocks: [a]\n", r"protect_blocks: .*integers.*'a'"),
        ("weights: hif4\nactivations: hif4\nprotect_blocks: all\n", r"protect_blocks: .*or 'auto', got 'all'"),
        ("weights: hif4\nactivations: hif4\nprotect_blocks: auto\n", r"auto needs max_protected_blocks"),
        ("weights: hif4\nactivations: hif4\nmax_protected_blocks: -1\n", "max_protected_blocks: "),
        ("weights: hif4\nactivations: hif4\nprotect: ['re:(']\n",
         r"protect: invalid regular expression in pattern 're:\('"),
        ("weights: hif4\nactivations: hif4\ninclude: ['']\n", "include: empty pattern"),
        ("activations: hif4\n", "missing key 'weights'"),
        (
            "weights: hif4\nactivations: hif4\nweights: mxfp4\n",
            "invalid YAML at line 3, column 1: duplicate key 'weights'",
        ),
        ("weights: [hif4\n", "invalid YAML at line 2, column 1: while parsing a flow sequence: expected ',' or ']'"),
        ("- weights\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_unknown_recipe_name_or_missing_file() -> None:
    with pytest.raises(ValueError, match=r"tail-aware-hif5: neither a bundled recipe \(auto-boundary-hif8, .*\) "
                                         r"nor a file"):
        load_recipe("tail-aware-hif5")


def test_python_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="protct"):
        recipe(protct=["*"])
    r = recipe()
    with pytest.raises(ValueError, match="alpha"):
        r.smoothing.alpha = 2.0
    with pytest.raises(ValueError, match="unknown format"):
        r.weights = "hif5"
