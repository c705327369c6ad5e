"""Tensors for training: resizing pairs, and the paper's joint augmentation, batched on any device."""

import math

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

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
        """`images` `(B, 3, H, W)` in `[-1, 1]`, `masks` `(B, 1, H, W)` in {0, 1}; returns both augmented."""
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not pair up.")
        theta = self.affine(images.shape[0], generator).to(device=images.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Shift images to [0, 2] so that the zero padding of uncovered corners becomes black (-1).
        augmented = F.grid_sample(images.float() + 1, grid, mode="bilinear", align_corners=False) - 1
        augmented_masks = F.grid_sample(masks.float(), grid, mode="nearest", align_corners=False)
        return augmented.to(images.dtype), augmented_masks.to(masks.dtype)


def pair_transform(resolution: int, augment: JointAugment | None = None, seed: int | None = None):
    """
    A batch transform for `Dataset.with_transform`: PIL pairs to `images` `(B, 3, R, R)` in `[-1, 1]` and
    `masks` `(B, 1, R, R)` in {0, 1}, optionally augmented (seeded by `seed`).
    """
    image_processor = VaeImageProcessor(vae_scale_factor=1, resample="bicubic", do_normalize=True)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def transform(batch: dict) -> dict:
        images = image_processor.preprocess(
            [image.convert("RGB") for image in batch["image"]], height=resolution, width=resolution
        )
        masks = prepare_masks(list(batch["mask"]), (resolution, resolution))
        if augment is not None:
            images, masks = augment(images, masks, generator)
        return {"images": images, "masks": masks, "id": batch["id"]}

    return transform
