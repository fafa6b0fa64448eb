"""Build and generation time of the offline models (moved here from tests: never assert wall-clock time in a test).

Per tiny model: seconds to build it and to generate one video at its tiny protocol with 2 steps (median of 5),
and the medium Wan pipeline's build time (full-width A14B blocks).

    python bench/models.py [--medium]
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_seconds

from vidquant.eval.protocol import Protocol
from vidquant.models import TINY_MODELS, adapter_for, load_model, tiny_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--medium", action="store_true", help="Also time building the medium Wan pipeline.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':16}{'build s':>10}{'generate s':>12}  protocol")
    for name in TINY_MODELS:
        start = time.perf_counter()
        pipe = load_model(name)
        build = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        protocol = Protocol(steps=2, **tiny_sizes(name))
        kwargs = adapter_for(pipe).call_kwargs(protocol, "a red car", 0)
        seconds = median_seconds(lambda pipe=pipe, kwargs=kwargs: pipe(**kwargs, output_type="np"), repeats=5)
        print(f"{name:16}{build:10.2f}{seconds:12.3f}  {protocol.height}x{protocol.width}x{protocol.frames}, 2 steps")
    if args.medium:
        from vidquant.models.tiny import build_medium_pipeline

        start = time.perf_counter()
        build_medium_pipeline()
        print(f"medium Wan (1 full-width block per expert): built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
