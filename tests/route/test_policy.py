"""Routing policies: the mix per expert, step and block equals the same mix applied by hand; bad files are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import STEPS, fresh, run, subset
from hypothesis import given, settings
from hypothesis import strategies as st

import vidquant
from vidquant.route import BF16, RoutedModel, load_policy, parse_policy, policy_names
from vidquant.route.policy import Rule

PRECISIONS = {"w4a4": "s4", "w8a8": "s8"}


def policy(**kwargs):
    return parse_policy({"name": "t", "precisions": PRECISIONS, "default": "w4a4", **kwargs})


def test_a_per_expert_policy_equals_the_hand_applied_mix(states) -> None:
    hand = fresh()
    vidquant.apply(hand, subset(states, lambda n: "w8a8" if n.startswith("transformer.") else "w4a4"))
    mix = policy(rules=[{"experts": ["transformer"], "precision": "w8a8"}])
    with RoutedModel.build(fresh(), dict(states)) as routed:
        routed.route(mix.plan(routed))
        routed.begin(STEPS)
        assert run(routed.model) == run(hand)


@pytest.mark.slow  # ~40 s here: the per-expert test above is the fast check of the same wiring
def test_a_per_block_policy_equals_the_hand_applied_mix(states21) -> None:
    """Blocks as recipes' protect_blocks: negative from the end (tiny-wan21 has 8)."""
    hand = fresh("tiny-wan21")
    vidquant.apply(hand, subset(states21, lambda n: "w8a8" if ".blocks.0." in n or ".blocks.7." in n else "w4a4"))
    mix = policy(rules=[{"blocks": [0, -1], "precision": "w8a8"}])
    with RoutedModel.build(fresh("tiny-wan21"), dict(states21)) as routed:
        routed.route(mix.plan(routed))
        assert run(routed.model) == run(hand)


def test_a_per_step_policy_equals_switching_by_hand_between_steps(states21) -> None:
    mix = policy(rules=[{"steps": [0.0, 0.5], "precision": "w8a8"}])
    with RoutedModel.build(fresh("tiny-wan21"), dict(states21)) as routed:
        routed.use("w8a8")

        def switch_after_first_step(_pipe, i, _t, kwargs):
            if i == 0:
                routed.use("w4a4")
            return kwargs

        by_hand = run(routed.model, callback=switch_after_first_step)
        routed.route(mix.plan(routed))
        routed.begin(STEPS)
        assert run(routed.model) == by_hand
        assert [step for _, step, _ in routed.calls] == [0, 0, 1, 1]  # two CFG calls per step
        by_index = policy(rules=[{"step_indices": [-2], "precision": "w8a8"}]).plan(routed)
        for step in range(STEPS):  # step -2 of 2 is step 0: the same plan as the fraction [0, 0.5)
            assert by_index.at("transformer", step, STEPS) == mix.plan(routed).at("transformer", step, STEPS)
        assert set(by_index.at("transformer", 0, STEPS).values()) == {"w8a8"}
        routed.use("w4a4")
        assert run(routed.model) != by_hand


def test_resolution_order_block_over_step_over_expert_later_rule_wins(states21) -> None:
    mix = policy(precisions={**PRECISIONS, "w6": "s6"}, rules=[
        {"blocks": [0], "precision": "w6"},
        {"experts": ["transformer"], "precision": "w8a8"},
        {"steps": [0.0, 0.5], "precision": BF16},
        {"blocks": [0], "precision": BF16},  # same kind as the first: the later one wins
        {"experts": ["transformer"], "step_indices": [1], "blocks": [3], "precision": "w4a4"},
    ])
    with RoutedModel.build(fresh("tiny-wan21"), dict(states21)) as routed:
        plan = mix.plan(routed)
        at0, at1 = plan.at("transformer", 0, 2), plan.at("transformer", 1, 2)
    assert at0["blocks.0.attn1.to_q"] == BF16 and at1["blocks.0.ffn.net.2"] == BF16  # block rules
    assert at0["blocks.3.attn1.to_q"] == BF16  # step over expert
    assert at1["blocks.3.attn1.to_q"] == "w4a4"  # a rule with blocks (and a step) outranks the expert rule
    assert at1["blocks.5.attn2.to_k"] == "w8a8"  # expert over default
    assert plan.summary(2)["transformer"][1] == {BF16: 10, "w4a4": 10, "w8a8": 60}


KINDS = st.sampled_from([{"experts": ["transformer"]}, {"steps": [0.0, 0.5]}, {"steps": [0.5, 1.0]},
                         {"step_indices": [-1]}, {"blocks": [0, -1]}, {"blocks": [2]},
                         {"experts": ["transformer"], "blocks": [1]}])


@settings(max_examples=25, deadline=None)
@given(rules=st.lists(st.tuples(KINDS, st.sampled_from(["w4a4", "w8a8", BF16])), max_size=6), data=st.data())
def test_only_the_order_within_a_kind_matters(routed21, rules, data) -> None:
    """Moving rules of different kinds around each other never changes a layer's precision."""
    parsed = [Rule(precision=p, **kind) for kind, p in rules]
    keys = [r.priority for r in parsed]
    order = data.draw(st.permutations(range(len(parsed))))
    stable = sorted(order, key=lambda i: (keys[i], i))  # the same kinds in the same relative order
    shuffled = [parsed[i] for i in order]
    regrouped = [parsed[i] for i in stable]
    a = policy(rules=[r.model_dump() for r in parsed]).plan(routed21)
    b = policy(rules=[r.model_dump() for r in regrouped]).plan(routed21)
    for step in range(2):
        assert a.at("transformer", step, 2) == b.at("transformer", step, 2)
    if len({(keys[i]) for i in order}) == len(order):  # all kinds distinct: any order is equivalent
        c = policy(rules=[r.model_dump() for r in shuffled]).plan(routed21)
        assert c.at("transformer", 1, 2) == a.at("transformer", 1, 2)


@pytest.fixture(scope="module")
def routed21(states21):
    with RoutedModel.build(fresh("tiny-wan21"), dict(states21)) as routed:
        yield routed


@pytest.mark.parametrize(("data", "message"), [
    ({"precisions": PRECISIONS, "default": "w4a4", "rule": []}, "unknown key 'rule'"),
    ({"precisions": PRECISIONS, "default": "w2"}, "default: unknown precision 'w2'"),
    ({"precisions": PRECISIONS, "default": "w4a4", "rules": [{"precision": "w9", "blocks": [0]}]},
     "rules.0.precision: unknown precision 'w9'"),
    ({"precisions": PRECISIONS, "default": "w4a4", "rules": [{"precision": "w8a8"}]}, "a rule needs a condition"),
    ({"precisions": PRECISIONS, "default": "w4a4", "rules": [{"precision": "w8a8", "steps": [0.5, 0.2]}]},
     "rules.0.steps: a step range"),
    ({"precisions": PRECISIONS, "default": "w4a4", "rules": [{"precision": "w8a8", "blocks": [True]}]},
     "rules.0.blocks: indices are integers"),
    ({"precisions": {"../up": "s"}, "default": "w4a4"}, "precision name '../up'"),
    ({"precisions": {"mixed": "s"}, "default": "mixed"}, "'mixed' is the ladder's name"),
    ({"precisions": {"bf16": "s"}, "default": "bf16"}, "its value must be 'bf16'"),
    ({"precisions": PRECISIONS, "default": "w4a4", "escalation": {"ladder": ["mixed", "w16"]}},
     "escalation.ladder.1: unknown rung 'w16'"),
    ({"precisions": PRECISIONS, "default": "w4a4", "escalation": {"threshold": 1.5}}, "escalation.threshold"),
])
def test_bad_policies_are_refused_naming_the_field(data, message) -> None:
    with pytest.raises(ValueError, match="where.yaml: invalid routing policy: .*" + message.replace(".", r"\.")
                       .replace("(", r"\(")):
        parse_policy(data, "where.yaml")


def test_rules_that_do_not_fit_the_model_are_refused_naming_the_rule(routed21) -> None:
    with pytest.raises(ValueError, match="rules.1.blocks: block 8 is out of range for expert 'transformer'"):
        policy(rules=[{"blocks": [0], "precision": "w8a8"}, {"blocks": [8], "precision": "w8a8"}]).plan(routed21)
    with pytest.raises(ValueError, match="rules.0.experts: no expert 'transformer_2'"):
        policy(rules=[{"experts": ["transformer_2"], "precision": "w8a8"}]).plan(routed21)
    routed21.route(policy(rules=[{"steps": [0.0, 0.5], "precision": "w8a8"}]).plan(routed21))
    routed21.begin(None)
    with pytest.raises(ValueError, match="rules.0: a step condition needs the generation's step count"):
        run(routed21.model)
    routed21.use("w4a4")


def test_policy_files_bundled_and_relative_state_folders(tmp_path: Path) -> None:
    assert {"draft-escalate", "expert-mix", "step-mix", "block-mix"} <= set(policy_names())
    for name in policy_names():
        loaded, base = load_policy(name)
        assert base is None and loaded.name == name
    (tmp_path / "p.yaml").write_text("precisions: {w4a4: states/a, w8a8: /abs/b}\ndefault: w4a4\n"
                                     "escalation: {ladder: [mixed, w8a8, bf16]}\n")
    loaded, base = load_policy(tmp_path / "p.yaml")
    assert loaded.name == "p" and base == tmp_path
    assert loaded.state_paths(base) == {"w4a4": str(tmp_path / "states/a"), "w8a8": "/abs/b", BF16: BF16}
    assert loaded.state_paths(base, {"w4a4": "x"})["w4a4"] == "x"
    with pytest.raises(ValueError, match="--state w2=...: the policy has no precision 'w2'"):
        loaded.state_paths(base, {"w2": "x"})
    (tmp_path / "bad.yaml").write_text("precisions: {w4a4: a}\ndefault: w4a4\ndefault: w8a8\n")
    with pytest.raises(ValueError, match="bad.yaml: invalid YAML"):
        load_policy(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="list.yaml: a routing policy must be a YAML mapping"):
        load_policy(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="neither a bundled routing policy"):
        load_policy(tmp_path / "absent.yaml")
