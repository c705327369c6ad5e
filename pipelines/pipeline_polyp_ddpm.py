# Copyright 2026 The polyp-diffusers contributors. MIT License.
"""Mask-conditioned DDPM pipeline for colonoscopy polyp images (Polyp-DDPM, arXiv:2402.04031).

This file depends only on torch, numpy, PIL and diffusers, so the very same file can be saved next to the
weights and loaded with `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_polyp_ddpm")`
in a process where `polyp_diffusers` is not installed.
"""

import os
import shutil
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

PIPELINE_MODULE_NAME = "pipeline_polyp_ddpm"

# A mask pixel counts as "grey" (neither background nor polyp) between these fractions of the mask's scale.
# JPEG masks have such pixels only along edges (at most 0.5% in Kvasir-SEG); a photo has most of its pixels there.
GREY_BAND = (0.25, 0.75)
MAX_GREY_FRACTION = 0.10
# Mean absolute difference between a pixel's RGB channels and their mean, in 0-255 units, above which a
# three-channel image is a colour picture rather than a grey mask saved as RGB.
MAX_GREY_RGB_DEVIATION = 4.0

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import numpy as np
        >>> import torch
        >>> from polyp_diffusers import PolypDDPMPipeline

        >>> pipe = PolypDDPMPipeline.from_pretrained("path/to/polyp-ddpm")
        >>> mask = np.zeros((256, 256), dtype=np.uint8)
        >>> mask[96:160, 80:176] = 255  # one polyp
        >>> out = pipe(mask, num_images_per_mask=2, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("polyp.png")
        ```
"""


@dataclass
class PolypDDPMPipelineOutput(BaseOutput):
    """
    Output of [`PolypDDPMPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(N, H, W, 3)` or `torch.Tensor` of shape `(N, 3, H, W)`):
            Generated colonoscopy images with values in `[0, 1]` (PIL images in 0-255).
        masks (`list[PIL.Image.Image]`, `np.ndarray` of shape `(N, H, W, 1)` or `torch.Tensor` of shape `(N, 1, H, W)`):
            The binarized, resized masks the images were generated from: `masks[i]` belongs to `images[i]`.
            Values are 0 or 1 (0 or 255 for PIL images, mode `"L"`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _mask_array(mask, name: str) -> np.ndarray:
    """Turns one mask input into a float array of shape `(B, H, W)`, validating rank, channels and values."""
    if isinstance(mask, PIL.Image.Image):
        if {"R", "G", "B"} <= set(mask.getbands()):
            rgb = np.asarray(mask.convert("RGB"), dtype=np.float32)
            deviation = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean()
            if deviation > MAX_GREY_RGB_DEVIATION:
                raise ValueError(
                    f"{name} is a colour image (mode {mask.mode}, its RGB channels differ); expected a binary "
                    "segmentation mask (black background, white polyp)."
                )
            array = rgb.mean(axis=-1)
        else:  # one grey band, possibly with alpha ("LA"), which is ignored
            array = np.asarray(mask.getchannel(0))
        array = array[None]
    elif isinstance(mask, torch.Tensor):
        array = mask.detach().cpu()
        array = (array.float() if array.dtype in (torch.bfloat16, torch.float16) else array).numpy()
    elif isinstance(mask, np.ndarray):
        array = mask
    else:
        raise ValueError(
            f"{name} has unsupported type {type(mask).__name__}; expected a PIL image, a numpy array, "
            "a torch tensor or a list of these."
        )

    if array.ndim == 4:
        if array.shape[1] != 1:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)}, with {array.shape[1]} channels; expected (B, 1, H, W)."
            )
        array = array[:, 0]
    elif array.ndim == 3:
        if array.shape[0] != 1:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)}; expected (H, W), (1, H, W) or (B, 1, H, W) "
                "(a mask has one channel)."
            )
    elif array.ndim == 2:
        array = array[None]
    else:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected (H, W), (1, H, W) or (B, 1, H, W).")
    if 0 in array.shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)} with a zero-sized dimension.")

    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} has dtype {array.dtype}; expected bool, an integer or a floating-point dtype.")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"{name} has values in [{low:g}, {high:g}]; expected values in {{0, 1}} or {{0, 255}}.")
    scale = 255.0 if high > 1 else 1.0
    for index, single in enumerate(array):
        grey = ((single > GREY_BAND[0] * scale) & (single < GREY_BAND[1] * scale)).mean()
        if grey > MAX_GREY_FRACTION:
            where = f"{name}" if len(array) == 1 else f"{name}[{index}]"
            raise ValueError(
                f"{where} is not a binary mask: {grey:.0%} of its pixels lie between {GREY_BAND[0]:g} and "
                f"{GREY_BAND[1]:g} of its range (a JPEG mask has under {MAX_GREY_FRACTION:.0%}); "
                "expected values in {0, 1} or {0, 255}."
            )
    return array / scale


def prepare_masks(masks, size: tuple[int, int]) -> torch.Tensor:
    """
    Validates, binarizes and resizes masks for the model.

    Args:
        masks: a PIL image, numpy array or torch tensor of shape `(H, W)`, `(1, H, W)` or `(B, 1, H, W)` with
            values in {0, 1} or {0, 255} (bool, integer or float dtype), or a list of these (sizes may differ).
            JPEG artifacts are removed by thresholding at half the value range.
        size: `(height, width)` of the model.

    Returns:
        `torch.Tensor` of shape `(N, 1, height, width)`, float32, values exactly 0 or 1, in input order.
    """
    items = masks if isinstance(masks, (list, tuple)) else [masks]
    if len(items) == 0:
        raise ValueError("masks is empty; expected at least one mask.")
    prepared = []
    for index, item in enumerate(items):
        name = f"masks[{index}]" if isinstance(masks, (list, tuple)) else "mask"
        binary = torch.from_numpy(_mask_array(item, name) >= 0.5).float()[:, None]
        if tuple(binary.shape[-2:]) != tuple(size):
            binary = F.interpolate(binary, size=size, mode="nearest-exact")
        prepared.append(binary)
    return torch.cat(prepared)


def mask_model_input(masks: torch.Tensor, mask_channels: int) -> torch.Tensor:
    """The mask as the UNet sees it: `(B, 1, H, W)` in {0, 1} scaled to {-1, 1}, repeated `mask_channels` times."""
    return (masks * 2 - 1).repeat(1, mask_channels, 1, 1)


class PolypDDPMPipeline(DiffusionPipeline):
    r"""
    Generates colonoscopy images with a polyp where a binary mask says, by denoising random noise with a
    UNet that sees the noisy image and the mask side by side (Polyp-DDPM, Dorjsembe et al., arXiv:2402.04031).

    The UNet takes `3 + k` input channels: the noisy RGB image in `[-1, 1]` followed by the mask, scaled to
    `[-1, 1]` and repeated `k` times (`k = 1` for models trained here, `k = 3` for the authors' original layout).

    Args:
        unet ([`UNet2DModel`]):
            Predicts the noise of the image from `(noisy image, mask)`; `out_channels` is 3.
        scheduler ([`SchedulerMixin`]):
            Any diffusers scheduler: [`DDPMScheduler`] as trained (250 steps, `squaredcos_cap_v2`), or
            [`DDIMScheduler`] / [`DPMSolverMultistepScheduler`] for fewer steps.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)

    @property
    def sample_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def mask_channels(self) -> int:
        return self.unet.config.in_channels - self.unet.config.out_channels

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves weights and configs, plus this file so the folder loads without `polyp_diffusers` installed."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, f"{PIPELINE_MODULE_NAME}.py"))

    def _masks_for_output(self, masks: torch.Tensor, output_type: str):
        if output_type == "pt":
            return masks
        array = masks.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((mask[..., 0] * 255).astype(np.uint8), mode="L") for mask in array]

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        masks,
        num_images_per_mask: int = 1,
        num_inference_steps: int = 250,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> PolypDDPMPipelineOutput | tuple:
        r"""
        Generates one image per mask (times `num_images_per_mask`).

        Args:
            masks (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of these):
                Binary polyp masks, white (1 or 255) where the polyp is: shape `(H, W)`, `(1, H, W)` or
                `(B, 1, H, W)`; bool, integer or float. Masks are thresholded at half their range (so JPEG
                masks work) and resized to the model size with nearest-neighbour; masks in a list may differ
                in size. An all-zero mask is allowed and asks for polyp-free mucosa.
            num_images_per_mask (`int`, defaults to 1):
                Images generated for each mask; they follow each other in the output.
            num_inference_steps (`int`, defaults to 250):
                Denoising steps. 250 is the full DDPM chain the model is trained with; with
                `DDIMScheduler` or `DPMSolverMultistepScheduler` 25-50 steps work.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic. A list needs one generator per output image. With one
                generator, the images depend on `batch_size` too.
            batch_size (`int`, defaults to 16):
                Images denoised at once; bounds memory for long mask lists.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (`(N, H, W, 3)` in `[0, 1]`) or `"pt"` (`(N, 3, H, W)` in `[0, 1]`).
            return_dict (`bool`, defaults to `True`):
                Return a [`PolypDDPMPipelineOutput`] instead of a tuple `(images, masks)`.

        Examples:
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type is {output_type!r}; expected 'pil', 'np' or 'pt'.")
        if num_images_per_mask < 1 or batch_size < 1 or num_inference_steps < 1:
            raise ValueError(
                "num_images_per_mask, batch_size and num_inference_steps must be at least 1; got "
                f"{num_images_per_mask}, {batch_size} and {num_inference_steps}."
            )
        masks = prepare_masks(masks, self.sample_size).repeat_interleave(num_images_per_mask, dim=0)
        num_images = masks.shape[0]
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"generator is a list of {len(generator)} generators, but {num_images} images are requested "
                f"({num_images // num_images_per_mask} masks x {num_images_per_mask}); pass one per image."
            )

        device = self._execution_device
        dtype = self.unet.dtype
        num_batches = -(-num_images // batch_size)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        images = []
        with self.progress_bar(total=num_batches * len(self.scheduler.timesteps)) as progress_bar:
            for start in range(0, num_images, batch_size):
                batch_masks = masks[start : start + batch_size].to(device=device, dtype=dtype)
                batch_generator = generator[start : start + batch_size] if isinstance(generator, list) else generator
                mask_input = mask_model_input(batch_masks, self.mask_channels)
                shape = (batch_masks.shape[0], self.unet.config.out_channels, *self.sample_size)
                image = randn_tensor(shape, generator=batch_generator, device=device, dtype=dtype)
                # Multistep schedulers keep state between steps: reset it for every batch.
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                image = image * self.scheduler.init_noise_sigma
                for t in self.scheduler.timesteps:
                    model_input = torch.cat([self.scheduler.scale_model_input(image, t), mask_input], dim=1)
                    noise_pred = self.unet(model_input, t).sample
                    image = self.scheduler.step(noise_pred, t, image, generator=batch_generator).prev_sample
                    progress_bar.update()
                images.append(image.float().cpu())

        self.maybe_free_model_hooks()
        images = self.image_processor.postprocess(torch.cat(images), output_type=output_type)
        masks = self._masks_for_output(masks, output_type)
        if not return_dict:
            return (images, masks)
        return PolypDDPMPipelineOutput(images=images, masks=masks)

