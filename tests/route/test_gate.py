"""vidquant.route.gate: rules as data, whole-word matching, and the gate measured on the bundled prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant.calib.prompts import IDENTITY_SENSITIVE, category_group, prompt_categories
from vidquant.route.gate import GateDecision, PromptGate

# Written for this test, not taken from the bundled set (the rules were written with the bundled set in view, so
# its figures are not held out; these are): (prompt, identity-critical?) with the decision the rules document.
HAND_WRITTEN = [
    ("a car-free street at dawn, pigeons on the cobbles", False),  # "car-free": no car in the scene
    ("a faceless mannequin in a shop window", False),  # "faceless" is not "face" (whole words)
    ("a busy street market at noon", False),  # "busy" is not "bus"
    ("a plate of pasta steaming on a wooden table", False),  # a plate, not a licence plate
    ("a portrait-orientation shot of rolling hills", False),  # an aspect ratio, not a portrait
    ("a catwalk at night, lights sweeping the empty runway", False),  # "catwalk" is not "cat"
    ("an empty road with no cars under a starry sky", False),
    ("a sign language interpreter's hands in soft light", False),  # hands only; "sign language" is no sign
    ("a cable car climbs a misty mountain", False),  # a cable car is scenery here, not a vehicle to identify
    ("waves rolling onto a quiet beach at sunset", False),
    ("the words HELLO WORLD glow in the night sky", True),
    ("close-up of an old sailor squinting into the wind", True),
    ("a red sports car with the licence plate AB 123 races through a tunnel", True),
    ("a bottle of BRISA lemonade on a picnic blanket", True),
    ("Detective Jun Park walks into the rain-soaked alley again", True),
    ("a tabby cat with a torn ear sleeps on a windowsill", True),
    ("a neon sign above the bar flickers", True),
    ("a woman with freckles smiles at the camera", True),
]


@pytest.fixture(scope="module")
def gate() -> PromptGate:
    return PromptGate.load()


def _precision_recall(gate: PromptGate, labelled: list[tuple[str, bool]]) -> tuple[float, float]:
    decided = [(gate.decide(p).critical, truth) for p, truth in labelled]
    tp = sum(d and t for d, t in decided)
    fp = sum(d and not t for d, t in decided)
    fn = sum(t and not d for d, t in decided)
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def test_bundled_prompts_precision_and_recall(gate: PromptGate) -> None:
    """Measured 54/54 identity-sensitive prompts caught, 7 of 26 scenery prompts flagged (precision 0.885): the
    chef's and the violinist's lit faces, billboards, a robot's serial number R-17, the ship name AURORA-9, a fox's
    white-tipped tail, the Milky Way taken for a name. Floors are what was measured, to catch regressions."""
    labelled = [(p, category_group(c) == IDENTITY_SENSITIVE) for p, c in prompt_categories().items()]
    assert len(labelled) == 80
    precision, recall = _precision_recall(gate, labelled)
    assert recall >= 1.0
    assert precision >= 0.88


def test_hand_written_tricky_prompts(gate: PromptGate) -> None:
    """Measured 17 of 18 right: every false friend is passed; the miss is "close-up of an old sailor" (person
    nouns are a closed list: "sailor" is not on it). The floor is that measurement."""
    wrong = [p for p, truth in HAND_WRITTEN if gate.decide(p).critical != truth]
    assert len(wrong) <= 1, wrong
    assert not [p for p, truth in HAND_WRITTEN if not truth and gate.decide(p).critical]  # no false alarm


def test_decision_says_why(gate: PromptGate) -> None:
    decision = gate.decide("A barista slides a cup printed with KESTREL COFFEE and a bird logo to Mara Quill")
    assert isinstance(decision, GateDecision) and decision.critical
    assert decision.categories == ("named-character", "products-logos", "text-in-scene")  # in rule order
    assert {"Mara Quill", "logo", "KESTREL", "printed"} <= set(decision.matched)
    assert gate.decide("misty hills at dawn") == GateDecision(False, (), ())


def test_non_critical_category_is_reported_but_does_not_route(gate: PromptGate) -> None:
    decision = gate.decide("a crowd of people crosses a bridge at dusk")
    assert decision.categories == ("people",) and not decision.critical


def test_matching_is_case_insensitive_on_word_boundaries(gate: PromptGate) -> None:
    assert gate.decide("A LOGO ON A WALL").critical
    assert "vehicles" in gate.decide("two Buses and a TAXI").categories  # TAXI also reads as text in scene
    assert not gate.decide("a carpet of moss").critical  # "car" inside a word
    assert not gate.decide("signal lights blink").critical  # "sign" inside a word


def test_rules_from_a_user_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\ncategories:\n  - name: boats\n    critical: true\n    keywords: [sailboat, ferry]\n"
                    "    patterns: ['hull number \\d+']\n    exclude: ['ferry tale']\n")
    gate = PromptGate.load(path)
    assert gate.categories == ("boats",)
    assert gate.decide("Two sailboats race").matched == ("sailboats",)
    assert gate.decide("hull number 42 in fog").critical
    assert not gate.decide("a ferry tale of dragons").critical


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"categories": []}, "categories"),
        ({"categories": [{"name": "x", "critical": True}]}, "could never match"),
        ({"categories": [{"name": "x", "critical": True, "keywords": ["a"], "colour": "red"}]}, "unknown key"),
        ({"categories": [{"name": "x", "critical": "maybe", "keywords": ["a"]}]}, "categories.0.critical"),
        ({"categories": [{"name": "x", "critical": True, "patterns": ["(a"]}]}, "categories.0.patterns"),
        ({"categories": [{"name": "x", "critical": True, "patterns": ["(?=a)b"]}]}, "RE2"),
        ({"categories": [{"name": "x", "critical": True, "keywords": [" "]}]}, "keyword 0 is empty"),
        ({"categories": [{"name": "x", "critical": True, "keywords": ["a"]},
                         {"name": "x", "critical": False, "keywords": ["b"]}]}, "unique, repeated: x"),
        ({"version": 2, "categories": [{"name": "x", "critical": True, "keywords": ["a"]}]}, "version"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        PromptGate.from_dict(data, where="my-rules.yaml")
    assert "my-rules.yaml" in str(err.value)


def test_missing_file_and_bad_yaml_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        PromptGate.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("categories: [\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        PromptGate.load(bad)
    with pytest.raises(ValueError, match="mapping"):
        PromptGate.from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]


_BUNDLED = PromptGate.load()


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(max_size=300) | st.lists(st.sampled_from(["a", "car", "Mara", "Quill", "LOGO", "face", "-", " ",
                                                                 "free", "close-up", "of", "man", "plate", "B12"]),
                                                max_size=30).map("".join))
def test_any_text_gets_a_consistent_decision(prompt: str) -> None:
    gate = _BUNDLED
    decision = gate.decide(prompt)
    assert decision == gate.decide(prompt)
    assert set(decision.categories) <= set(gate.categories)
    assert decision.critical == any(c != "people" for c in decision.categories)
    assert bool(decision.categories) == bool(decision.matched)


def test_a_pathological_prompt_is_matched_in_linear_time(gate: PromptGate) -> None:
    """RE2: no rule can backtrack, so a long adversarial prompt is just long (no timing asserted, it just ends)."""
    decision = gate.decide("close-up " + "a " * 5000 + "!")
    assert not decision.critical
