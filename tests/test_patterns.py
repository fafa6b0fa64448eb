"""vidquant.patterns: shell patterns keep fnmatch semantics; ``re:`` patterns full-match in linear time (RE2)."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant import patterns
from vidquant.patterns import MAX_PATTERN_CHARS, compile_pattern, matches

NAMES = [
    "transformer.blocks.0.attn1.to_q",
    "transformer.blocks.12.attn2.to_out.0",
    "transformer.blocks.3.ffn.net.0.proj",
    "transformer_2.blocks.0.attn1.to_q",
    "transformer.proj_out",
]


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        ("*", NAMES),
        ("*attn1*", [NAMES[0], NAMES[3]]),  # '*' crosses dots
        ("transformer.*.to_q", [NAMES[0]]),
        ("*.blocks.?.*", [NAMES[0], NAMES[2], NAMES[3]]),
        ("*.blocks.[!0]*", [NAMES[1], NAMES[2]]),
        ("transformer.proj_out", [NAMES[4]]),
        ("proj_out", []),  # the whole name, not a part of it
        ("*.TO_Q", []),  # case-sensitive
    ],
)
def test_shell_patterns(pattern: str, matched: list[str]) -> None:
    compiled = compile_pattern(pattern)
    assert not compiled.is_regex
    assert [n for n in NAMES if compiled.matches(n)] == matched
    assert [n for n in NAMES if matches(pattern, n)] == matched


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        (r"re:transformer\.blocks\.\d+\.attn\d\..*", [NAMES[0], NAMES[1]]),
        (r"re:.*\.to_(q|out\.0)", [NAMES[0], NAMES[1], NAMES[3]]),
        ("re:attn1", []),  # full match: a regex matching part of the name does not select it
        ("re:transformer", []),
        (r"re:.*proj", [NAMES[2]]),
        (r"re:(?i).*PROJ_OUT", [NAMES[4]]),
    ],
)
def test_regex_patterns_match_the_whole_name(pattern: str, matched: list[str]) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.is_regex
    assert [n for n in NAMES if compiled.matches(n)] == matched


def test_alternation_full_match() -> None:
    """Full-match semantics, not 'first alternative then check the end' (which would miss "ab")."""
    assert matches("re:a|ab", "ab")
    assert matches("re:a|ab", "a")
    assert not matches("re:a|ab", "abc")


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("re:(.*)*x", "a" * 40),
        ("re:(a+)+$", "a" * 40 + "!"),
        ("re:(a|aa)*b", "a" * 40),
        ("re:(a*)*b", "a" * 10_000),
        ("re:(.*a){20}", "a" * 19 + "b" * 40),
        ("*a*a*a*a*a*a*a*a*a*b", "a" * 40),  # shell patterns: fnmatch's translation does not backtrack either
    ],
)
def test_no_catastrophic_backtracking(pattern: str, name: str) -> None:
    """Each would take from minutes to longer than the universe's age with Python's re; it must just complete."""
    assert not compile_pattern(pattern).matches(name)


@pytest.mark.parametrize(
    "regex",
    [r"(a)\1", r"(?P<x>a)(?P=x)", r"(?=a)a", r"(?!b)a", r"(?<=a)b", r"(?<!a)b", r"(?>a)", r"a++", r"a\Z", r"(?x) a"],
)
def test_syntax_re2_lacks_is_refused(regex: str) -> None:
    pattern = "re:" + regex
    with pytest.raises(ValueError, match=re.escape(repr(pattern)) + " uses regular-expression syntax that RE2 does"):
        compile_pattern(pattern)
    with pytest.raises(ValueError, match="RE2 does not support"):
        matches(pattern, "a")


@pytest.mark.parametrize("regex", ["(", "a)", "[a", "*a", "a{2,1}", "\\"])
def test_invalid_regex(regex: str) -> None:
    with pytest.raises(ValueError, match="^invalid regular expression in pattern " + re.escape(repr("re:" + regex))):
        compile_pattern("re:" + regex)


def test_bad_patterns() -> None:
    with pytest.raises(ValueError, match="^empty pattern$"):
        compile_pattern("")
    long = "a" * (MAX_PATTERN_CHARS + 1)
    with pytest.raises(ValueError, match=f"is {MAX_PATTERN_CHARS + 1} characters, more than {MAX_PATTERN_CHARS}"
                       ) as info:
        compile_pattern(long)
    assert len(str(info.value)) < 400  # the pattern is echoed cut short
    assert compile_pattern("a" * MAX_PATTERN_CHARS).matches("a" * MAX_PATTERN_CHARS)
    for value in (None, 3, b"*"):
        with pytest.raises(ValueError, match="a pattern must be a string"):
            compile_pattern(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a pattern must be a string"):
        matches(["*"], "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not valid Unicode"):
        compile_pattern("re:a\ud800")
    with pytest.raises(ValueError, match="not valid Unicode"):
        compile_pattern("re:.*").matches("a\ud800")


def test_re2_repetition_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"'re:a\{2000\}' uses .* RE2 does not support .*repetition counts over 1000"):
        compile_pattern("re:a{2000}")
    with pytest.raises(ValueError, match="re:"):
        compile_pattern("re:" + "((((((((((a{1000}){1000}){1000}){1000})))))))")


def test_matches_caches_compiled_patterns() -> None:
    patterns._cached.cache_clear()
    for name in NAMES:
        matches(r"re:.*\.attn\d\..*", name)
    info = patterns._cached.cache_info()
    assert (info.misses, info.hits) == (1, len(NAMES) - 1)


GLOB = st.lists(st.sampled_from(["a", "b", ".", "*", "?", "[ab]", "[!a]", "[", "]", "\\"]), max_size=8).map("".join)
NAME = st.text(alphabet="ab.[]\\", max_size=12)


@settings(max_examples=200, deadline=None)
@given(pattern=GLOB, name=NAME)
def test_shell_patterns_are_fnmatchcase(pattern: str, name: str) -> None:
    if pattern:
        assert compile_pattern(pattern).matches(name) == fnmatchcase(name, pattern)


REGEX = st.lists(st.sampled_from(["a", "b", ".", "*", "+", "?", "|", "(", ")", "(?:", "[ab]", "[^a]", "{2}", "\\."]),
                 min_size=1, max_size=10).map("".join)


@settings(max_examples=200, deadline=None)
@given(regex=REGEX, name=st.text(alphabet="ab.", max_size=10))
def test_regexes_agree_with_python_fullmatch(regex: str, name: str) -> None:
    """Where both engines accept a regex, RE2's answer is Python's ``re.fullmatch``; else one clear ValueError."""
    try:
        python = re.compile(regex)
    except re.error:
        python = None
    try:
        compiled = compile_pattern("re:" + regex)
    except ValueError as err:
        assert "regular" in str(err)
        return
    if python is not None:
        assert compiled.matches(name) == (python.fullmatch(name) is not None)
