"""`protect_blocks: auto`: which blocks `choose_blocks` keeps from measured sensitivity, and the plan it makes."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vidquant.models.tiny import build_tiny_pipeline
from vidquant.recipes import Recipe, plan
from vidquant.recipes.select import choose_blocks

values = st.floats(0.0, 1.0, allow_nan=False)
sensitivities = st.dictionaries(st.sampled_from(["transformer", "transformer_2"]),
                                st.lists(values, min_size=1, max_size=12), min_size=1)


@given(sensitivity=sensitivities, budget=st.integers(0, 6), stand_out=st.floats(1.0, 4.0))
def test_choice_stays_in_budget_and_only_keeps_blocks_that_stand_out(sensitivity, budget, stand_out) -> None:
    chosen = choose_blocks(sensitivity, budget, stand_out)
    pairs = [(e, b) for e, blocks in chosen.items() for b in blocks]
    assert len(pairs) <= budget and len(set(pairs)) == len(pairs)
    median = statistics.median(v for vs in sensitivity.values() for v in vs)
    for expert, block in pairs:
        value = sensitivity[expert][block]
        assert value > 0 and value >= stand_out * median
        # nothing left out is more sensitive than something kept
        assert all(v <= value for e, vs in sensitivity.items() for b, v in enumerate(vs) if b not in chosen.get(e, []))
    assert choose_blocks(sensitivity, budget, stand_out) == chosen  # deterministic


def test_choice_on_typical_cases() -> None:
    boundary = [0.03, 0.02, 0.003, 0.004, 0.003, 0.01, 0.005, 0.02]
    assert choose_blocks({"t": boundary}, 5) == {"t": [0, 1, 7]}  # median 0.0075: 0.015 and up stand out
    assert choose_blocks({"t": boundary}, 2) == {"t": [0, 1]}
    assert choose_blocks({"t": [0.01] * 8}, 2) == {}  # nothing stands out: nothing kept
    assert choose_blocks({"a": [0.01, 0.5], "b": [0.01, 0.4, 0.02]}, 2) == {"a": [1], "b": [1]}  # over all experts


def test_auto_plan_protects_the_chosen_blocks_and_says_why() -> None:
    pipe = build_tiny_pipeline()
    recipe = Recipe.model_validate({"name": "a", "weights": "hif8", "activations": "hif8", "protect_blocks": "auto",
                                    "max_protected_blocks": 1, "smoothing": {"statistic": "none"}})
    candidate = plan(pipe, recipe)  # no measurement yet: the plan whose blocks are measured
    assert candidate.protected_blocks == {"transformer": [], "transformer_2": []} and not candidate.protected
    chosen = plan(pipe, recipe, sensitivity={"transformer": [0.01, 0.02], "transformer_2": [0.2, 0.01]})
    assert chosen.protected_blocks == {"transformer": [], "transformer_2": [0]}
    reasons = set(chosen.protected.values())
    assert reasons == {"protected block 0 (auto: 95% of this expert's summed block sensitivity)"}
    assert all(name.startswith("transformer_2.blocks.0.") for name in chosen.protected)
    assert chosen.to_dict()["sensitivity"]["transformer_2"] == [0.2, 0.01]
    with pytest.raises(ValueError, match="sensitivity of 3 blocks for expert 'transformer', which has 2"):
        plan(pipe, recipe, sensitivity={"transformer": [0.1, 0.2, 0.3]})
