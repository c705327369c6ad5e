"""Tensors for training: resizing pairs, and the paper's joint augmentation, batched on any device."""

import functools
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from tqdm.auto import tqdm

from .pipelines.pipeline_polyp_ddpm import prepare_masks


class JointAugment:
    """
    The same random rotation, zoom and horizontal flip for each image and its mask, in one resampling.

    Images are resampled bilinearly, masks with nearest-neighbour, so masks stay exactly binary. Corners that
    rotation or zooming out uncover are black in the image and background in the mask. The randomness comes
    from a CPU `generator`, so a seed gives the same augmentation on every device.

    Args:
        degrees: rotation angle drawn uniformly from `[-degrees, degrees]` (the paper: 45).
        zoom: magnification drawn uniformly from this range (`< 1` zooms out); `(1, 1)` disables it.
        flip_probability: chance of a horizontal flip (the paper: 0.5).
    """

    def __init__(self, degrees: float = 45.0, zoom: tuple[float, float] = (1.0, 1.0), flip_probability: float = 0.5):
        if degrees < 0 or not 0 <= flip_probability <= 1 or not 0 < zoom[0] <= zoom[1]:
            raise ValueError(
                f"need degrees >= 0, 0 <= flip_probability <= 1 and 0 < zoom[0] <= zoom[1]; "
                f"got {degrees}, {flip_probability} and {zoom}."
            )
        self.degrees = degrees
        self.zoom = zoom
        self.flip_probability = flip_probability

    def __repr__(self):
        return f"JointAugment(degrees={self.degrees}, zoom={self.zoom}, flip_probability={self.flip_probability})"

    def affine(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The `(B, 2, 3)` matrices mapping output to input coordinates, as `F.affine_grid` expects."""
        angle, zoom, flip = torch.rand(3, batch_size, generator=generator)
        angle = (angle * 2 - 1) * math.radians(self.degrees)
        zoom = self.zoom[0] + zoom * (self.zoom[1] - self.zoom[0])
        mirror = torch.where(flip < self.flip_probability, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zeros = torch.zeros(batch_size)
        return torch.stack(
            [torch.stack([cos * mirror, -sin, zeros], -1), torch.stack([sin * mirror, cos, zeros], -1)], dim=1
        )

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `images` `(B, 3, H, W)` in `[-1, 1]` (or `(B, 0, H, W)`: none), `masks` `(B, 1, H, W)` in {0, 1}; returns
        both augmented. The masks get the same transformation with or without images.
        """
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not pair up.")
        # non_blocking: a blocking host-to-GPU copy would wait for all queued GPU work, once per step.
        theta = self.affine(images.shape[0], generator).to(images.device, torch.float32, non_blocking=True)
        grid = F.affine_grid(theta, list(masks.shape), align_corners=False)
        augmented_masks = F.grid_sample(masks.float(), grid, mode="nearest", align_corners=False)
        if images.shape[1] == 0:  # masks alone (`pair_tensors(..., with_images=False)`)
            return images, augmented_masks.to(masks.dtype)
        # Shift images to [0, 2] so that the zero padding of uncovered corners becomes black (-1).
        augmented = F.grid_sample(images.float() + 1, grid, mode="bilinear", align_corners=False) - 1
        return augmented.to(images.dtype), augmented_masks.to(masks.dtype)


def pair_transform(
    resolution: int, augment: JointAugment | None = None, seed: int | None = None, with_images: bool = True
):
    """
    A batch transform for `Dataset.with_transform`: PIL pairs to `images` `(B, 3, R, R)` in `[-1, 1]` and
    `masks` `(B, 1, R, R)` in {0, 1}, optionally augmented (seeded by `seed`). Without images (what a model of
    masks trains on), `images` are `(B, 0, R, R)` and the image column is not used (`transformed_pairs` also
    drops it, so that datasets does not decode it for nothing).
    """
    image_processor = VaeImageProcessor(vae_scale_factor=1, resample="bicubic", do_normalize=True)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def transform(batch: dict) -> dict:
        masks = prepare_masks(list(batch["mask"]), (resolution, resolution))
        images = (
            image_processor.preprocess(
                [image.convert("RGB") for image in batch["image"]], height=resolution, width=resolution
            )
            if with_images
            else masks.new_empty(len(masks), 0, resolution, resolution)
        )
        if augment is not None:
            images, masks = augment(images, masks, generator)
        ids = {"id": batch["id"]} if "id" in batch else {}  # a dataset made elsewhere may have none
        return {"images": images, "masks": masks, **ids}

    return transform


def transformed_pairs(dataset, resolution: int, with_images: bool = True):
    """`dataset` read through `pair_transform`; without images, also without its image column (never decoded)."""
    if not with_images:
        dataset = dataset.remove_columns("image")
    return dataset.with_transform(pair_transform(resolution, with_images=with_images))


def pair_tensors(
    dataset,
    resolution: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    with_images: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Every pair of `dataset` decoded and resized once: `images` `(N, 3, R, R)` as their 8-bit levels (uint8, read
    back exactly by `images_from_levels`) and `masks` `(N, 1, R, R)` uint8 in {0, 1}, on `device`. A training set
    that fits there is then batched by indexing, with no workers and no per-step decoding (898 pairs at 256 px
    take 0.22 GiB; as float32 images they took 0.71). Without images, `images` are `(N, 0, R, R)`: nothing, which
    batches and augments like images.
    """
    pairs = transformed_pairs(dataset, resolution, with_images)
    # Filled in place: a list of batches and their concatenation would take twice the memory at the peak.
    images = torch.empty(
        len(dataset), 3 if with_images else 0, resolution, resolution, device=device, dtype=torch.uint8
    )
    masks = torch.empty(len(dataset), 1, resolution, resolution, device=device, dtype=torch.uint8)
    for start in tqdm(range(0, len(dataset), batch_size), desc="Loading pairs", unit="batch", disable=not progress):
        batch = pairs[start : start + batch_size]
        images[start : start + len(batch["images"])] = levels_of_images(batch["images"])
        masks[start : start + len(batch["masks"])] = batch["masks"]
    return images, masks


def pair_tensors_nbytes(num_pairs: int, resolution: int, with_images: bool = True) -> int:
    """What `pair_tensors` takes in memory: uint8 images and masks."""
    return num_pairs * (3 * with_images + 1) * resolution * resolution


# What `VaeImageProcessor` makes of each 8-bit level (x / 255 in float32, then 2x - 1): a table, so that images kept
# as levels are read back bit for bit as decoded on any device (a GPU divides by a number as a multiplication by
# its reciprocal, which may differ in the last bit).
LEVEL_VALUES = VaeImageProcessor.normalize(torch.from_numpy(np.arange(256, dtype=np.float32) / 255.0))


def levels_of_images(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in `[-1, 1]` (`pair_transform`'s, unaugmented) as the 8-bit levels they were decoded from."""
    return ((images + 1) * 127.5).round_().to(torch.uint8)


@functools.cache
def _level_values_on(device: torch.device) -> torch.Tensor:
    return LEVEL_VALUES.to(device)  # once per device: a copy from the host each batch would wait for the GPU


def images_from_levels(levels: torch.Tensor) -> torch.Tensor:
    """Images kept as 8-bit levels (`pair_tensors`) as the float32 images in `[-1, 1]` that they were decoded as."""
    return _level_values_on(levels.device)[levels.long()]


def shuffled_batches(
    num_items: int,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device | str = "cpu",
    process_index: int = 0,
    num_processes: int = 1,
) -> torch.Tensor:
    """
    The index batches `(num_batches, batch_size)` one process draws in one epoch: a permutation seeded by
    `(seed, epoch)` alone (so a resumed run draws the same ones), whole batches only, and every
    `num_processes`-th batch from `process_index` on.
    """
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(epoch_seed))
    num_batches = num_items // batch_size // num_processes * num_processes
    if num_batches == 0:
        raise ValueError(
            f"{num_items} pairs are fewer than one batch of {batch_size} for each of {num_processes} processes."
        )
    batches = order[: num_batches * batch_size].view(num_batches, batch_size)[process_index::num_processes]
    return batches.to(device, non_blocking=True)


def tensor_batches(
    images: torch.Tensor,
    masks: torch.Tensor,
    batches: torch.Tensor,
    start: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """
    The `images`/`masks` batches that `batches` index, from `start` on, moved to `device` (default: where they are)
    and read as `pair_transform` gives them: float images in `[-1, 1]` from their levels, float masks.
    """
    for indices in batches[start:]:
        yield {
            "images": images_from_levels(images[indices].to(device, non_blocking=True)),
            "masks": masks[indices].to(device, torch.float32, non_blocking=True),
        }


def mean_color(levels: torch.Tensor) -> list[float]:
    """The mean RGB, in `[0, 1]`, of images `(N, 3, H, W)` kept as 8-bit levels: a `PolypDDPMPipeline`'s `start_color`."""
    # Summed exactly, a batch at a time: no float copy of all the images.
    sums = sum(batch.sum(dim=(0, 2, 3), dtype=torch.float64) for batch in levels.split(64))
    return [round(value, 4) for value in (sums / (levels[:, 0].numel() * 255)).tolist()]
