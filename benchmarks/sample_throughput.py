"""Sampling speed of PolypDDPMPipeline: seconds per image for each scheduler, step count, dtype and batch.

Uses a denoiser preset with random weights (speed does not depend on the weights). `--noise` compares how the
noise is drawn: `batch` (one generator for the batch), `device-per-image` (one seeded generator per image on the
sampling device, what `polyp-ddpm generate` does so that images do not depend on the batch size) and
`cpu-per-image` (per-image CPU generators, whose noise is copied to the device at every step). With
`--reference-dir` it also times the authors' sampler (their network and 250-step `GaussianDiffusion.sample`,
fp32 as they ship it, random weights) at the same size, in the same process. `--cudnn-benchmark` lets cuDNN time
its convolution algorithms and keep the fastest (compare with a run without it).

    python benchmarks/sample_throughput.py                         # CUDA if present, else CPU (tiny runs)
    python benchmarks/sample_throughput.py --batch-sizes 16 64 --dtypes fp32 bf16
    python benchmarks/sample_throughput.py --model-preset paper-64 --batch-sizes 512 --samplers ddpm:250 \
        --dtypes bf16 --noise batch device-per-image cpu-per-image
    python benchmarks/sample_throughput.py --samplers ddpm:250 --batch-sizes 64 --dtypes bf16 \
        --reference-dir ../shared/reference/polyp_ddpm_official
"""

import argparse
import itertools
import time

import numpy as np
import torch

from polyp_diffusers import PolypDDPMPipeline, make_polyp_scheduler, make_polyp_unet_from_preset, make_sampler
from polyp_diffusers.choices import COMPILE_MODES
from polyp_diffusers.modeling import UNET_PRESETS

from common import (
    add_cudnn_benchmark_argument,
    default_device,
    peak_memory_gib,
    reference_diffusion,
    reset_peak_memory,
    synchronize,
    write_results,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-preset", choices=sorted(UNET_PRESETS), default="paper", help="Denoiser size.")
    parser.add_argument(
        "--noise",
        nargs="+",
        choices=("batch", "device-per-image", "cpu-per-image"),
        default=["batch"],
        help="How the noise is drawn (see above).",
    )
    parser.add_argument(
        "--samplers", nargs="+", default=["ddpm:250", "ddim:50", "dpmsolver:25"], help="SAMPLER:STEPS pairs."
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="Default: 16 on a GPU, 1 on a CPU.")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument(
        "--compile", action="store_true", help="Compile the UNet first (`generate --compile`); the warm-up compiles."
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode; reduce-overhead adds CUDA graphs (implies --compile).",
    )
    parser.add_argument("--reference-dir", help="Folder holding the authors' diffusion_model/ package, to time it too.")
    parser.add_argument(
        "--reference-batch-sizes", type=int, nargs="+", default=[16], help="Batches for the authors' sampler."
    )
    add_cudnn_benchmark_argument(parser)
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/sample_throughput-<gpu|cpu>.json).")
    args = parser.parse_args()
    device = torch.device(default_device())
    batch_sizes = args.batch_sizes or ([16] if device.type == "cuda" else [1])
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    torch.manual_seed(0)
    unet = make_polyp_unet_from_preset(args.model_preset)
    size = unet.config.sample_size
    pipe = PolypDDPMPipeline(unet=unet, scheduler=make_polyp_scheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    compiled = args.compile or args.compile_mode is not None
    if compiled:
        pipe.unet.compile(mode=args.compile_mode)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 3 : 2 * size // 3] = 255

    def generators(noise, batch_size):
        if noise == "batch":
            return torch.Generator(device).manual_seed(0)
        generator_device = device if noise == "device-per-image" else "cpu"
        return [torch.Generator(generator_device).manual_seed(seed) for seed in range(batch_size)]

    results = []
    for dtype_name in args.dtypes:
        pipe.to(dtype=DTYPES[dtype_name])
        for batch_size in batch_sizes:
            for sampler_steps, noise in itertools.product(args.samplers, args.noise):
                sampler, steps = sampler_steps.split(":")
                pipe.scheduler = make_sampler(sampler, make_polyp_scheduler().config)
                masks = [mask] * batch_size
                warm_up = time.perf_counter()
                pipe(masks, num_inference_steps=2, batch_size=batch_size, output_type="pt")  # compiles, if asked
                synchronize(device)
                warm_up_seconds = time.perf_counter() - warm_up
                reset_peak_memory(device)
                synchronize(device)
                start = time.perf_counter()
                generator = generators(noise, batch_size)
                pipe(
                    masks, num_inference_steps=int(steps), generator=generator, batch_size=batch_size, output_type="pt"
                )
                synchronize(device)
                seconds = time.perf_counter() - start
                result = {
                    "sampler": sampler,
                    "steps": int(steps),
                    "noise": noise,
                    "cudnn_benchmark": args.cudnn_benchmark,
                    "dtype": dtype_name,
                    "batch_size": batch_size,
                    "model_preset": args.model_preset,
                    "size": size,
                    "seconds_per_image": round(seconds / batch_size, 3),
                    "images_per_s": round(batch_size / seconds, 2),
                    "peak_memory_gib": peak_memory_gib(device),
                    "compiled": compiled,
                    "compile_mode": args.compile_mode,
                    "warm_up_s": round(warm_up_seconds, 1),
                }
                print(result, flush=True)
                results.append(result)
                # Each row is kept as it comes: a run stopped by a time limit keeps what it measured.
                write_results("sample_throughput", device, results, args.output, quiet=True)
    if args.reference_dir:
        del pipe, unet
        torch.manual_seed(0)
        diffusion = reference_diffusion(size, device, args.reference_dir)
        for batch_size in args.reference_batch_sizes:
            masks = torch.full((batch_size, 3, size, size), -1.0, device=device)
            masks[:, :, size // 4 : size // 2, size // 3 : 2 * size // 3] = 1.0
            with torch.no_grad():  # a warm-up step, as ours had: the first call pays for kernel selection
                timesteps = torch.full((batch_size,), diffusion.num_timesteps - 1, device=device)
                diffusion.denoise_fn(torch.cat([torch.randn_like(masks), masks], 1), timesteps)
            reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            diffusion.sample(batch_size, condition_tensors=masks)
            synchronize(device)
            seconds = time.perf_counter() - start
            result = {
                "sampler": "reference GaussianDiffusion.sample",
                "steps": diffusion.num_timesteps,
                "cudnn_benchmark": args.cudnn_benchmark,
                "dtype": "fp32",
                "batch_size": batch_size,
                "size": size,
                "seconds_per_image": round(seconds / batch_size, 3),
                "images_per_s": round(batch_size / seconds, 2),
                "peak_memory_gib": peak_memory_gib(device),
            }
            print(result, flush=True)
            results.append(result)
            write_results("sample_throughput", device, results, args.output, quiet=True)
    write_results("sample_throughput", device, results, args.output)


if __name__ == "__main__":
    main()
