"""Calibration prompt sets: loading them from files, the bundled default set, and a content hash.

Accepted files:

- JSON (``.json``): an array of records, or an object mapping ids to records (the OpenS2V layout);
- JSON lines (``.jsonl``): one record per line;
- text (any other extension): one prompt per line; blank lines and lines starting with ``#`` skipped.

A record is a bare string or an object with a ``cap`` field (a string, or a list of strings of which
the first is taken) or a ``prompt`` field. A file whose extension does not match its content is read
as whichever of the three formats parses (JSON, then JSON lines, then text for an unknown extension).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path

_CAPTION_FIELDS = ("cap", "prompt")
Parser = Callable[[str, Path], list[str]]


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSON, JSON-lines or text file (see the module docstring); ValueError naming the
    file, and the line or record, when the file is missing, empty, malformed, or lacks a caption."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path}: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        prompts = _first_that_parses(text, path, (_parse_json, _parse_json_lines))
    elif suffix == ".jsonl":
        prompts = _first_that_parses(text, path, (_parse_json_lines, _parse_json))
    elif text.lstrip().startswith(("[", "{", '"')):
        prompts = _first_that_parses(text, path, (_parse_json, _parse_json_lines, _parse_text))
    else:
        prompts = _parse_text(text, path)
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def default_prompts() -> list[str]:
    """The bundled calibration prompts (``data/default_prompts.txt``)."""
    source = resources.files(__package__) / "data" / "default_prompts.txt"
    return _parse_text(source.read_text(encoding="utf-8"))


UNCATEGORIZED = "uncategorized"
IDENTITY_SENSITIVE = "identity-sensitive"
SCENERY_MOTION = "scenery / motion"
# Short names of the bundled set's `# ---- <header> ----` sections (first word of the header, lower case) and
# whether the section is identity-sensitive: what low-bit video models lose first (HiF4 paper: subject
# consistency 0.93 -> 0.53) against scenes where no particular subject has to stay itself.
_BUNDLED_CATEGORIES = {
    "mara": ("character", True), "products": ("products-logos", True), "faces": ("faces", True),
    "vehicles": ("vehicles-plates", True), "signs": ("signs-text", True), "animals": ("animals-markings", True),
    "landscapes": ("scenery", False), "city": ("city-motion", False), "interiors": ("interiors-craft", False),
    "fantasy": ("fantasy-animation", False),
}
_HEADER = re.compile(r"^#\s*-{3,}\s*(?P<title>.*?)\s*-*\s*$")


def prompt_categories(path: str | Path | None = None) -> dict[str, str]:
    """Each prompt's category from the ``# ---- <category> ----`` headers of a text prompt file (default: the
    bundled set), so that reports can break results down by what a prompt tests; {} for a file without them.

    A bundled header maps to its short name (`category_group` says which are identity-sensitive); any other
    header is its own category, named by its text. Prompts before the first header have none.
    """
    if path is None:
        text = (resources.files(__package__) / "data" / "default_prompts.txt").read_text(encoding="utf-8")
    else:
        path = Path(path)
        if path.suffix.lower() in (".json", ".jsonl"):
            return {}
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {path}: {e}") from None
    categories: dict[str, str] = {}
    current = None
    for line in (raw.strip() for raw in text.splitlines()):
        if match := _HEADER.match(line):
            title = match["title"]
            known = _BUNDLED_CATEGORIES.get(title.split(" ", 1)[0].rstrip(",").lower()) if path is None else None
            current = known[0] if known else (" ".join(title.split())[:60] or None)
        elif line and not line.startswith("#") and current is not None:
            categories.setdefault(line, current)
    return categories


def categorize(prompts: list[str], categories: dict[str, str] | None = None) -> list[str]:
    """The category of each prompt (`prompt_categories` of the bundled set unless given); "uncategorized" for
    prompts it does not know, e.g. those of a user's file without headers."""
    known = prompt_categories() if categories is None else categories
    return [known.get(p.strip(), UNCATEGORIZED) for p in prompts]


def category_group(category: str) -> str:
    """"identity-sensitive" (recurring character, products and logos, faces, vehicles and plates, signs and text,
    animal markings), "scenery / motion" (the bundled set's other sections), else "uncategorized"."""
    for name, identity in _BUNDLED_CATEGORIES.values():
        if category == name:
            return IDENTITY_SENSITIVE if identity else SCENERY_MOTION
    return UNCATEGORIZED


def prompt_set_hash(prompts: list[str]) -> str:
    """sha256 (hex) of the prompts in order, joined as a compact UTF-8 JSON array so that prompts with
    newlines or commas cannot collide with a different split."""
    joined = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def _first_that_parses(text: str, path: Path, parsers: tuple[Parser, ...]) -> list[str]:
    """The result of the first parser that succeeds; the first parser's error if none does."""
    errors = []
    for parse in parsers:
        try:
            return parse(text, path)
        except ValueError as e:
            errors.append(e)
    raise errors[0]


def _parse_json(text: str, path: Path) -> list[str]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(doc, list):
        return [_caption(record, f"{path}: record {i}") for i, record in enumerate(doc)]
    if isinstance(doc, dict):
        return [_caption(record, f"{path}: record {key!r}") for key, record in doc.items()]
    raise ValueError(f"{path}: expected a JSON array or object of records, got {type(doc).__name__}")


def _parse_json_lines(text: str, path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON in {path} at line {number}, column {e.colno}: {e.msg}") from None
        prompts.append(_caption(record, f"{path}: line {number}"))
    return prompts


def _parse_text(text: str, _path: Path | None = None) -> list[str]:
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def _caption(record: object, where: str) -> str:
    """The caption of one record: a string, or the ``cap`` / ``prompt`` field (first item of a list)."""
    if isinstance(record, dict):
        field = next((record[f] for f in _CAPTION_FIELDS if f in record), None)
        if isinstance(field, list):
            field = field[0] if field else None
        record = field
    if isinstance(record, str) and record.strip():
        return record.strip()
    raise ValueError(f"{where} has no usable caption (a non-empty string, or a 'cap' or 'prompt' field)")
