"""Prompt sets: the three file formats, their errors, the bundled set and the hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vidquant.calib.prompts import (
    IDENTITY_SENSITIVE,
    SCENERY_MOTION,
    UNCATEGORIZED,
    categorize,
    category_group,
    default_prompts,
    load_prompts,
    prompt_categories,
    prompt_set_hash,
)

CAPTIONS = ["A red fox runs through snow.", "A neon sign reads OPEN.", "Waves at dusk, slow pan."]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_json_array_with_string_and_list_captions(tmp_path: Path) -> None:
    records = [{"cap": CAPTIONS[0], "path": "a.mp4"}, {"cap": [CAPTIONS[1], "second caption"]},
               {"cap": f"  {CAPTIONS[2]}\n"}]
    assert load_prompts(write(tmp_path, "set.json", json.dumps(records))) == CAPTIONS


def test_json_object_of_records(tmp_path: Path) -> None:
    """The OpenS2V layout: ids mapping to records."""
    records = {f"clip_{i}": {"cap": [c], "img_paths": []} for i, c in enumerate(CAPTIONS)}
    assert load_prompts(write(tmp_path, "set.json", json.dumps(records, indent=2))) == CAPTIONS


def test_json_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"cap": CAPTIONS[0]}), "", json.dumps({"prompt": CAPTIONS[1]}), json.dumps(CAPTIONS[2])]
    assert load_prompts(write(tmp_path, "set.jsonl", "\n".join(lines) + "\n")) == CAPTIONS


def test_text(tmp_path: Path) -> None:
    text = f"# a comment\n\n{CAPTIONS[0]}\n   # indented comment\n  {CAPTIONS[1]}  \n\n{CAPTIONS[2]}"
    assert load_prompts(write(tmp_path, "set.txt", text)) == CAPTIONS
    assert load_prompts(tmp_path / "set.txt") == load_prompts(str(tmp_path / "set.txt"))


def test_sniffing_when_the_extension_does_not_say(tmp_path: Path) -> None:
    as_jsonl = "\n".join(json.dumps({"cap": c}) for c in CAPTIONS)
    assert load_prompts(write(tmp_path, "a.data", json.dumps([{"cap": c} for c in CAPTIONS]))) == CAPTIONS
    assert load_prompts(write(tmp_path, "b.data", as_jsonl)) == CAPTIONS
    assert load_prompts(write(tmp_path, "c.json", as_jsonl)) == CAPTIONS  # JSON lines in a .json
    assert load_prompts(write(tmp_path, "d.jsonl", json.dumps([{"cap": c} for c in CAPTIONS]))) == CAPTIONS
    text = "[cinematic] a cat on a roof\n{dreamy} fog over a lake"  # text that merely looks like JSON
    assert load_prompts(write(tmp_path, "e.txt", text)) == text.splitlines()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found.*nope.txt"):
        load_prompts(tmp_path / "nope.txt")


@pytest.mark.parametrize(("name", "text"), [("empty.txt", ""), ("comments.txt", "# only\n\n#comments\n"),
                                            ("empty.json", "[]"), ("empty.jsonl", "\n\n")])
def test_empty_set(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ValueError, match=f"no prompts in .*{name}"):
        load_prompts(write(tmp_path, name, text))


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"malformed JSON in .*bad.json at line 3"):
        load_prompts(write(tmp_path, "bad.json", '[\n  {"cap": "a"},\n  {"cap": "b",}\n]'))
    lines = [json.dumps({"cap": "a"}), json.dumps({"cap": "b"}), '{"cap": "c"']
    with pytest.raises(ValueError, match=r"malformed JSON in .*bad.jsonl at line 3"):
        load_prompts(write(tmp_path, "bad.jsonl", "\n".join(lines)))


@pytest.mark.parametrize(("name", "text", "where"), [
    ("a.json", json.dumps([{"cap": "ok"}, {"caption": "wrong field"}]), "record 1"),
    ("b.json", json.dumps({"x1": {"cap": "ok"}, "x2": {"cap": []}}), "record 'x2'"),
    ("c.json", json.dumps([{"cap": "ok"}, {"cap": "   "}]), "record 1"),
    ("d.jsonl", "\n".join([json.dumps({"cap": "ok"}), json.dumps({"cap": 3})]), "line 2"),
    ("e.json", json.dumps({"cap": 5}), "record 'cap'"),
])
def test_record_without_caption_is_named(tmp_path: Path, name: str, text: str, where: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: {where} has no usable caption"):
        load_prompts(write(tmp_path, name, text))


def test_default_prompts() -> None:
    prompts = default_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert all(20 <= len(p.split()) <= 60 for p in prompts)
    assert not any(p.startswith("#") for p in prompts)
    assert sum("Mara Quill" in p for p in prompts) >= 5  # the recurring character


def test_prompt_set_hash() -> None:
    h = prompt_set_hash(CAPTIONS)
    assert len(h) == 64 and h == prompt_set_hash(list(CAPTIONS))
    assert h != prompt_set_hash(CAPTIONS[::-1])
    assert prompt_set_hash(["a\nb"]) != prompt_set_hash(["a", "b"])
    assert prompt_set_hash(default_prompts()) == prompt_set_hash(default_prompts())


def test_prompt_categories_of_the_bundled_set() -> None:
    categories = prompt_categories()
    assert set(categories) == set(default_prompts())  # every bundled prompt sits under a header
    assert categorize(default_prompts()[:1]) == ["character"] and categorize(["not bundled"]) == [UNCATEGORIZED]
    counts = {c: list(categories.values()).count(c) for c in set(categories.values())}
    assert counts["faces"] == 10 and counts["scenery"] == 8
    groups = {category_group(c) for c in counts}
    assert groups == {IDENTITY_SENSITIVE, SCENERY_MOTION}
    assert [c for c in counts if category_group(c) == IDENTITY_SENSITIVE] and category_group("x") == UNCATEGORIZED
    assert {c for c in counts if category_group(c) == IDENTITY_SENSITIVE} == {
        "character", "products-logos", "faces", "vehicles-plates", "signs-text", "animals-markings"}


def test_prompt_categories_of_a_user_file(tmp_path: Path) -> None:
    text = "first, before any header\n# ---- My  <shots> ----\nA red kite.\n\n# plain comment\nA blue kite.\n"
    path = write(tmp_path, "p.txt", text)
    assert prompt_categories(path) == {"A red kite.": "My <shots>", "A blue kite.": "My <shots>"}
    assert categorize(load_prompts(path), prompt_categories(path)) == [UNCATEGORIZED, "My <shots>", "My <shots>"]
    assert prompt_categories(write(tmp_path, "p.json", '["A red kite."]')) == {}
    assert prompt_categories(write(tmp_path, "plain.txt", "one\ntwo\n")) == {}
