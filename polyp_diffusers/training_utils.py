"""Pieces of the training scripts that deserve their own tests: checkpoints, per-step randomness, grids."""

import os
import re
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .pipelines.pipeline_polyp_ddpm import mask_model_input

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`) in step order; partial writes are never listed."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if path.is_dir() and (m := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like checkpoint-1000).")
    return int(match.group(1))


def resolve_checkpoint(resume_from: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`latest` is the newest complete checkpoint in `output_dir` (None if there is none); else a path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {resume_from} does not exist.")
    checkpoint_step(path)
    return path


def previous_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint beside `checkpoint` from an earlier step: where to go back when it is broken."""
    step = checkpoint_step(checkpoint)
    earlier = [path for path in list_checkpoints(Path(checkpoint).parent) if checkpoint_step(path) < step]
    return earlier[-1] if earlier else None


def partial_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place (atomically) once complete."""
    return Path(output_dir) / f"checkpoint-{step}{PARTIAL_SUFFIX}"


def publish_checkpoint(output_dir: str | os.PathLike, step: int, total_limit: int | None) -> Path:
    """Renames a completely written checkpoint into place and removes the oldest beyond `total_limit`."""
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial_path(output_dir, step), final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> None:
    """Leftovers of a run killed while writing a checkpoint."""
    for path in Path(output_dir).glob(f"checkpoint-*{PARTIAL_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)


def step_generators(
    seed: int, micro_step: int, process_index: int, device: torch.device | str
) -> tuple[torch.Generator, torch.Generator]:
    """
    Generators for one micro-batch: a CPU one for the augmentation and one on `device` for noise and
    timesteps. Deriving them from the step (not from a running RNG) makes a resumed run draw exactly what
    the uninterrupted run would have drawn.
    """
    augment_seed, noise_seed = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(2, np.uint64)
    mask = 0x7FFF_FFFF_FFFF_FFFF
    return (
        torch.Generator().manual_seed(int(augment_seed) & mask),
        torch.Generator(device=device).manual_seed(int(noise_seed) & mask),
    )


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """`(B, C, H, W)` in `[-1, 1]` (C is 1 or 3) to `(B, H, W, 3)` uint8."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.permute(0, 2, 3, 1).numpy()


def image_grid(rows: list[np.ndarray], padding: int = 2) -> PIL.Image.Image:
    """Stacks rows of `(B, H, W, 3)` uint8 images into one picture, white gaps between cells."""
    columns, height, width, _ = rows[0].shape
    grid = np.full(
        (len(rows) * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            grid[top : top + height, left : left + width] = cell
    return PIL.Image.fromarray(grid)


def diffusion_loss(unet, noise_scheduler, images, masks, mask_channels, generator, loss_type):
    """The paper's objective: predict the noise added to the image, given the noisy image and the mask."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator, device=images.device
    )
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    model_input = torch.cat([noisy, mask_model_input(masks, mask_channels)], dim=1)
    noise_pred = unet(model_input, timesteps).sample
    if loss_type == "l1":
        return F.l1_loss(noise_pred.float(), noise.float())
    return F.mse_loss(noise_pred.float(), noise.float())


@contextmanager
def ema_weights(ema_model, model: torch.nn.Module):
    """Temporarily loads the EMA weights into `model` (for sampling or saving); a no-op without an EMA."""
    if ema_model is None:
        yield
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield
    finally:
        ema_model.restore(model.parameters())


def non_finite_weights(model: torch.nn.Module, ema_parameters: Iterable[torch.Tensor] | None = None) -> list[str]:
    """
    Names of the weight tensors of `model` and of its EMA (`ema_parameters` in `model.parameters()` order, named
    `ema.<name>`) that hold NaN or inf. A diverged run or a damaged file has them; such weights must be neither
    resumed nor saved. One host sync for all tensors.
    """
    named = [(name, parameter.detach()) for name, parameter in model.named_parameters()]
    if ema_parameters is not None:
        names = [name for name, _ in named]
        named += [(f"ema.{name}", tensor.detach()) for name, tensor in zip(names, ema_parameters)]
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(tensor).all().to(device) for _, tensor in named]).tolist()
    return [name for (name, _), is_finite in zip(named, finite) if not is_finite]
