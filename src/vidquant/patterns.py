"""Layer-selection patterns from user recipes: shell patterns, or ``re:`` regular expressions matched by RE2.

Python's ``re`` backtracks, so a recipe pattern like ``re:(.*)*x`` takes exponential time on a 40-character
layer name and hangs the planner. Regular expressions here go to Google RE2, which matches in time linear
in the name; the price is that backreferences, lookarounds, atomic groups and possessive quantifiers are
unavailable (such a pattern is refused with a message saying so). Shell patterns keep ``fnmatch.fnmatchcase``
semantics (``*`` crosses dots), whose translation avoids catastrophic backtracking since Python 3.9.
Both kinds must match the whole name.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import re2

logger = logging.getLogger(__name__)

REGEX_PREFIX = "re:"
MAX_PATTERN_CHARS = 1000
_SHOW = 200  # characters of a pattern echoed into a message

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # RE2 would print its parse errors to stderr; the ValueError says it all


@dataclass(frozen=True)
class Pattern:
    """A validated pattern; `matches` tells whether it matches a whole layer name."""

    text: str
    _match: Callable[[str], object] = field(repr=False, compare=False)

    @property
    def is_regex(self) -> bool:
        return self.text.startswith(REGEX_PREFIX)

    def matches(self, name: str) -> bool:
        """Whether the pattern matches all of ``name`` (linear time in ``name`` for regular expressions)."""
        try:
            return self._match(name) is not None
        except UnicodeEncodeError:  # RE2 works on UTF-8; a lone surrogate cannot be encoded
            raise ValueError(f"pattern {_show(self.text)}: name {_show(name)} is not valid Unicode") from None


def compile_pattern(pattern: str) -> Pattern:
    """Validate and compile ``pattern``; ValueError (naming the pattern) if it is empty, too long or invalid."""
    if not isinstance(pattern, str):
        raise ValueError(f"a pattern must be a string, got {type(pattern).__name__} {_show(repr(pattern))}")
    if not pattern:
        raise ValueError("empty pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern {_show(pattern)} is {len(pattern)} characters, more than {MAX_PATTERN_CHARS}")
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"pattern {_show(pattern)} is not valid Unicode (lone surrogate)") from None
    if not pattern.startswith(REGEX_PREFIX):
        return Pattern(pattern, re.compile(fnmatch.translate(pattern)).match)  # exactly fnmatch.fnmatchcase
    return Pattern(pattern, compile_regex(pattern[len(REGEX_PREFIX) :], shown=pattern).fullmatch)


def compile_regex(regex: str, *, case_sensitive: bool = True, shown: str | None = None) -> re2._Regexp:
    """``regex`` compiled by RE2 (linear-time search and match, for text from users as well as layer names);
    ValueError naming ``shown`` (default: the regex) when it is invalid or uses syntax RE2 lacks."""
    options = _RE2_OPTIONS
    if not case_sensitive:
        options = re2.Options()
        options.log_errors = False
        options.case_sensitive = False
    try:
        return re2.compile(regex, options)
    except re2.error as err:
        raise ValueError(_explain(shown or regex, regex, err)) from None


@functools.lru_cache(maxsize=4096)
def _cached(pattern: str) -> Pattern:
    return compile_pattern(pattern)


def matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` (shell pattern, or ``re:`` regular expression) matches the whole ``name``."""
    if not isinstance(pattern, str):  # unhashable values would fail in the cache with a TypeError
        compile_pattern(pattern)
    return _cached(pattern).matches(name)


def _explain(pattern: str, regex: str, err: Exception) -> str:
    """Why RE2 refused ``regex``: syntax Python accepts but RE2 lacks, or simply an invalid expression."""
    reason = err.args[0].decode("utf-8", "replace") if err.args and isinstance(err.args[0], bytes) else str(err)
    try:
        re.compile(regex)
    except (re.error, RecursionError, OverflowError, ValueError):
        return f"invalid regular expression in pattern {_show(pattern)}: {_cut(reason)}"
    return (
        f"pattern {_show(pattern)} uses regular-expression syntax that RE2 does not support ({_cut(reason)}); "
        "patterns are matched by RE2, which never backtracks (so none can hang) and so has no backreferences, "
        "lookahead/lookbehind, atomic groups, possessive quantifiers, \\Z (write \\z), (?x) or repetition "
        "counts over 1000"
    )


def _cut(text: str) -> str:
    return text if len(text) <= _SHOW else text[:_SHOW] + f"... ({len(text)} characters)"


def _show(text: str) -> str:
    return repr(_cut(text))
