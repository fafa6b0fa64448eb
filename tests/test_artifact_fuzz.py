"""Fuzzing real artifacts: a mutated state, statistics folder or recipe gives a clear error or the identical result.

Never another exception type and never a hang: each load runs under an alarm. The examples are bounded in
`make test`; ``-m slow`` runs many more.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.cli import app
from vidquant.models import tiny
from vidquant.recipes import load_recipe, recipe_names

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALARM_SECONDS = 60  # far above any load here: only a hang reaches it


@contextmanager
def no_hang() -> Iterator[None]:
    def timeout(*_: Any) -> None:
        raise AssertionError(f"hung for {ALARM_SECONDS} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(ALARM_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pipe = tiny.build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("artifacts")
    stats = calibrate(pipe, default_prompts(), CalibSettings(num_prompts=1, steps=2, height=32, width=32, frames=5,
                                                             bins=2), root / "stats", progress=False)
    state = vidquant.quantize(pipe, "tail-aware-hif4", stats)
    state.save(root / "state")
    return {"root": root, "stats": stats.fingerprint(), "state": state.fingerprint()}


# ---- mutations ---------------------------------------------------------------------------------------------

JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                        st.text(max_size=20), st.lists(st.integers(), max_size=3), st.just({}), st.just("../x"))


@st.composite
def byte_edit(draw) -> Callable[[bytes], bytes]:
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "append"]))
    where = draw(st.floats(0, 1))
    value = draw(st.integers(0, 255))
    length = draw(st.integers(1, 16))

    def edit(data: bytes) -> bytes:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip":
            return data[:i] + bytes([data[i] ^ (1 << (value % 8))]) + data[i + 1:] if data else data
        if kind == "truncate":
            return data[:i]
        if kind == "overwrite":
            return data[:i] + bytes([value]) * length + data[i + length:]
        return data + bytes([value]) * length

    return edit


@st.composite
def json_edit(draw) -> Callable[[Any], Any]:
    """Replace or delete the value at a random path of a JSON document."""
    choices = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=5))
    delete = draw(st.booleans())
    value = draw(JSON_VALUES)

    def edit(doc: Any) -> Any:
        node, path = doc, []
        for c in choices:
            if isinstance(node, dict) and node:
                key = sorted(node)[c % len(node)]
            elif isinstance(node, list) and node:
                key = c % len(node)
            else:
                break
            path.append(key)
            if not isinstance(node[key], dict | list):
                break
            node = node[key]
        if not path:
            return value
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return doc

    return edit


def mutated_copy(src: Path, dst: Path, file: str, edit: Callable[[bytes], bytes]) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    target = dst / file
    target.write_bytes(edit(target.read_bytes()))
    return dst


def load_state_or_error(path: Path, fingerprint: str) -> None:
    with no_hang():
        try:
            state = vidquant.load_state(path)
        except ValueError:
            return
    assert state.fingerprint() == fingerprint  # loaded: then it is the very same state


def load_stats_or_error(path: Path, fingerprint: str) -> None:
    with no_hang():
        try:
            stats = vidquant.load_stats(path)
        except ValueError:
            return
    assert stats.fingerprint() == fingerprint


# ---- properties --------------------------------------------------------------------------------------------


def check_state_bytes(artifacts, tmp_path: Path, file: str, edit) -> None:
    path = mutated_copy(artifacts["root"] / "state", tmp_path / "s", file, edit)
    load_state_or_error(path, artifacts["state"])


def check_state_json(artifacts, tmp_path: Path, edit) -> None:
    def rewrite(data: bytes) -> bytes:
        return json.dumps(edit(json.loads(data))).encode()

    path = mutated_copy(artifacts["root"] / "state", tmp_path / "s", "manifest.json", rewrite)
    load_state_or_error(path, artifacts["state"])


def check_stats_bytes(artifacts, tmp_path: Path, edit) -> None:
    path = mutated_copy(artifacts["root"] / "stats", tmp_path / "t", "stats.safetensors", edit)
    load_stats_or_error(path, artifacts["stats"])


def check_recipe(tmp_path: Path, name: str, edit) -> None:
    text = (Path(vidquant.__file__).parent / "recipes" / f"{name}.yaml").read_bytes()
    path = tmp_path / "r.yaml"
    path.write_bytes(edit(text))
    with no_hang(), suppress(ValueError):
        load_recipe(path)


def check_inspect(artifacts, tmp_path: Path, which: str, file: str, edit) -> None:
    path = mutated_copy(artifacts["root"] / which, tmp_path / "i", file, edit)
    with no_hang():
        result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code in (0, 2), result.output  # 1 would be an unhandled exception
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@FAST
@given(file=st.sampled_from(["manifest.json", "tensors.safetensors"]), edit=byte_edit())
def test_state_bytes(artifacts, tmp_path: Path, file: str, edit) -> None:
    check_state_bytes(artifacts, tmp_path, file, edit)


@FAST
@given(edit=json_edit())
def test_state_manifest_fields(artifacts, tmp_path: Path, edit) -> None:
    check_state_json(artifacts, tmp_path, edit)


@FAST
@given(edit=byte_edit())
def test_stats_bytes(artifacts, tmp_path: Path, edit) -> None:
    check_stats_bytes(artifacts, tmp_path, edit)


@FAST
@given(name=st.sampled_from(recipe_names()), edit=byte_edit())
def test_recipes(tmp_path: Path, name: str, edit) -> None:
    check_recipe(tmp_path, name, edit)


@FAST
@given(which=st.sampled_from(["state", "stats"]), edit=byte_edit())
def test_inspect(artifacts, tmp_path: Path, which: str, edit) -> None:
    file = "manifest.json" if which == "state" else "stats.safetensors"
    check_inspect(artifacts, tmp_path, which, file, edit)


@pytest.mark.slow
@SLOW
@given(file=st.sampled_from(["manifest.json", "tensors.safetensors"]), edit=byte_edit(), edit_json=json_edit(),
       name=st.sampled_from(recipe_names()))
def test_everything_longer(artifacts, tmp_path: Path, file: str, edit, edit_json, name: str) -> None:
    check_state_bytes(artifacts, tmp_path, file, edit)
    check_state_json(artifacts, tmp_path, edit_json)
    check_stats_bytes(artifacts, tmp_path, edit)
    check_recipe(tmp_path, name, edit)
