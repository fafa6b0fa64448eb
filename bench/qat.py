"""PTQ vs PTQ + QAT (LoRA deltas, masks, clips distilled on the teacher's trajectories), side by side in one run.

For each tiny pipeline (`tiny`: Wan2.2 two experts, `tiny-wan21`: Wan2.1 one expert of 8 blocks) and each recipe
(HiF4 W4A4 tail-aware, HiF8 W8A8): calibrate, quantize (PTQ), fine-tune (`ptq.finetune`), then score both states
on data neither saw:

- held-out loss: the MSE of the expert output vs the BF16 teacher on held-out calls (calibration prompts under the
  held-out seeds), before (PTQ) and after (the best QAT step by that same held-out loss: it picks the step, so
  it is optimistic) — and the training loss before/after;
- layer SQNR (dB, mean and worst over the quantized Linears) on other prompts' inputs (`eval.fidelity.state_fidelity`);
- PSNR / SSIM / latent error of generated videos vs the BF16 videos on evaluation prompts held out of calibration
  (other prompts, other seeds), `eval.generate` + `eval.metrics`.

    python bench/qat.py [--steps 60 --lr 1e-3 --rank 4 --train lora,masks,clips]
    python bench/qat.py --full-size        # memory and FLOPs of one QAT step at Wan2.2 A14B shapes, from the shapes
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.eval.fidelity import state_fidelity
from vidquant.eval.generate import generate_videos
from vidquant.eval.metrics import compare_videos
from vidquant.eval.protocol import Protocol
from vidquant.models import load_model
from vidquant.ptq.finetune import QATSettings, finetune

CASES = {"tiny": ["tail-aware-hif4", "hif8"], "tiny-wan21": ["tail-aware-hif4", "boundary-hif8"]}


def fresh(model: str):
    pipe = load_model(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def videos(model: str, state, prompts: list[str], protocol: Protocol, out: Path) -> list:
    pipe = fresh(model)
    if state is not None:
        vidquant.apply(pipe, state, runtime="fake")
    return generate_videos(pipe, prompts, protocol, out, progress=False)


def score(model: str, state, prompts: list[str], calib: CalibSettings, protocol: Protocol, out: Path,
          bf16: list) -> dict:
    sqnr = [r["sqnr_db"] for r in state_fidelity(fresh(model), state, prompts, calib)]
    rows = [compare_videos(a, b) for a, b in zip(bf16, videos(model, state, prompts, protocol, out), strict=True)]
    return {"sqnr_mean": statistics.fmean(sqnr), "sqnr_worst": min(sqnr),
            **{k: statistics.fmean(r[k] for r in rows) for k in ("psnr", "ssim", "latent_rel_error")}}


GIB = 2**30


def full_size(tokens: int = 21 * 45 * 80, dim: int = 5120, ffn: int = 13824, blocks: int = 40, text: int = 512,
              rank: int = 4) -> None:
    """One QAT step of one Wan2.2 A14B expert (720p x 81 frames: 21 x 45 x 80 = 75600 tokens), from the shapes.

    Saved-for-backward tensors of one block are enumerated op by op for this implementation (BF16 activations;
    QuantLinear quantizes in fp32: the STE keeps a 1-byte in-range mask, or the fp32 input when a clip or a mask
    trains; F.linear keeps its BF16 input; SDPA keeps q, k, v, out). Everything else is exact arithmetic.
    """
    t, d, f = tokens, dim, ffn
    linears = [(d, d)] * 8 + [(f, d), (d, f)]  # attn1 q k v o, attn2 q k v o (k/v read the text), FFN up, down
    per_block = sum(n * k for n, k in linears)
    params = blocks * per_block
    bf16, act = 2, t * d * 2
    rows = []

    def quant_linear(k: int, fp32_saved: bool, n_tokens: int = t) -> int:  # xq (bf16) + the STE's saved tensor
        return n_tokens * k * bf16 + n_tokens * k * (4 if fp32_saved else 1)

    for what, fp32 in (("lora", False), ("lora+clips", True)):
        attn1 = act + 3 * quant_linear(d, fp32) + 2 * act + 2 * act + 4 * act + quant_linear(d, fp32) + 2 * act
        attn2 = act + quant_linear(d, fp32) + 2 * quant_linear(d, fp32, text) + act + quant_linear(d, fp32)
        ff = act + quant_linear(d, fp32) + 2 * t * f * bf16 + quant_linear(f, fp32) + 2 * act
        transient = t * f * 4 + 2 * act  # the fp32 copy of the widest input being quantized, two gradients
        rows.append((what, attn1 + attn2 + ff + transient))
    boundaries = blocks * act
    lora = rank * blocks * sum(n + k for n, k in linears)
    masks = blocks * (8 * d + d + f)
    def line(label: str, nbytes: float, tail: str = "") -> None:
        print(f"  {label:78s} {nbytes / GIB:7.2f} GiB{tail}")

    print(f"Wan2.2 A14B expert: {blocks} blocks x {per_block / 1e6:.1f} M target weights = {params / 1e9:.2f} B; "
          f"{t} tokens x {d}")
    line("base BF16 weights (the teacher; off the GPU while LoRA / clips train)", params * 2)
    for fmt, bits in (("hif4", 4.5), ("hif8", 8)):
        line(f"packed {fmt} weights (the frozen student)", params * bits / 8)
    line(f"block-boundary checkpoints ({blocks} x {t} x {d} BF16)", boundaries)
    for what, nbytes in rows:
        line(f"one block recomputed for backward, {what} (saved tensors, enumerated)", nbytes)
    line(f"LoRA rank {rank}: {lora / 1e6:.1f} M params x 16 B (fp32 value, grad, AdamW m, v)", lora * 16)
    line(f"LoRA rank 32: {lora * 8 / 1e6:.1f} M params x 16 B", lora * 8 * 16)
    line(f"masks: {masks / 1e6:.2f} M log-scales x 16 B", masks * 16)
    call = 2 * 16 * 21 * 90 * 160 * 4 + 512 * 4096 * 2
    line("one call: teacher output + latents (fp32) + text context (BF16)", call,
         f"; 32 calls in CPU memory {32 * call / GIB:.2f} GiB")
    linear_flops = 2 * t * per_block
    attention = 4 * t * t * d + 4 * t * text * d
    forward = blocks * (linear_flops + attention)
    print(f"  FLOPs: forward {forward / 1e15:.2f} PFLOP (Linears {blocks * linear_flops / 1e15:.2f}, attention "
          f"{blocks * attention / 1e15:.2f}); a step (forward + recompute + backward = 4 forwards) "
          f"{4 * forward / 1e15:.1f} PFLOP: {4 * forward / 400e12:.0f} s at 400 TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--train", default="lora,masks,clips")
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=4)
    parser.add_argument("--calib-steps", type=int, default=8)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--full-size", action="store_true", help="print the A14B memory / FLOP bound and exit")
    parser.add_argument("--tokens", type=int, default=21 * 45 * 80, help="--full-size: tokens per call (720p x 81)")
    args = parser.parse_args()
    if args.full_size:
        full_size(tokens=args.tokens, rank=args.rank)
        return
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    prompts = default_prompts()
    eval_prompts = prompts[args.calib_prompts:args.calib_prompts + args.eval_prompts]
    qat = QATSettings(steps=args.steps, lr=args.lr, rank=args.rank, train=tuple(args.train.split(",")),
                      calls_per_bin=4, held_out_prompts=2, held_out_per_bin=2, eval_every=10)
    print(f"QAT: {args.steps} steps, lr {args.lr}, rank {args.rank}, train {args.train}; calibration "
          f"{args.calib_prompts} prompts x {args.calib_steps} steps, 2 bins; evaluation {len(eval_prompts)} other "
          f"prompts, other seeds; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    header = (f"{'model':11s} {'recipe':16s} {'state':10s} {'train loss':>10s} {'held-out':>9s} {'SQNR mean':>9s} "
              f"{'worst':>6s} {'PSNR dB':>8s} {'SSIM':>7s} {'lat.err':>8s}  QAT s")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for model in args.models.split(","):
            sizes = {"height": 32, "width": 32, "frames": 9}
            calib = CalibSettings(num_prompts=args.calib_prompts, steps=args.calib_steps, bins=2, **sizes)
            protocol = Protocol(steps=args.calib_steps, seed=1234, **sizes)
            stats = calibrate(fresh(model), prompts, calib, root / model / "stats", progress=False)
            bf16 = videos(model, None, eval_prompts, protocol, root / model / "bf16")
            for recipe in CASES[model]:
                ptq = vidquant.quantize(fresh(model), recipe, stats)
                t0 = time.perf_counter()
                tuned = finetune(fresh(model), ptq, stats, qat)
                seconds = time.perf_counter() - t0
                loss = tuned.qat["loss"]
                for name, state in (("PTQ", ptq), (f"+QAT({tuned.qat['kept']})", tuned)):
                    s = score(model, state, eval_prompts, calib, protocol, root / model / recipe / name, bf16)
                    before = name == "PTQ"
                    train = loss["train_before" if before else "train_after"]
                    held = loss["held_out_before" if before else "held_out_after"]
                    line = (f"{model:11s} {recipe:16s} {name:10s} {train:10.5f} {held:9.5f} {s['sqnr_mean']:9.2f} "
                            f"{s['sqnr_worst']:6.2f} {s['psnr']:8.2f} {s['ssim']:7.4f} {s['latent_rel_error']:8.4f}"
                            + ("" if before else f"  {seconds:5.0f} (best step {tuned.qat['best_step']})"))
                    lines.append(line)
                    print(line, flush=True)
    print()
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
