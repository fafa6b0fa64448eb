"""One model, several precisions: switching is exact, cheap in memory, and refuses states of another base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fresh, run, subset

import vidquant
from vidquant.models import split_name
from vidquant.nn import QuantLinear
from vidquant.route import BF16, RoutedLinear, RoutedModel


def test_switching_back_and_forth_matches_each_state_applied_alone(states) -> None:
    protected = subset(states, lambda name: None if ".blocks.0." in name else "w8a8")  # block 0 left in BF16
    expected = {BF16: run(fresh())}
    for name, state in (("w4a4", states["w4a4"]), ("w8a8", protected)):
        pipe = fresh()
        vidquant.apply(pipe, state)  # the packed runtime, as the routed layers
        expected[name] = run(pipe)
    assert len(set(expected.values())) == 3
    with RoutedModel.build(fresh(), {"w4a4": states["w4a4"], "w8a8": protected, BF16: None}) as routed:
        for precision in ("w4a4", "w8a8", BF16, "w4a4", "w8a8"):
            routed.use(precision)
            assert run(routed.model) == expected[precision], precision


def test_per_state_timestep_bins_are_published(states) -> None:
    """Each state's layers read the bin of their own edges (2 vs 3 bins): a wrong bin changes the latents."""
    with RoutedModel.build(fresh(), dict(states)) as routed:
        seen = []
        layer = routed.layers["transformer_2.blocks.0.attn1.to_q"]
        layer.variants["w8a8"].register_forward_pre_hook(lambda m, a: seen.append(m.timestep_bin))
        routed.use("w8a8")
        run(routed.model)
    edges = states["w8a8"].timestep_bins["transformer_2"]
    expected = [vidquant.models.timestep_bin(t, edges) for e, _, t in routed.calls if e == "transformer_2"]
    assert seen == expected and len(seen) > 0


def test_the_base_weights_are_held_once_and_each_precision_costs_its_packed_bytes(states) -> None:
    pipe = fresh()
    base = {n: m.weight for n, m in vidquant.models.adapter_for(pipe).experts()["transformer"].named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    with RoutedModel.build(pipe, dict(states)) as routed:
        for name, layer in routed.layers.items():
            expert, local = split_name(name)
            if expert == "transformer":
                assert layer.base.weight is base[local]  # not copied
            assert all(isinstance(v, QuantLinear) and v.packed is not None for v in layer.variants.values())
            assert all(v.weight is None and v.bias is layer.base.bias for v in layer.variants.values())
        for precision in states:
            cost = routed.cost(precision)
            packed = sum(layer.variants[precision].packed.nbytes() for layer in routed.layers.values())
            clips = sum(layer.variants[precision].act_clip.nbytes for layer in routed.layers.values())
            assert cost.layers == 40 and cost.resident_bytes == packed + clips
            assert cost.state_bytes == states[precision].nbytes()
            fmt = vidquant.formats.get(states[precision].recipe["weights"])  # the format's bytes (tiny rows pad)
            assert packed == sum(fmt.packed_nbytes(m.out_features, m.in_features) for m in routed.layers.values())
        assert routed.cost(BF16).resident_bytes == 0


def test_states_of_another_base_are_refused_naming_the_folder(states, tmp_path: Path) -> None:
    other = vidquant.quantize(fresh("tiny-wan21"), "rtn-hif4", None)
    other.save(tmp_path / "wan21-state")
    states["w8a8"].save(tmp_path / "good")
    with pytest.raises(ValueError, match=r"state 'w4a4' \(.*wan21-state\): this state was made for another model"):
        RoutedModel.load(fresh(), {"w8a8": tmp_path / "good", "w4a4": tmp_path / "wan21-state"})
    changed = fresh()
    with torch.no_grad():
        changed.transformer.blocks[1].ffn.net[2].weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"state 'w8a8' \(.*good\): layer transformer\.blocks\.1\.ffn\.net\.2: its "
                                         "weight differs"):
        RoutedModel.load(changed, {"w8a8": tmp_path / "good"})
    with pytest.raises(ValueError, match="precision 'w4': .*not a PTQ state"):
        RoutedModel.load(fresh(), {"w4": tmp_path})


def test_bad_precisions_and_double_routing_are_refused(states) -> None:
    with pytest.raises(ValueError, match="precision name '../x'"):
        RoutedModel.build(fresh(), {"../x": states["w4a4"]})
    with pytest.raises(ValueError, match="'bf16' is the base model's own weights"):
        RoutedModel.build(fresh(), {BF16: states["w4a4"]})
    pipe = fresh()
    with RoutedModel.build(pipe, {"w4a4": states["w4a4"]}) as routed:
        with pytest.raises(ValueError, match="unknown precision 'w8a8'"):
            routed.use("w8a8")
        with pytest.raises(ValueError, match="routed already"):
            RoutedModel.build(pipe, {"w8a8": states["w8a8"]})
        assert isinstance(routed.layers["transformer.blocks.0.attn1.to_q"], RoutedLinear)
