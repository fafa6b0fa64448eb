"""The prompt gate: identity-critical prompts skip the W4A4 draft and go straight to the higher precision.

W4A4 keeps motion and aesthetics but loses subject identity first (HiF4 paper: VBench subject consistency
0.93 -> 0.53), so a prompt whose point is a particular subject (a face, a named character, a logo or brand,
legible text, a vehicle and its plate, an animal's markings) is not worth drafting at 4 bits. The rules are data
(``rules.yaml`` next to this module, or a user's file): categories of keywords and RE2 regular expressions
(linear time, so a user's rule cannot hang the router), matched on word boundaries, case-insensitively unless a
pattern is declared case-sensitive; each category says whether it is identity-critical. Exclusions remove false
friends ("car-free", "portrait orientation"). Measured on the bundled prompts' categories in
``tests/route/test_gate.py`` (precision / recall in the README).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidquant.patterns import compile_regex
from vidquant.safeyaml import load_yaml
from vidquant.validation import describe

logger = logging.getLogger(__name__)

RULES = "rules.yaml"
MAX_PROMPT_CHARS = 20_000  # a prompt longer than this is cut before matching (a bound, not a rule)


@dataclass(frozen=True)
class GateDecision:
    """What the gate made of one prompt."""

    critical: bool  # identity-critical: route straight to the higher precision
    categories: tuple[str, ...]  # rule categories that matched, in rule order
    matched: tuple[str, ...]  # the prompt text each rule matched (for the routing report's "why")


class CategoryRule(BaseModel):
    """One category: its keywords and patterns, exclusions, and whether a match is identity-critical."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=80)
    critical: bool
    keywords: list[str] = Field(default_factory=list, max_length=2000)
    patterns: list[str] = Field(default_factory=list, max_length=200)
    case_sensitive_patterns: list[str] = Field(default_factory=list, max_length=200)
    exclude: list[str] = Field(default_factory=list, max_length=200)

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, value: list[str]) -> list[str]:
        for i, word in enumerate(value):
            if not word.strip():
                raise ValueError(f"keyword {i} is empty")
        return value

    @field_validator("patterns", "exclude")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for regex in value:
            compile_regex(regex, case_sensitive=False)  # ValueError names the pattern
        return value

    @field_validator("case_sensitive_patterns")
    @classmethod
    def _case_regexes(cls, value: list[str]) -> list[str]:
        for regex in value:
            compile_regex(regex)
        return value

    @model_validator(mode="after")
    def _something(self) -> CategoryRule:
        if not (self.keywords or self.patterns or self.case_sensitive_patterns):
            raise ValueError(f"category {self.name!r} has no keywords and no patterns: it could never match")
        return self


class GateRules(BaseModel):
    """A rules file: its version and the categories, in the order the report lists them."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    categories: list[CategoryRule] = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _unique(self) -> GateRules:
        names = [c.name for c in self.categories]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"category names must be unique, repeated: {', '.join(dupes)}")
        return self


@dataclass(frozen=True)
class _Compiled:
    name: str
    critical: bool
    searches: tuple[Any, ...]  # RE2 regexes whose matches count
    excludes: tuple[Any, ...]


class PromptGate:
    """Decides per prompt whether it is identity-critical (`decide`); build it with `load` or `from_dict`."""

    def __init__(self, rules: GateRules, where: str = "rules") -> None:
        self.rules = rules
        self.where = where
        self._compiled = tuple(_compile(c) for c in rules.categories)

    @classmethod
    def load(cls, path: str | Path | None = None) -> PromptGate:
        """The rules of a YAML file (None: the bundled ``rules.yaml``), validated; ValueError naming the file."""
        if path is None:
            source = resources.files(__package__) / RULES
            return cls.from_dict(load_yaml(source.read_text(encoding="utf-8"), source="bundled gate rules"),
                                 where="bundled gate rules")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"gate rules file not found: {path}")
        return cls.from_dict(load_yaml(path, source=str(path)), where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "rules") -> PromptGate:
        """Validated rules from a mapping (as read from YAML); ValueError naming ``where`` and the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: gate rules must be a mapping with 'categories', got {type(data).__name__}")
        try:
            rules = GateRules.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"{where}: invalid gate rules: {describe(err, limit=10)}") from None
        return cls(rules, where)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(c.name for c in self._compiled)

    def decide(self, prompt: str) -> GateDecision:
        """Which categories match ``prompt`` (whole words, exclusions removed) and whether any is critical."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        text = prompt[:MAX_PROMPT_CHARS]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # RE2 works on UTF-8; a lone surrogate cannot be encoded
            text = text.encode("utf-8", "replace").decode("utf-8")
        categories, matched, critical = [], [], False
        for rule in self._compiled:
            hits = _hits(rule, text)
            if hits:
                categories.append(rule.name)
                matched.extend(h for h in hits if h not in matched)
                critical = critical or rule.critical
        decision = GateDecision(critical, tuple(categories), tuple(matched))
        logger.debug("gate: %r -> %s", text[:80], decision)
        return decision


def _compile(rule: CategoryRule) -> _Compiled:
    searches = []
    if rule.keywords:
        words = "|".join(_keyword(k) for k in sorted(set(rule.keywords), key=len, reverse=True))
        searches.append(compile_regex(rf"\b(?:{words})(?:s|es)?\b", case_sensitive=False))
    searches += [compile_regex(p, case_sensitive=False) for p in rule.patterns]
    searches += [compile_regex(p) for p in rule.case_sensitive_patterns]
    excludes = tuple(compile_regex(p, case_sensitive=False) for p in rule.exclude)
    return _Compiled(rule.name, rule.critical, tuple(searches), excludes)


def _keyword(word: str) -> str:
    """A keyword as a regex: escaped, any run of spaces matching any whitespace."""
    return r"\s+".join(re2.escape(part) for part in word.split())


def _hits(rule: _Compiled, text: str) -> list[str]:
    """The text of every match of the rule outside its excluded spans, in order, without repeats."""
    spans = [m.span() for ex in rule.excludes for m in ex.finditer(text)]
    hits: list[str] = []
    for regex in rule.searches:
        for m in regex.finditer(text):
            start, end = m.span()
            if any(start < e and s < end for s, e in spans):
                continue
            whole = m.group("hit") if "hit" in regex.groupindex and m.group("hit") is not None else m.group()
            hit = " ".join(whole.split()).strip(" ,;:")
            if hit and hit not in hits:
                hits.append(hit)
    return hits
