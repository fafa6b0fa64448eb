"""Validate the weight-free identity signal (`vidquant.eval.identity`) against the HOG subject-consistency proxy.

1. Synthetic clips (`vidquant.eval.identity_synth`): a photographed subject moving over a background, with
   nuisances that keep identity (motion, camera pan, noise, blur, a lighting ramp, all of them) and changes that
   do not (subject swapped halfway, a gradual morph into another subject, a hue rotation, a silhouette change).
   Per frame size, the AUC of telling the two apart (1.0: every identity-keeping clip scores above every
   changed one) for identity_consistency, the HOG proxy, identity_drift vs the clean clip and the HOG proxy's
   drop vs the clean clip. The cue constants were set on the "tuning" subject pair; AUCs are on held-out subjects
   and backgrounds.
2. Quantized vs BF16 on the tiny Wan2.2 pipeline (random weights: its videos are smooth noise-like textures, so
   this shows whether each signal tracks the size of the change, not whether it sees a face change): per
   (recipe, prompt) pair identity_drift(BF16, quantized), the HOG proxy's |delta| and identity_consistency's
   |delta|, and their Spearman rank correlation with the drop vs BF16 (1 - SSIM, and -PSNR). Also the relative
   change of each proxy's mean per recipe: its noise when the recipe is near-lossless (hif8).

    python bench/identity.py [--sizes 16 64 128] [--prompts 8] [--frames 17] [--skip-models | --skip-synthetic]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time

import numpy as np
from scipy.stats import spearmanr

from vidquant.eval.identity import identity_consistency, identity_drift
from vidquant.eval.identity_synth import Clip, render
from vidquant.eval.metrics import psnr, ssim, subject_consistency_proxy
from vidquant.progress import progress_bar

logger = logging.getLogger(__name__)

TUNING = [("astronaut", "cat", "grass")]
HELD_OUT = [("coffee", "rocket", "brick"), ("motorcycle", "stain", "gravel"), ("rocket", "astronaut", "moon"),
            ("cat", "coffee", "moon")]
KEEP = {"move": {}, "still": {"travel": 0.0}, "pan": {"pan": 0.4}, "noise": {"noise": 20.0}, "blur": {"blur": 1.5},
        "light": {"light": 0.4}, "busy-bg": {"busy": 1.0},
        "all": {"pan": 0.3, "noise": 15.0, "blur": 1.0, "light": 0.3}}
CHANGE = {"swap": {"change": "swap"}, "morph": {"change": "morph"}, "colour": {"change": "colour"},
          "shape": {"change": "shape"}, "swap+noise": {"change": "swap", "noise": 15.0}}
RECIPES = ["hif8", "tail-aware-hif4", "rtn-hif4", "max-mxfp4", "rtn-nvfp4", "bad-int4"]


def auc(positive: list[float], negative: list[float]) -> float:
    """P(positive > negative) over all pairs, ties counting half (the Mann-Whitney AUC)."""
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(positive, negative))
    return wins / (len(positive) * len(negative))


def synthetic(sizes: list[int], frames: int) -> None:
    for size in sizes:
        for label, sets in (("tuning", TUNING), ("held-out", HELD_OUT)):
            rows: dict[str, dict[str, list[float]]] = {}
            with progress_bar() as bar:
                task = bar.add_task(f"synthetic {size}px {label}", total=len(sets) * (len(KEEP) + len(CHANGE)))
                for subject, other, background in sets:
                    base = dict(subject=subject, other=other, background=background, size=size, frames=frames)
                    clean = render(Clip(**base))
                    hog_clean = subject_consistency_proxy(clean)
                    for name, kw in {**KEEP, **CHANGE}.items():
                        video = render(Clip(**base, **kw))
                        hog = subject_consistency_proxy(video)
                        row = rows.setdefault(name, {"id": [], "hog": [], "drift": [], "hog_drop": []})
                        row["id"].append(identity_consistency(video))
                        row["hog"].append(hog)
                        row["drift"].append(identity_drift(clean, video))
                        row["hog_drop"].append(hog_clean - hog)
                        bar.advance(task)
            print(f"\n{size}x{size}x{frames}, {label} subjects ({len(sets)}): mean over subjects")
            print(f"{'clip':12}{'identity':>10}{'HOG proxy':>11}{'id drift':>10}{'HOG drop':>10}")
            for name, row in rows.items():
                kind = "keeps" if name in KEEP else "changes"
                print(f"{name:12}{np.mean(row['id']):10.3f}{np.mean(row['hog']):11.3f}{np.mean(row['drift']):10.3f}"
                      f"{np.mean(row['hog_drop']):10.3f}   identity {kind}")
            for changes in (["swap", "morph", "swap+noise"], ["colour"], ["shape"]):
                keep = {k: [v for n in KEEP for v in rows[n][k]] for k in ("id", "hog", "drift", "hog_drop")}
                gone = {k: [v for n in changes for v in rows[n][k]] for k in keep}
                print(f"AUC keep vs {'/'.join(changes):22} identity {auc(keep['id'], gone['id']):.2f}  "
                      f"HOG {auc(keep['hog'], gone['hog']):.2f}  id drift {auc(gone['drift'], keep['drift']):.2f}  "
                      f"HOG drop {auc(gone['hog_drop'], keep['hog_drop']):.2f}")


def quantized_pairs(num_prompts: int, frames: int, steps: int, size: int) -> None:
    import vidquant
    from vidquant.calib.prompts import categorize, default_prompts
    from vidquant.calib.settings import CalibSettings
    from vidquant.eval.generate import to_uint8
    from vidquant.eval.protocol import Protocol
    from vidquant.models import load_model
    from vidquant.recipes.schema import load_recipe

    everything = default_prompts()
    prompts = everything[:: max(1, len(everything) // num_prompts)][:num_prompts]  # across the categories
    calib = everything[1::7][:4]  # other prompts than the evaluated ones
    protocol = Protocol(height=size, width=size, frames=frames, steps=steps, seed=0)
    settings = CalibSettings(height=size, width=size, frames=frames, steps=steps, seed=100, num_prompts=len(calib))

    def videos(pipe) -> list[np.ndarray]:
        pipe.set_progress_bar_config(disable=True)
        return [to_uint8(pipe(**protocol.call_kwargs(pipe, p, protocol.seed_for(i)), output_type="np").frames[0])
                for i, p in enumerate(prompts)]

    start = time.perf_counter()
    pipe = load_model("tiny")
    stats = vidquant.calibrate(pipe, calib, settings=settings)
    bf16 = videos(pipe)
    ref_scores = {"hog": [subject_consistency_proxy(v) for v in bf16], "id": [identity_consistency(v) for v in bf16]}
    pairs = []  # (recipe, prompt index, metrics)
    means = {}
    with progress_bar() as bar:
        task = bar.add_task("recipes", total=len(RECIPES))
        for name in RECIPES:
            if name == "bad-int4":  # deliberately bad: per-row INT4 W4A4 round-to-nearest, outliers unhandled
                recipe = load_recipe("rtn-hif4").model_copy(update={"name": name, "weights": "int4",
                                                                   "activations": "int4"})
            else:
                recipe = load_recipe(name)
            model = load_model("tiny")
            vidquant.apply(model, vidquant.quantize(model, recipe, stats))
            quant = videos(model)
            rows = []
            for i, (ref, test) in enumerate(zip(bf16, quant, strict=True)):
                hog, ident = subject_consistency_proxy(test), identity_consistency(test)
                rows.append({"drift": identity_drift(ref, test), "hog_delta": hog - ref_scores["hog"][i],
                             "id_delta": ident - ref_scores["id"][i], "ssim_drop": 1 - ssim(ref, test),
                             "psnr": psnr(ref, test), "hog": hog, "id": ident})
            pairs += [(name, i, r) for i, r in enumerate(rows)]
            means[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            bar.advance(task)
    print(f"\ntiny Wan2.2, {size}x{size}x{frames}, {steps} steps, {len(prompts)} prompts "
          f"({', '.join(sorted(set(categorize(prompts))))}), BF16 vs each recipe ({time.perf_counter() - start:.0f} s)")
    hog_ref, id_ref = np.mean(ref_scores["hog"]), np.mean(ref_scores["id"])
    print(f"{'recipe':18}{'PSNR dB':>9}{'1-SSIM':>8}{'id drift':>10}{'HOG rel':>9}{'ident rel':>10}")
    for name, m in means.items():
        print(f"{name:18}{m['psnr']:9.2f}{m['ssim_drop']:8.3f}{m['drift']:10.3f}"
              f"{(m['hog'] - hog_ref) / hog_ref:+9.2%}{(m['id'] - id_ref) / id_ref:+10.2%}")
    print(f"BF16 means: HOG proxy {hog_ref:.3f}, identity_consistency {id_ref:.3f}")
    finite = [r for _, _, r in pairs if np.isfinite(r["psnr"])]
    for label, drop in (("1 - SSIM", [r["ssim_drop"] for r in finite]), ("-PSNR", [-r["psnr"] for r in finite])):
        for signal, values in (("identity_drift", [r["drift"] for r in finite]),
                               ("|HOG proxy delta|", [abs(r["hog_delta"]) for r in finite]),
                               ("HOG proxy drop", [-r["hog_delta"] for r in finite]),
                               ("|identity_consistency delta|", [abs(r["id_delta"]) for r in finite])):
            rho, p = spearmanr(values, drop)
            print(f"Spearman vs {label:9} {signal:30} rho {rho:+.2f} (p {p:.1g}, n {len(finite)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 128], help="synthetic frame sides")
    parser.add_argument("--clip-frames", type=int, default=16, help="frames per synthetic clip")
    parser.add_argument("--prompts", type=int, default=8, help="bundled prompts generated per recipe")
    parser.add_argument("--size", type=int, default=64, help="tiny-model frame side")
    parser.add_argument("--frames", type=int, default=17, help="tiny-model frames")
    parser.add_argument("--steps", type=int, default=4, help="tiny-model denoising steps")
    parser.add_argument("--skip-models", action="store_true", help="synthetic clips only")
    parser.add_argument("--skip-synthetic", action="store_true", help="quantized-vs-BF16 pairs only")
    args = parser.parse_args()
    if not args.skip_synthetic:
        synthetic(args.sizes, args.clip_frames)
    if not args.skip_models:
        quantized_pairs(args.prompts, args.frames, args.steps, args.size)


if __name__ == "__main__":
    main()
