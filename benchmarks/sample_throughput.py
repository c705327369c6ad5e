"""Sampling speed of PolypDDPMPipeline: seconds per image for each scheduler, step count, dtype and batch.

Uses the paper's 256 px denoiser with random weights (speed does not depend on the weights).

    python benchmarks/sample_throughput.py                         # CUDA if present, else CPU (tiny runs)
    python benchmarks/sample_throughput.py --batch-sizes 16 64 --dtypes fp32 bf16
"""

import argparse
import time

import numpy as np
import torch

from polyp_diffusers import PolypDDPMPipeline, make_polyp_scheduler, make_polyp_unet, make_sampler

from common import default_device, peak_memory_gib, reset_peak_memory, synchronize, write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--samplers", nargs="+", default=["ddpm:250", "ddim:50", "dpmsolver:25"], help="SAMPLER:STEPS pairs."
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="Default: 16 on a GPU, 1 on a CPU.")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/sample_throughput-<gpu|cpu>.json).")
    args = parser.parse_args()
    device = torch.device(default_device())
    batch_sizes = args.batch_sizes or ([16] if device.type == "cuda" else [1])

    torch.manual_seed(0)
    pipe = PolypDDPMPipeline(unet=make_polyp_unet(image_size=args.size), scheduler=make_polyp_scheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((args.size, args.size), np.uint8)
    mask[args.size // 4 : args.size // 2, args.size // 3 : 2 * args.size // 3] = 255
    results = []
    for dtype_name in args.dtypes:
        pipe.to(dtype=DTYPES[dtype_name])
        for batch_size in batch_sizes:
            for sampler_steps in args.samplers:
                sampler, steps = sampler_steps.split(":")
                pipe.scheduler = make_sampler(sampler, make_polyp_scheduler().config)
                pipe([mask] * batch_size, num_inference_steps=2, batch_size=batch_size, output_type="pt")  # warm-up
                reset_peak_memory(device)
                synchronize(device)
                start = time.perf_counter()
                pipe([mask] * batch_size, num_inference_steps=int(steps), batch_size=batch_size, output_type="pt")
                synchronize(device)
                seconds = time.perf_counter() - start
                result = {
                    "sampler": sampler,
                    "steps": int(steps),
                    "dtype": dtype_name,
                    "batch_size": batch_size,
                    "size": args.size,
                    "seconds_per_image": round(seconds / batch_size, 3),
                    "images_per_s": round(batch_size / seconds, 2),
                    "peak_memory_gib": peak_memory_gib(device),
                }
                print(result, flush=True)
                results.append(result)
    write_results("sample_throughput", device, results, args.output)


if __name__ == "__main__":
    main()
