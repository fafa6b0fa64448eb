"""Write version-2 states (vidquant at commit a2f46cf) and the latents they give, for compatibility tests.

Run from a checkout of that commit: PYTHONPATH=<that checkout>/src python tests/data/make_v2_states.py tests/data
"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.models import tiny
from vidquant.recipes import Recipe, load_recipe

out = Path(sys.argv[1])
torch.set_num_threads(1)
settings = CalibSettings(num_prompts=2, steps=3, height=32, width=32, frames=5, bins=2)

def latents(pipe):
    return pipe(prompt="a red car with a licence plate", height=32, width=32, num_frames=5, num_inference_steps=3,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent").frames.float()

pipe = tiny.build_tiny_pipeline()
pipe.set_progress_bar_config(disable=True)
stats = calibrate(pipe, default_prompts(), settings, tempfile.mkdtemp(), progress=False)
expected = {}
for name in ("tail-aware-hif4", "svdquant-gptq-hif4"):
    data = load_recipe(name).to_dict()
    if data["method"] == "svdquant-gptq":
        data["clip_search"] = {**data["clip_search"], "bins": 2}
        data["lowrank"] = {**data["lowrank"], "iters": 2}
    state = vidquant.quantize(pipe, Recipe.model_validate(data), stats)
    state.save(out / f"state-v2-{name}")
    fresh = tiny.build_tiny_pipeline()
    fresh.set_progress_bar_config(disable=True)
    vidquant.apply(fresh, vidquant.load_state(out / f"state-v2-{name}"))
    expected[name] = latents(fresh)
save_file(expected, str(out / "state-v2-latents.safetensors"))
print("written with", vidquant.__file__)
