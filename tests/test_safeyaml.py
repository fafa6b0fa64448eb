"""vidquant.safeyaml: hostile YAML fails fast with a short ValueError naming the source, never a hang or crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant.safeyaml import load_yaml


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """The classic alias bomb: ~1 kB of text, width**levels strings once expanded."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_loads_plain_yaml(tmp_path: Path) -> None:
    text = "name: r\ninclude: ['*attn*', 're:blocks\\.\\d+\\..*']\nsmoothing: {alpha: 0.4, max_ratio: null}\n"
    want = {"name": "r", "include": ["*attn*", "re:blocks\\.\\d+\\..*"], "smoothing": {"alpha": 0.4, "max_ratio": None}}
    assert load_yaml(text, source="r.yaml") == want
    assert load_yaml(text.encode(), source="r.yaml") == want
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_yaml(path, source=str(path)) == want
    assert load_yaml("r.yaml", source="cli") == "r.yaml"  # a str is text, never taken for a file name
    assert load_yaml("", source="empty") is None


def test_merge_keys_and_small_aliases() -> None:
    text = "base: &b {alpha: 0.4, eps: 1.0e-5}\nx:\n  <<: *b\n  alpha: 0.5\ny: [*b, *b]\n"
    data = load_yaml(text, source="m.yaml")
    assert data["x"] == {"alpha": 0.5, "eps": 1.0e-5}
    assert data["y"] == [data["base"], data["base"]]


def test_billion_laughs_fails_fast() -> None:
    bomb = billion_laughs()
    assert len(bomb) < 1100
    with pytest.raises(ValueError, match=r"^bomb\.yaml: invalid YAML at line \d+, column \d+: more than 100000 nodes"
                       ) as info:
        load_yaml(bomb, source="bomb.yaml")
    assert len(str(info.value)) < 200


def test_alias_count_bounded() -> None:
    text = "a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n"
    with pytest.raises(ValueError, match="more than 100 aliases"):
        load_yaml(text, source="s")
    assert load_yaml(text, source="s", max_aliases=200)["b"] == [1] * 101


def test_node_count_bounded_without_aliases() -> None:
    with pytest.raises(ValueError, match="more than 1000 nodes"):
        load_yaml("[" + "1, " * 1000 + "1]", source="s", max_nodes=1000)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 20000 + "]" * 20000,
        "{a: " * 20000 + "1" + "}" * 20000,
        "- " * 20000 + "1\n",
        "".join(f"{' ' * i}a:\n" for i in range(200)) + " " * 200 + "b: 1\n",
    ],
    ids=["flow-sequences", "flow-mappings", "block-sequences", "block-mappings"],
)
def test_deep_nesting_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"^deep\.yaml: invalid YAML at line \d+, column \d+: nesting deeper than 64"):
        load_yaml(text, source="deep.yaml")


def test_depth_limit_is_configurable() -> None:
    assert load_yaml("[[[1]]]", source="s", max_depth=4) == [[[1]]]
    with pytest.raises(ValueError, match="nesting deeper than 3 levels"):
        load_yaml("[[[1]]]", source="s", max_depth=3)


def test_duplicate_keys() -> None:
    with pytest.raises(ValueError, match=r"^r\.yaml: invalid YAML at line 3, column 1: duplicate key 'alpha'$"):
        load_yaml("alpha: 0.4\neps: 1\nalpha: 0.5\n", source="r.yaml")
    with pytest.raises(ValueError, match="line 2, column 5: duplicate key 'a'"):
        load_yaml("x: {a: 1,\n    a: 2}\n", source="s")
    with pytest.raises(ValueError, match="duplicate key '1.0'"):
        load_yaml("1: a\n1.0: b\n", source="s")  # equal as Python keys, as in recipes/schema.py's loader


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['echo pwned']",
        "a: !!python/name:os.system",
        "a: !!python/tuple [1, 2]",
        "a: !custom 1",
    ],
)
def test_python_and_unknown_tags_refused(text: str) -> None:
    with pytest.raises(ValueError, match="^t.yaml: invalid YAML at line 1, .*could not determine a constructor"):
        load_yaml(text, source="t.yaml")


def test_oversize_text_refused_before_parsing(tmp_path: Path) -> None:
    big = "a: " + "x" * 1_000_000
    with pytest.raises(ValueError, match=r"^big: 1000003 bytes of YAML, more than the 1000000-byte limit$"):
        load_yaml(big, source="big")
    with pytest.raises(ValueError, match="more than the 1000000-byte limit"):
        load_yaml(big.encode(), source="big")
    with pytest.raises(ValueError, match="more than the 10-byte limit"):
        load_yaml("é" * 6, source="utf8", max_bytes=10)  # counted in UTF-8 bytes, not characters
    path = tmp_path / "big.yaml"
    path.write_text(big)
    with pytest.raises(ValueError, match="big.yaml: 1000003 bytes"):
        load_yaml(path, source=str(path))


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.yaml: unreadable"):
        load_yaml(tmp_path / "missing.yaml", source="missing.yaml")
    with pytest.raises(ValueError, match="dir: not a regular file"):
        load_yaml(tmp_path, source="dir")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [1, *a]\n", "alias a refers to a node that contains it"),
        ("? [1, 2]\n: x\n", "found unhashable key"),
        ("a: 1\n---\nb: 2\n", "expected a single document"),
        ("a: \x00\n", "unacceptable character #x0000"),
        (b"a: \xff\n", "invalid start byte"),
        ("a: 2001-13-45\n", "line 1, column 4: invalid timestamp: month must be in 1..12"),
        ("a: 1" + ":1" * 100_000 + "\n", "a number of 200001 characters"),
        ("a: 1" + ":1" * 100_000 + ".5\n", "a number of 200003 characters"),
        ("a: " + "1" * 5000 + "\n", "a number of 5000 characters"),
        ("a: !!int '0x'\n", "invalid int"),
        ("a: [1, 2\n", "line 2, column 1: while parsing a flow sequence"),
        ("a: *" + "x" * 100_000 + "\n", r"found undefined alias 'x{100,}\.\.\. \(100\d\d\d characters\)$"),
    ],
)
def test_errors_are_short_value_errors(text: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_yaml(text, source="s.yaml")
    assert str(info.value).startswith("s.yaml: invalid YAML") and len(str(info.value)) < 600


YAMLISH = st.lists(
    st.sampled_from(list("ab01:-[]{},&*!?|>'\"#.%@ \n\t<=~") + ["!!python/", "<<", "0x", "&a", "*a", ".nan", "\n  "]),
    max_size=80,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=YAMLISH)
def test_fuzz_value_error_or_safe_load_result(text: str) -> None:
    """Random YAML-ish text: a ValueError, or exactly what PyYAML's safe_load makes of it."""
    try:
        data = load_yaml(text, source="fuzz")
    except ValueError as err:
        assert str(err).startswith("fuzz: ") and len(str(err)) < 1000
        return
    assert repr(data) == repr(yaml.safe_load(text))


@settings(max_examples=100, deadline=None)
@given(levels=st.integers(2, 12), width=st.integers(2, 12))
def test_fuzz_alias_bombs(levels: int, width: int) -> None:
    """Any bomb shape either loads (small expansion) or is refused; never a hang."""
    try:
        data = load_yaml(billion_laughs(levels, width), source="bomb")
    except ValueError as err:
        assert "aliases" in str(err) or "nodes" in str(err)
        return
    assert width**levels <= 100_000
    assert len(data) == levels
