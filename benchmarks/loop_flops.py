"""What each loop's speed target asks of the GPU, in TFLOP/s, beside what the committed measurements reached.

FLOPs are counted by torch's FlopCounterMode on the real models (the denoiser presets and the study's MONAI
UNet++) on the CPU: a count, the same on every device. Every measured rate is read from its JSON under
`benchmarks/results/`, which names its device, so nothing here is typed in by hand. A target that needs far
more TFLOP/s than the model has reached anywhere cannot be met by a faster loop, only by less arithmetic (fewer
steps, a smaller model).

    python benchmarks/loop_flops.py            # writes benchmarks/results/loop_flops.json
"""

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from polyp_diffusers import make_polyp_unet_from_preset
from polyp_diffusers.segmentation import build_segmenter, logits_of

from common import RESULTS_DIR, write_results

# The targets of issue 10: (loop, what the target says, the images per second it asks for).
TARGETS = [
    ("denoiser training 64 px", ">= 5,000 images/s", 5000),
    ("denoiser training 256 px", ">= 338 images/s (the isolated compiled step)", 338),
    ("denoiser training 256 px", "goal >= 500 images/s", 500),
    ("sampling 64 px, 250 DDPM steps", "898 pairs in <= 30 s", 898 / 30),
    ("sampling 256 px, 250 DDPM steps", "3x the authors' 1.12 s per image", 3 / 1.12),
    ("segmenter training 64 px", "1,200 steps of batch 32 in <= 30 s with start-up", 1200 * 32 / 30),
]
# Targets set against the authors' code as measured beside ours in one call: (loop, target, multiple of the
# authors' rate, the result file and row that hold it).
SAME_CALL_TARGETS = [
    ("sampling 256 px, 250 DDPM steps", "3x the authors' sampler in the same call (H100)", 3,
     "sample_throughput_256-h100.json", {"sampler": "reference GaussianDiffusion.sample"}),
]  # fmt: skip


def row_rate(row: dict) -> float:
    """Images per second of a benchmark row; a sampling row timed with fewer steps is scaled to 250."""
    rate = row.get("images_per_s_median", row.get("images_per_s"))
    return rate * row["steps"] / 250 if "sampler" in row else rate


def study_rate(report: dict) -> float:
    return report["denoiser_training"]["images_per_s_median"]


def segmenter_rate(record: dict) -> float:
    """Training images per second of segmentation_loop.py's CUDA-graph run (its training loop, validations in)."""
    row = next(row for row in record["results"] if row["mode"] == "cuda-graphs")
    return row["steps_per_s"] * record["batch_size"]


def generate_rate(record: dict) -> float:
    """Pairs per second of the whole uncompiled `generate` command: start-up and writing included."""
    return next(row for row in record["results"] if row["mode"] == "eager")["pairs_per_s"]


# Committed measurements: (loop, what was measured, result file, how its images per second are read: a study
# report's own figure, or the first row of a benchmark's results that has the given values).
MEASURED = [
    ("denoiser training 64 px", "train.py in the quick-64 study, batch 128, bf16, compiled",
     "study-quick-64-velocity-h100/report.json", study_rate),
    ("denoiser training 64 px", "train.py, batch 512, bf16, compiled",
     "train_loop_64_b512_compile-h100.json", {}),
    ("denoiser training 64 px", "train.py, batch 128, bf16, not compiled",
     "train_loop_64_no_compile-h100.json", {}),
    ("denoiser training 64 px", "isolated step, batch 32, bf16",
     "train_throughput-h200.json", {"model": "polyp-diffusers", "size": 64, "mode": "bf16"}),
    ("denoiser training 256 px", "isolated step, batch 32, bf16, compiled",
     "train_throughput_compile-h200.json", {"size": 256}),
    ("denoiser training 256 px", "isolated step, batch 32, bf16",
     "train_throughput_256-h100.json", {"model": "polyp-diffusers"}),
    ("denoiser training 256 px", "the authors' isolated step, batch 32, fp32",
     "train_throughput_256-h100.json", {"model": "reference"}),
    ("denoiser training 256 px", "train.py, batch 32, bf16, compiled",
     "train_loop_256_compile-h100.json", {}),
    ("sampling 64 px, 250 DDPM steps", "pipeline, batch 512, bf16, per-image noise (100 steps timed)",
     "sample_throughput_64-h100.json", {"noise": "device-per-image"}),
    ("sampling 64 px, 250 DDPM steps", "the whole generate command, 898 pairs, batch 512, bf16, not compiled",
     "generate_loop_64-h100.json", generate_rate),
    ("sampling 256 px, 250 DDPM steps", "pipeline, batch 16, bf16",
     "sample_throughput-h200.json", {"sampler": "ddpm", "dtype": "bf16"}),
    ("sampling 256 px, 250 DDPM steps", "pipeline, batch 64, bf16, per-image noise",
     "sample_throughput_256-h100.json", {"sampler": "ddpm"}),
    ("sampling 256 px, 250 DDPM steps", "the authors' sampler, batch 16, fp32",
     "sample_throughput_256-h100.json", {"sampler": "reference GaussianDiffusion.sample"}),
    ("segmenter training 64 px", "train_segmentation.py's training loop, batch 32, bf16, CUDA graphs",
     "segmentation_loop-h100.json", segmenter_rate),
    ("segmenter training 64 px", "the same, run with python as the study runs it",
     "segmentation_loop_phases-h100.json", segmenter_rate),
]  # fmt: skip


def flops_per_image(forward, batch_size: int, train: bool) -> float:
    """FLOPs of one image's forward (and backward, if `train`): `forward()` runs a batch of `batch_size`."""
    with FlopCounterMode(display=False) as counter:
        if train:
            forward().float().mean().backward()
        else:
            with torch.no_grad():
                forward()
    return counter.get_total_flops() / batch_size


def predicted_noise(unet: torch.nn.Module, noisy: torch.Tensor) -> torch.Tensor:
    return unet(noisy, torch.tensor([10, 200][: len(noisy)])).sample


def loop_flops() -> dict[str, float]:
    """FLOPs per image of each loop: a training image (forward and backward) or a sampled one (all its steps)."""
    per_image = {}
    for preset, size in (("paper-64", 64), ("paper", 256)):
        forward = partial(predicted_noise, make_polyp_unet_from_preset(preset), torch.randn(2, 4, size, size))
        per_image[f"denoiser training {size} px"] = flops_per_image(forward, 2, train=True)
        per_image[f"sampling {size} px, 250 DDPM steps"] = 250 * flops_per_image(forward, 2, train=False)
    forward = partial(logits_of, build_segmenter("monai"), torch.randn(2, 3, 64, 64))
    per_image["segmenter training 64 px"] = flops_per_image(forward, 2, train=True)
    return per_image


def measured_rate(file: str, read) -> tuple[float, str]:
    """The images per second `read` gives from a committed result file, and the device that measured it."""
    record = json.loads((RESULTS_DIR / file).read_text())
    if callable(read):
        return read(record), record["device"]
    rows = [row for row in record["results"] if all(row.get(key) == value for key, value in read.items())]
    if not rows:
        raise LookupError(f"no row of {file} has {read}")
    return row_rate(rows[0]), record["device"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(RESULTS_DIR / "loop_flops.json"), help="JSON path.")
    args = parser.parse_args()
    per_image = loop_flops()
    measured = []
    for loop, what, file, read in MEASURED:
        rate, device = measured_rate(file, read)
        measured.append(
            {"loop": loop, "measured": what, "device": device, "source": file, "images_per_s": round(rate, 2),
             "tflop_per_s": round(rate * per_image[loop] / 1e12, 1)}
        )  # fmt: skip
    best = max(row["tflop_per_s"] for row in measured)
    targets = []
    same_call = [
        (loop, target, times * measured_rate(file, read)[0]) for loop, target, times, file, read in SAME_CALL_TARGETS
    ]
    for loop, target, images_per_s in TARGETS + same_call:
        needed = images_per_s * per_image[loop] / 1e12
        targets.append(
            {"loop": loop, "target": target, "gflop_per_image": round(per_image[loop] / 1e9, 2),
             "tflop_per_s_needed": round(needed, 1), "times_best_measured": round(needed / best, 2)}
        )  # fmt: skip
    write_results(
        "loop_flops",
        torch.device("cpu"),
        targets,
        args.output,
        quiet=True,
        note="FLOPs counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add counts 2); the device above "
        "only counted them. times_best_measured compares with the fastest measured rate below, on any GPU.",
        best_measured_tflop_per_s=best,
        measured=measured,
    )
    print(f"{'loop':34} {'target':48} {'GFLOP/img':>10} {'TFLOP/s':>8} {'x best':>7}")
    for row in targets:
        print(f"{row['loop']:34} {row['target']:48} {row['gflop_per_image']:>10} {row['tflop_per_s_needed']:>8} "
              f"{row['times_best_measured']:>7}")  # fmt: skip
    print(f"\n{'loop':34} {'measured':62} {'device':22} {'img/s':>8} {'TFLOP/s':>8}")
    for row in measured:
        print(f"{row['loop']:34} {row['measured']:62} {row['device']:22} {row['images_per_s']:>8} "
              f"{row['tflop_per_s']:>8}")  # fmt: skip
    print(f"\nwritten to {Path(args.output)}")


if __name__ == "__main__":
    main()
