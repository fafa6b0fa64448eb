"""Cost of the tail-aware HiF4 W4A4 system, measured side by side in one run (issue: tail-aware HiF4).

1. Time per denoising step (one expert forward) on the medium pipeline (full-width 5120 / 13824 blocks):
   BF16-reference model vs the same model with fake-quant W4A4 HiF4 (weights quantized once when the
   state is applied; activations through the fast path). Target: at most 1.5x.
2. Size of the PTQ state vs the BF16 transformer weights: measured on the medium pipeline and computed
   for Wan2.2-A14B shapes (two experts x 40 blocks). Target: under 1 % at A14B shapes.

The CPU has no fast bf16 matmul, so the medium model runs in fp32 here; the formats are the same.

    python bench/quantize.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import median_seconds

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.models import adapter_for, tiny
from vidquant.recipes import load_recipe, plan


def step_inputs(model, tokens: int) -> dict:
    """Inputs of one expert forward with ``tokens`` patch tokens: a 4 x 8 x tokens/8 latent, patches 1x2x2."""
    cfg = model.config
    latent = (1, cfg.in_channels, 4, 8, 2 * (tokens // 16))
    return {
        "hidden_states": torch.randn(latent, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([900.0]),
        "encoder_hidden_states": torch.randn(1, 512, cfg.text_dim, generator=torch.Generator().manual_seed(1)),
        "return_dict": False,
    }


def a14b_state_fraction() -> None:
    config = {**tiny.MEDIUM_EXPERT, "num_layers": 40, "in_channels": 16}
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        experts = {"transformer": WanTransformer3DModel.from_config(config),
                   "transformer_2": WanTransformer3DModel.from_config(config)}
    adapter = adapter_for(experts)
    the_plan = plan(adapter, load_recipe("tail-aware-hif4"))
    mask_bytes = sum(adapter.linear(n).in_features * 4 for n in the_plan.quantized)
    bf16 = sum(p.numel() * 2 for m in experts.values() for p in m.parameters())
    print(f"A14B shapes: {len(the_plan.quantized)} quantized Linears, state tensors {mask_bytes / 2**20:.1f} MiB "
          f"vs BF16 transformer weights {bf16 / 2**30:.1f} GiB: {100 * mask_bytes / bf16:.4f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    a14b_state_fraction()

    pipe = tiny.build_medium_pipeline(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        settings = CalibSettings(num_prompts=1, steps=2, height=32, width=32, frames=5, bins=1)
        stats = calibrate(pipe, default_prompts(), settings, Path(tmp) / "stats", progress=False)
        state = vidquant.quantize(pipe, "tail-aware-hif4", stats)
        state_dir = state.save(Path(tmp) / "state")
        on_disk = sum(f.stat().st_size for f in state_dir.iterdir())
    base = state.base["transformer_bf16_bytes"]
    print(f"medium (1 block per expert): state on disk {on_disk / 2**10:.1f} KiB vs BF16 transformer weights "
          f"{base / 2**20:.1f} MiB: {100 * on_disk / base:.4f} %")

    model = pipe.transformer
    inputs = step_inputs(model, args.tokens)
    with torch.no_grad():
        reference = median_seconds(lambda: model(**inputs))
        vidquant.apply(pipe, state, runtime="fake")  # the simulation; bench/runtime.py measures the packed one
        quantized = median_seconds(lambda: model(**inputs))
    print(f"medium step ({args.tokens} tokens, fp32 on CPU): reference {reference * 1e3:.0f} ms, "
          f"W4A4 HiF4 fake-quant {quantized * 1e3:.0f} ms: {quantized / reference:.2f}x")


if __name__ == "__main__":
    main()
