"""What every benchmark records next to its figures: the device, the versions and the command."""

import json
import os
import platform
import sys
import time
from pathlib import Path

import diffusers
import torch

from polyp_diffusers.folders import write_text_atomically
from polyp_diffusers.modeling import default_device, describe_device

__all__ = ["default_device"]  # re-exported: the benchmarks run where the commands would

RESULTS_DIR = Path(__file__).parent / "results"


def reference_diffusion(size: int, device: torch.device, reference_dir: str) -> torch.nn.Module:
    """
    The authors' denoiser (their 256/128/64 px widths, 6 input channels: the noisy image and the mask as RGB) in
    their `GaussianDiffusion` (250 cosine steps, L1 loss), random weights, from `reference_dir`'s `diffusion_model/`.
    """
    sys.path.insert(0, reference_dir)
    from diffusion_model.trainer import GaussianDiffusion
    from diffusion_model.unet import create_model

    network = create_model(size, 64, 2, in_channels=6, out_channels=3)
    return GaussianDiffusion(network, image_size=size, timesteps=250, loss_type="l1").to(device)


def compile_cache_environment(folder: Path) -> dict[str, str]:
    """
    This process's environment with torch.compile's on-disk caches (inductor's, and Triton's kernels) in `folder`:
    subprocesses given it compile cold the first time and find their compilation there afterwards.
    """
    return {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
    }


def add_cudnn_benchmark_argument(parser) -> None:
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="Time with torch.backends.cudnn.benchmark on (cuDNN times its convolution algorithms for each new shape "
        "and keeps the fastest). Compare with a run without it in another process: cuDNN keeps the algorithm it "
        "chose for a shape for the whole process, whatever the flag says later.",
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory since the last reset; None on the CPU (no per-run figure there)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return None


def write_results(
    name: str, device: torch.device, results: list[dict], output: str | None = None, quiet: bool = False, **extra
) -> Path:
    """Saves results with their context as JSON (default: results/<name>-<device>.json) and prints them."""
    record = {
        "benchmark": name,
        "device": describe_device(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        **extra,
        "results": results,
    }
    path = Path(output) if output else RESULTS_DIR / f"{name}-{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")  # a stage's `timeout` may kill it at any time
    if not quiet:
        print(json.dumps(record, indent=2))
    return path
