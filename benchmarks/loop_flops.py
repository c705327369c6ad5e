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
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from polyp_diffusers import make_polyp_unet_from_preset
from polyp_diffusers.segmentation import build_segmenter

from common import RESULTS_DIR, write_results

# The targets of issue 10: (loop, what the target says, images, seconds), images per second being images/seconds.
TARGETS = [
    ("denoiser training 64 px", ">= 5,000 images/s", 5000, 1.0),
    ("denoiser training 256 px", ">= 338 images/s (the isolated compiled step)", 338, 1.0),
    ("denoiser training 256 px", "goal >= 500 images/s", 500, 1.0),
    ("sampling 64 px, 250 DDPM steps", "898 pairs in <= 30 s", 898, 30.0),
    ("sampling 256 px, 250 DDPM steps", "<= 1.12 / 3 s per image", 3, 1.12),
    ("segmenter training 64 px", "1,200 steps of batch 32 in <= 30 s with start-up", 1200 * 32, 30.0),
]

# Committed measurements: (loop, what was measured, result file, row filter, how a row gives images per second).
MEASURED = [
    ("denoiser training 64 px", "train.py in the quick-64 study, batch 128, bf16, compiled",
     "study-quick-64-velocity-h100/report.json", None, lambda report: report["denoiser_training"]["images_per_s_median"]),
    ("denoiser training 64 px", "train.py, batch 128, bf16, not compiled",
     "train_loop_64_no_compile-h100.json", {}, lambda row: row["images_per_s_median"]),
    ("denoiser training 64 px", "isolated step, batch 32, bf16",
     "train_throughput-h200.json", {"model": "polyp-diffusers", "size": 64, "mode": "bf16"}, lambda row: row["images_per_s"]),
    ("denoiser training 256 px", "isolated step, batch 32, bf16, compiled",
     "train_throughput_compile-h200.json", {"size": 256}, lambda row: row["images_per_s"]),
    ("denoiser training 256 px", "isolated step, batch 32, bf16",
     "train_throughput_256-h100.json", {"model": "polyp-diffusers"}, lambda row: row["images_per_s"]),
    ("sampling 64 px, 250 DDPM steps", "pipeline, batch 512, bf16, per-image noise (100 steps timed)",
     "sample_throughput_64-h100.json", {"noise": "device-per-image"}, lambda row: 1 / row["seconds_per_image"] * row["steps"] / 250),
    ("sampling 256 px, 250 DDPM steps", "pipeline, batch 16, bf16",
     "sample_throughput-h200.json", {"sampler": "ddpm", "dtype": "bf16"}, lambda row: 1 / row["seconds_per_image"]),
]  # fmt: skip


def flops_per_image(model: torch.nn.Module, inputs: tuple, train: bool) -> float:
    """FLOPs of one image's forward (and backward, if `train`), from a batch of two."""
    with FlopCounterMode(display=False) as counter:
        if train:
            output = model(*inputs)
            output = output.sample if hasattr(output, "sample") else output
            (output[0] if isinstance(output, list) else output).float().mean().backward()
        else:
            with torch.no_grad():
                model(*inputs)
    return counter.get_total_flops() / len(inputs[0])


def loop_flops() -> dict[str, float]:
    """FLOPs per image of each loop: a training image (forward and backward) or a sampled one (all its steps)."""
    per_image = {}
    timesteps = torch.tensor([10, 200])
    for preset, size in (("paper-64", 64), ("paper", 256)):
        unet = make_polyp_unet_from_preset(preset)
        inputs = (torch.randn(2, 4, size, size), timesteps)
        per_image[f"denoiser training {size} px"] = flops_per_image(unet, inputs, train=True)
        per_image[f"sampling {size} px, 250 DDPM steps"] = 250 * flops_per_image(unet, inputs, train=False)
    segmenter = build_segmenter("monai")
    per_image["segmenter training 64 px"] = flops_per_image(segmenter, (torch.randn(2, 3, 64, 64),), train=True)
    return per_image


def measured_rate(file: str, row_filter: dict | None, images_per_s) -> tuple[float, str]:
    record = json.loads((RESULTS_DIR / file).read_text())
    if row_filter is None:  # a study report: the figure is in the report itself
        return images_per_s(record), record["device"]
    row = next(row for row in record["results"] if all(row.get(key) == value for key, value in row_filter.items()))
    return images_per_s(row), record["device"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(RESULTS_DIR / "loop_flops.json"), help="JSON path.")
    args = parser.parse_args()
    per_image = loop_flops()
    measured = []
    for loop, what, file, row_filter, images_per_s in MEASURED:
        rate, device = measured_rate(file, row_filter, images_per_s)
        measured.append(
            {"loop": loop, "measured": what, "device": device, "source": file, "images_per_s": round(rate, 2),
             "tflop_per_s": round(rate * per_image[loop] / 1e12, 1)}
        )  # fmt: skip
    best = max(row["tflop_per_s"] for row in measured)
    targets = []
    for loop, target, images, seconds in TARGETS:
        needed = images / seconds * per_image[loop] / 1e12
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
