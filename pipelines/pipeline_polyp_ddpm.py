# Copyright 2026 The polyp-diffusers contributors. MIT License.
"""Mask-conditioned DDPM pipeline for colonoscopy polyp images (Polyp-DDPM, arXiv:2402.04031).

This file depends only on torch, numpy, PIL and diffusers, so the very same file can be saved next to the
weights and loaded with `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_polyp_ddpm")`
in a process where `polyp_diffusers` is not installed.
"""

import numbers
import os
import shutil
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

PIPELINE_MODULE_NAME = "pipeline_polyp_ddpm"

# A mask pixel counts as "grey" (neither background nor polyp) between these fractions of the mask's scale.
# JPEG masks have such pixels only along edges (at most 0.5% in Kvasir-SEG); a photo has most of its pixels there.
GREY_BAND = (0.25, 0.75)
MAX_GREY_FRACTION = 0.10
# Mean absolute difference between a pixel's RGB channels and their mean, in 0-255 units, above which a
# three-channel image is a colour picture rather than a grey mask saved as RGB.
MAX_GREY_RGB_DEVIATION = 4.0
# A mask whose polyp covers more than this fraction of the frame is probably inverted (white background).
MAX_POLYP_FRACTION = 0.9
# The polyp level of a mask: 1 or 255, and also 65535 for integer masks that can hold it (16-bit PNGs).
MASK_SCALES = (1, 255)
WIDE_INTEGER_MASK_SCALES = (1, 255, 65535)
# Float masks may pass the ends of their scale by this fraction of it (rounding, resampling): 1.0001 is 1.
FLOAT_OVERSHOOT = 0.01
# Tensor dtypes whose values numpy can hold exactly (float8 cannot; half precision is widened to float32).
TENSOR_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip

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


def _is_uniform(values: np.ndarray) -> bool:
    """Whether an `(H, W)` or `(H, W, C)` image has one value (or colour) everywhere."""
    return bool((values == values[0, 0]).all())


def _pil_mask_values(image: PIL.Image.Image, name: str) -> np.ndarray:
    """
    One mask image as a `(H, W)` array. A palette image is judged by its colours, not by its arbitrary indices;
    the alpha band is the mask only where the colour is uniform and the alpha is not (a polyp drawn as opacity).
    """
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    alpha = None
    if image.mode in ("LA", "RGBA"):
        alpha = np.asarray(image.getchannel("A"))
        image = image.convert(image.mode[:-1])
    if len(image.getbands()) > 1:
        values = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:  # "1" (bool), "L" (uint8), "I;16" (uint16), "I" (int32) or "F" (float32)
        values = np.asarray(image)
    if alpha is not None and _is_uniform(values) and not _is_uniform(alpha):
        return alpha
    if values.ndim == 3:
        deviation = np.abs(values - values.mean(axis=-1, keepdims=True)).mean()
        if deviation > MAX_GREY_RGB_DEVIATION:
            raise ValueError(
                f"{name} is a colour image (mode {mode}, its RGB channels differ); expected a binary "
                "segmentation mask (black background, white polyp)."
            )
        values = values.mean(axis=-1)
    return values


def _mask_array(mask, name: str) -> np.ndarray:
    """Turns one mask input into an array of shape `(B, H, W)` of its own dtype, validating type and rank."""
    if isinstance(mask, PIL.Image.Image):
        array = _pil_mask_values(mask, name)[None]
    elif isinstance(mask, torch.Tensor):
        if mask.layout != torch.strided:
            raise ValueError(f"{name} is a {mask.layout} tensor; expected a dense tensor (use .to_dense()).")
        if mask.dtype not in TENSOR_DTYPES:
            raise ValueError(
                f"{name} has dtype {mask.dtype}; expected bool, an integer dtype or float16, bfloat16, float32 "
                "or float64."
            )
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
    return array


def _describe_values(values: np.ndarray) -> str:
    distinct = np.unique(values)
    if len(distinct) <= 6:
        return "{" + ", ".join(f"{value:g}" for value in distinct) + "}"
    return f"{len(distinct)} distinct values in [{distinct[0]:g}, {distinct[-1]:g}]"


def _binarize(array: np.ndarray, name: str) -> np.ndarray:
    """
    Thresholds `(B, H, W)` mask values at half their scale, after checking that they are two levels of it:
    background near 0 and, unless the mask is empty, a polyp level near the scale, with few grey pixels between.
    """
    if array.dtype == np.bool_:
        return array
    is_integer = np.issubdtype(array.dtype, np.integer)
    if not (is_integer or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} has dtype {array.dtype}; expected bool, an integer or a floating-point dtype.")
    scales = WIDE_INTEGER_MASK_SCALES if is_integer and np.iinfo(array.dtype).max >= 65535 else MASK_SCALES
    levels = [f"{{0, {scale}}}" for scale in scales]
    expected = f"expected two levels: {', '.join(levels[:-1])} or {levels[-1]}"
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    overshoot = 0.0 if is_integer else FLOAT_OVERSHOOT
    scale = next((scale for scale in scales if values.max() <= scale * (1 + overshoot)), None)
    if scale is None or values.min() < -overshoot * scale:
        raise ValueError(f"{name} has values {_describe_values(values)}; {expected}.")
    for index, single in enumerate(values):
        where = name if len(values) == 1 else f"{name}[{index}]"
        grey = ((single > GREY_BAND[0] * scale) & (single < GREY_BAND[1] * scale)).mean()
        if grey > MAX_GREY_FRACTION:
            raise ValueError(
                f"{where} is not a binary mask: {grey:.0%} of its pixels lie between {GREY_BAND[0]:g} and "
                f"{GREY_BAND[1]:g} of its range (a JPEG mask has under {MAX_GREY_FRACTION:.0%}); it has values "
                f"{_describe_values(single)}; {expected}."
            )
        peak = single.max()
        if overshoot < peak < GREY_BAND[1] * scale:  # neither empty (0 within the overshoot of a 0-1 mask) nor a polyp
            raise ValueError(f"{where} has values {_describe_values(single)}; {expected}.")
    return values >= scale / 2


def prepare_masks(masks, size: tuple[int, int]) -> torch.Tensor:
    """
    Validates, binarizes and resizes masks for the model.

    A mask has two levels, background 0 and polyp at its scale: {0, 1} or {0, 255}, and also {0, 65535} for
    integer masks of 16 bits or more (16-bit PNGs). The scale is the smallest one its maximum fits in, and
    values are thresholded at half of it. Around the two levels, up to `MAX_GREY_FRACTION` (10%) of the
    pixels may be grey, between 25% and 75% of the scale (JPEG masks); other values (`{0, 1, 2}`, a grey
    photo, a mask without its polyp level) are an error that lists them. An all-zero mask is valid: polyp-free
    mucosa. Float masks may overshoot their scale by 1% (`1.0001` is 1; `1.02` is refused), never more.
    PIL images: a palette image ("P") is read through its palette, as the colours it shows; an RGB image must
    be grey (its channels equal); the alpha band (LA, RGBA) is the mask only when the colour is uniform and the
    alpha is not, otherwise it is ignored.

    Args:
        masks: a PIL image, numpy array or torch tensor of shape `(H, W)`, `(1, H, W)` or `(B, 1, H, W)` (bool,
            integer or float dtype), or a list of these (sizes may differ).
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
        binary = torch.from_numpy(_binarize(_mask_array(item, name), name).astype(np.float32))[:, None]
        if tuple(binary.shape[-2:]) != tuple(size):
            binary = F.interpolate(binary, size=size, mode="nearest-exact")
        prepared.append(binary)
    return torch.cat(prepared)


def check_positive_int(value, name: str):
    """Refuses anything but a whole number of at least 1 (a bool or 2.5 too), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} is {value!r} ({type(value).__name__}); expected an int of at least 1.")


def _check_generator(generator):
    if isinstance(generator, list):
        named = [(f"generator[{index}]", single) for index, single in enumerate(generator)]
    else:
        named = [] if generator is None else [("generator", generator)]
    for where, single in named:
        if not isinstance(single, torch.Generator):
            raise ValueError(
                f"{where} is {single!r} ({type(single).__name__}); expected a torch.Generator, a list of them "
                "(one per image) or None. For a seed, pass torch.Generator().manual_seed(seed)."
            )


def mask_channels_of(unet_config) -> int:
    """How many times a UNet takes the mask: its input channels beyond the 3 of the noisy image it predicts."""
    return unet_config.in_channels - unet_config.out_channels


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
        return mask_channels_of(self.unet.config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """
        Like [`DiffusionPipeline.from_pretrained`], but loads only safetensors weights by default: a pickled
        `.bin` file can run code when loaded. Pass `use_safetensors=False` to load one you trust.
        """
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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
                Binary polyp masks, white (1, 255, or 65535 for 16-bit PNGs) where the polyp is: shape
                `(H, W)`, `(1, H, W)` or `(B, 1, H, W)`; bool, integer or float. Masks are thresholded at half
                their range (so JPEG masks work) and resized to the model size with nearest-neighbour; masks in
                a list may differ in size. An all-zero mask is allowed and asks for polyp-free mucosa. Other
                values are refused; [`prepare_masks`] gives the exact rule (palette, alpha, float overshoot).
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
        check_positive_int(num_images_per_mask, "num_images_per_mask")
        check_positive_int(num_inference_steps, "num_inference_steps")
        check_positive_int(batch_size, "batch_size")
        _check_generator(generator)
        masks = prepare_masks(masks, self.sample_size)
        mostly_polyp = (masks.mean(dim=(1, 2, 3)) > MAX_POLYP_FRACTION).nonzero().flatten().tolist()
        if mostly_polyp:
            logger.warning(
                f"masks {mostly_polyp} are over {MAX_POLYP_FRACTION:.0%} polyp; are they inverted (white "
                "should be the polyp, black the background)?"
            )
        masks = masks.repeat_interleave(num_images_per_mask, dim=0)
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
