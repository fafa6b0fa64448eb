"""What a calibration pass runs: prompts through a pipeline's generation protocol, or the user's forward loop.

Prompts (a list of strings) go to video pipelines: prompt i is generated with seed ``protocol.seed_for(i)``
(the one per-prompt seed rule of calibration, capture and generation), latents only. A forward loop goes to
any model: a callable ``loop(model)`` runs the user's own data, or an iterable of batches is fed as
``model(**batch)`` (a mapping), ``model(*batch)`` (a tuple or list) or ``model(batch)``. Iterables are hashed
as they are fed, so statistics and states can record (and later check) what they were made from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..checksum import hash_tensor
from ..eval.protocol import Protocol
from ..models import adapter_for
from .prompts import default_prompts, prompt_set_hash
from .settings import CalibSettings

ForwardLoop = Callable[[Any], Any] | Iterable[Any]
CalibData = list[str] | ForwardLoop


def is_prompts(data: Any) -> bool:
    """Whether ``data`` is a prompt list (rather than a forward loop)."""
    return isinstance(data, list | tuple) and bool(data) and all(isinstance(p, str) for p in data)


def generate(pipe: Any, prompt: str, protocol: Protocol, *, seed: int,
             on_step: Callable[[], None] | None = None) -> None:
    """One calibration generation under ``protocol``: latents only (the VAE adds nothing to what Linears see)."""

    def step_end(_pipe, _i, _t, callback_kwargs):
        if on_step is not None:
            on_step()
        return callback_kwargs

    kwargs = adapter_for(pipe).call_kwargs(protocol, prompt, seed)
    pipe(**kwargs, output_type="latent", callback_on_step_end=step_end)


def run_loop(model: Any, loop: ForwardLoop, on_batch: Callable[[], None] | None = None) -> str | None:
    """Run a forward loop under no_grad; the sha256 of the batches fed (None for a callable: its data is unseen)."""
    with torch.no_grad():
        if callable(loop) and not isinstance(loop, torch.Tensor):
            loop(model)
            return None
        digest = hashlib.sha256()
        count = 0
        for batch in loop:
            _hash_batch(digest, batch)
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, tuple | list):
                model(*batch)
            else:
                model(batch)
            count += 1
            if on_batch is not None:
                on_batch()
    if count == 0:
        raise ValueError("the forward loop yielded no batch: calibration needs at least one")
    return digest.hexdigest()


def _hash_batch(digest: Any, batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        hash_tensor(digest, batch)
    elif isinstance(batch, Mapping):
        for key in sorted(batch, key=str):
            digest.update(f"|{key}=".encode())
            _hash_batch(digest, batch[key])
    elif isinstance(batch, tuple | list):
        digest.update(f"|[{len(batch)}".encode())
        for item in batch:
            _hash_batch(digest, item)
    else:
        digest.update(f"|{batch!r}".encode())


def calibration_data(stats: Any, prompts: list[str] | None,
                     forward_loop: ForwardLoop | None) -> tuple[CalibData, CalibSettings]:
    """The data ``stats`` (a `CalibStats`) were calibrated on, checked by hash, and their settings: for a method's
    second pass or a held-out replay. Prompts default to the bundled ones; a forward loop must be given again."""
    settings = CalibSettings.model_validate(stats.meta["settings"])
    if stats.meta.get("data_kind", "prompts") == "forward_loop":
        if forward_loop is None:
            raise ValueError("these statistics come from a forward loop: pass the same forward_loop to quantize")
        return forward_loop, settings
    if forward_loop is not None and not is_prompts(forward_loop):
        raise ValueError("these statistics were calibrated on prompts: pass the prompts, not a forward loop")
    n = settings.num_prompts
    prompts = (default_prompts() if prompts is None else list(prompts))[:n]
    if prompt_set_hash(prompts) != stats.meta["prompt_set_hash"]:
        raise ValueError("these statistics were calibrated on other prompts than the ones given (prompt set hash "
                         "differs): pass the calibration prompts (--calib-prompts / --prompts) they were made from")
    return prompts, settings
