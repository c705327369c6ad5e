"""Speed of `polyp-ddpm generate` as a user runs it: pairs for every mask of a split, written as a dataset.

Times the whole command (model loading, compilation, sampling with per-image seeds, writing) once per mode:
`eager`; `compiled` (`--compile`, or `--compile-mode MODE`), whose images are compared with the eager ones
(the same seeds: what compilation changes, in levels of 255); and `compiled-warm`, the compiled command again,
whose compilation torch's on-disk cache (from the run before, on the same machine) makes short: what every
compiled run after the first costs. Without `--model` the denoiser is a preset with random weights, saved as a
pipeline first: speed does not depend on the weights. Defaults are the quick-64 study's generation (issue 10's
target: 898 pairs at 64 px with 250 DDPM steps in 30 s).

    python benchmarks/generate_loop.py --mask-dataset data/kvasir-seg-64
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk

from polyp_diffusers import PolypDDPMPipeline, make_polyp_scheduler, make_polyp_unet_from_preset
from polyp_diffusers.choices import COMPILE_MODES
from polyp_diffusers.data import load_polyp_dataset
from polyp_diffusers.modeling import UNET_PRESETS

from common import compile_cache_environment, default_device, write_results

MODES = ("eager", "compiled", "compiled-warm")


def image_difference(output: Path, reference: Path, split: str) -> dict:
    """How far one run's images are from another's, pair by pair, in levels of 255: what compiling changes."""
    ours, theirs = load_from_disk(str(output))[split], load_from_disk(str(reference))[split]
    if ours["id"] != theirs["id"]:
        raise ValueError(f"{output} and {reference} hold different pairs")
    differences = [
        np.abs(np.asarray(a["image"], np.int16) - np.asarray(b["image"], np.int16))
        for a, b in zip(ours.select_columns(["image"]), theirs.select_columns(["image"]))
    ]
    return {
        "max_abs_levels": int(max(difference.max() for difference in differences)),
        "mean_abs_levels": round(float(np.mean([difference.mean() for difference in differences])), 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-dataset", required=True, help="A prepared dataset folder whose masks are used.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", help="A saved pipeline; default: --model-preset with random weights.")
    parser.add_argument("--model-preset", choices=sorted(UNET_PRESETS), default="paper-64")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="For the compiled mode.")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="Default: bf16 on a GPU.")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/generate_loop-<gpu|cpu>.json).")
    args = parser.parse_args()
    if "compiled-warm" in args.modes and "compiled" not in args.modes[: args.modes.index("compiled-warm")]:
        parser.error("compiled-warm runs on the compile cache a compiled run before it made: list compiled first.")
    device = torch.device(default_device())
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    num_pairs = len(load_polyp_dataset(args.mask_dataset, split=args.split))

    settings = dict(model=args.model or f"{args.model_preset} (random weights)", sampler=args.sampler,
                    steps=args.steps, batch_size=args.batch_size, dtype=dtype)  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as work:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            unet = make_polyp_unet_from_preset(args.model_preset)
            model = str(Path(work) / f"random-{args.model_preset}")
            PolypDDPMPipeline(unet=unet, scheduler=make_polyp_scheduler()).save_pretrained(model)
        # The compiled modes' own caches: `compiled` compiles cold even where torch's default cache is warm.
        environment = compile_cache_environment(Path(work) / "compile-cache")
        for mode in args.modes:
            if mode == "compiled-warm" and not any(row["mode"] == "compiled" and "wall_s" in row for row in results):
                results.append({"mode": mode, "skipped": "the compiled run before it failed: no warm cache"})
                continue
            command = [sys.executable, "-m", "polyp_diffusers.cli", "generate", "--model", model, "--mask-dataset"]
            command += [args.mask_dataset, "--split", args.split, "--output", str(Path(work) / mode), "--sampler"]
            command += [args.sampler, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--dtype"]
            compiled = mode.startswith("compiled")
            command += [dtype] + (["--compile-mode", args.compile_mode] if compiled else [])
            print("$ " + " ".join(command), flush=True)
            started = time.perf_counter()
            exit_code = subprocess.run(command, env=environment).returncode
            wall_s = time.perf_counter() - started
            row = {"mode": mode, "compile_mode": args.compile_mode if compiled else None, "pairs": num_pairs}
            if exit_code == 0:
                row.update(wall_s=round(wall_s, 1), pairs_per_s=round(num_pairs / wall_s, 2))
            else:  # the other mode still runs: one failing mode is itself a result
                row["failed_with_exit_code"] = exit_code
            if exit_code == 0 and compiled and (Path(work) / "eager").is_dir():
                row["against_eager"] = image_difference(Path(work) / mode, Path(work) / "eager", args.split)
            results.append(row)
            print(row, flush=True)
            # Each mode is kept as it ends: a run stopped by a time limit keeps what it measured.
            write_results("generate_loop", device, results, args.output, quiet=True, **settings)
    if any("failed_with_exit_code" in row for row in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
