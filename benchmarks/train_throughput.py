"""Training throughput (images/s) and peak memory of the paper's denoiser at 64, 128 and 256 px.

Times what `training/train.py` does per step with its default settings (on-device joint augmentation, noising,
UNet forward, L1 loss, backward, gradient clipping, AdamW, fused on CUDA, and the EMA update) on random data, in
fp32, bf16 autocast and bf16 + torch.compile. With `--reference-dir` it also times the authors' network (fp32,
their GaussianDiffusion loss, Adam; their EMA, every 10 steps, is left out) on the same device.
`--cudnn-benchmark` lets cuDNN time its convolution algorithms and keep the fastest (compare with a run without it).

    python benchmarks/train_throughput.py                       # CUDA if present, else CPU with small batches
    python benchmarks/train_throughput.py --modes fp32 bf16 --sizes 256 --batch-size 32
    python benchmarks/train_throughput.py --modes bf16-compile --sizes 256 --cudnn-benchmark
"""

import argparse
import time

import torch

from polyp_diffusers import make_polyp_scheduler, make_polyp_unet
from polyp_diffusers.arguments import load_training_script
from polyp_diffusers.modeling import diffusion_loss
from polyp_diffusers.transforms import JointAugment

from common import (
    add_cudnn_benchmark_argument,
    default_device,
    peak_memory_gib,
    reference_diffusion,
    reset_peak_memory,
    synchronize,
    write_results,
)

MODES = ("fp32", "bf16", "bf16-compile", "fp32-compile")
TRAIN_SCRIPT = load_training_script("train")
TRAINING_DEFAULTS = TRAIN_SCRIPT.parse_args(["--dataset", "-", "--output_dir", "-"])
OUR_STEP = (
    f"augmentation, loss, backward, gradient clipping at {TRAINING_DEFAULTS.max_grad_norm}, AdamW (fused on CUDA), "
    "foreach EMA"
)  # since 2026-11-28; earlier rows had no clipping, an unfused AdamW and no EMA
REFERENCE_STEP = "the authors' loss, backward, Adam (their EMA every 10 steps left out)"


def time_steps(step, steps: int, warmup: int, device) -> tuple[float, float]:
    """Seconds of the first call (compilation included) and mean seconds per step after `warmup` calls."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return first, (time.perf_counter() - start) / steps


def ours(size: int, batch_size: int, mode: str, device):
    unet = make_polyp_unet(image_size=size).to(device)
    model = torch.compile(unet) if mode.endswith("compile") else unet
    scheduler = make_polyp_scheduler()
    optimizer = TRAIN_SCRIPT.make_optimizer(unet, TRAINING_DEFAULTS)
    ema_model = TRAIN_SCRIPT.make_ema(unet, TRAINING_DEFAULTS)
    augment = JointAugment()
    images = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    masks = (torch.rand(batch_size, 1, size, size, device=device) > 0.7).float()
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.startswith("bf16"))

    def step():
        augmented, augmented_masks = augment(images, masks)
        with autocast:
            loss = diffusion_loss(model, scheduler, augmented, augmented_masks, 1, generator, "l1")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), TRAINING_DEFAULTS.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_model.step(unet.parameters())

    return unet, step


def reference(size: int, batch_size: int, device, reference_dir: str):
    """The authors' denoiser (6 input channels) and loss, as their trainer calls them."""
    diffusion = reference_diffusion(size, device, reference_dir)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    masks = (torch.rand(batch_size, 1, size, size, device=device) > 0.7).float().repeat(1, 3, 1, 1) * 2 - 1

    def step():
        loss = diffusion(images, condition_tensors=masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return diffusion.denoise_fn, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fp32", "bf16", "bf16-compile"])
    parser.add_argument("--batch-size", type=int, default=None, help="Default: 32 on a GPU (the paper), 2 on a CPU.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default: 10 on a GPU, 2 on a CPU).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference-dir", help="Folder holding the authors' diffusion_model/ package, to time it too.")
    add_cudnn_benchmark_argument(parser)
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/train_throughput-<gpu|cpu>.json).")
    args = parser.parse_args()
    device = torch.device(default_device())
    batch_size = args.batch_size or (32 if device.type == "cuda" else 2)
    steps = args.steps or (10 if device.type == "cuda" else 2)

    runs = [(size, mode) for size in args.sizes for mode in args.modes]
    if args.reference_dir:
        runs += [(size, "reference-fp32") for size in args.sizes]
    results = []
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    for size, mode in runs:
        reset_peak_memory(device)
        torch.manual_seed(0)
        if mode == "reference-fp32":
            model, step = reference(size, batch_size, device, args.reference_dir)
        else:
            model, step = ours(size, batch_size, mode, device)
        first, seconds = time_steps(step, steps, args.warmup, device)
        result = {
            "model": "reference" if mode.startswith("reference") else "polyp-diffusers",
            "size": size,
            "mode": mode,
            "step_includes": REFERENCE_STEP if mode.startswith("reference") else OUR_STEP,
            "cudnn_benchmark": args.cudnn_benchmark,
            "batch_size": batch_size,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "images_per_s": round(batch_size / seconds, 2),
            "step_ms": round(seconds * 1000, 1),
            "first_step_s": round(first, 1),
            "peak_memory_gib": peak_memory_gib(device),
            "timed_steps": steps,
        }
        print(result, flush=True)
        results.append(result)
        # Each row is kept as it comes: a run stopped by a time limit keeps what it measured.
        write_results("train_throughput", device, results, args.output, quiet=True)
        del model, step
    write_results("train_throughput", device, results, args.output)


if __name__ == "__main__":
    main()
