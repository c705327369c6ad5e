# Copyright 2026 The polyp-diffusers contributors. MIT License.
"""Mask-conditioned DDPM pipelines for colonoscopy polyp images (Polyp-DDPM, arXiv:2402.04031).

`PolypDDPMPipeline` generates a whole image from a mask; `PolypInpaintPipeline` inserts a polyp into a real
frame with the same trained model (RePaint, Lugmayr et al., CVPR 2022), built with `from_pipe`.

This file depends only on torch, numpy, PIL and diffusers, so the very same file can be saved next to the
weights and loaded with `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_polyp_ddpm")`
in a process where `polyp_diffusers` is not installed.
"""

import inspect
import numbers
import os
import shutil
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, SchedulerMixin, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

PIPELINE_MODULE_NAME = "pipeline_polyp_ddpm"

# A mask pixel counts as "grey" (neither background nor polyp) between these fractions of the mask's scale.
# JPEG masks have such pixels only along edges (at most 0.5% in Kvasir-SEG); a photo has most of its pixels there.
GREY_BAND = (0.25, 0.75)
MAX_GREY_FRACTION = 0.10
# A value other than the two levels on more of a mask's pixels than this is a third level (a label map such as
# {0, 1, 255}, with 255 the "void" border), not JPEG noise: in Kvasir-SEG no such value covers over 1.4%.
MAX_THIRD_LEVEL_FRACTION = 0.03
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
# A float mask peaking at most at this fraction of its scale is empty (rounding noise). Above it, a peak below
# the grey band's top is neither empty nor a polyp: a 0-1 mask divided by 255 once too often peaks at 0.0039.
FLOAT_EMPTY_PEAK = 1e-3
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

INPAINT_EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import numpy as np
        >>> import PIL.Image
        >>> import torch
        >>> from polyp_diffusers import PolypDDPMPipeline, PolypInpaintPipeline

        >>> pipe = PolypDDPMPipeline.from_pretrained("path/to/polyp-ddpm")
        >>> inpaint = PolypInpaintPipeline.from_pipe(pipe)  # shares the weights, no copy
        >>> frame = PIL.Image.open("colonoscopy-frame.png")  # any size, RGB
        >>> mask = np.zeros((frame.height, frame.width), dtype=np.uint8)
        >>> mask[100:180, 120:220] = 255  # where the polyp goes
        >>> out = inpaint(image=frame, mask_image=mask, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("frame-with-polyp.png")  # the frame's size; only the edit region changed
        >>> out.masks[0].save("frame-with-polyp-mask.png")  # its segmentation label
        ```
"""

# Schedulers whose step has no state between calls, so that the known region can be replaced between steps and
# the chain can jump back (RePaint's resampling). Multistep solvers (DPM-Solver++) keep a history and cannot.
INPAINT_SCHEDULERS = (DDPMScheduler, DDIMScheduler)


@dataclass
class PolypDDPMPipelineOutput(BaseOutput):
    """
    Output of [`PolypDDPMPipeline`] and [`PolypInpaintPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(N, H, W, 3)` or `torch.Tensor` of shape `(N, 3, H, W)`):
            Generated colonoscopy images with values in `[0, 1]` (PIL images in 0-255).
        masks (`list[PIL.Image.Image]`, `np.ndarray` of shape `(N, H, W, 1)` or `torch.Tensor` of shape `(N, 1, H, W)`):
            The binarized masks the images were generated from, at the images' size: `masks[i]` belongs to
            `images[i]`. Values are 0 or 1 (0 or 255 for PIL images, mode `"L"`).
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

    shape = tuple(array.shape)  # as given, for the messages
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
        raise ValueError(f"{name} has shape {shape} with a zero-sized dimension.")
    return array


def _describe_values(values: np.ndarray) -> str:
    """`values {0, 1, 2}`, or `255 distinct values in [0, 255]`: what follows "has" in an error."""
    distinct = np.unique(values)
    if len(distinct) <= 6:
        return "values {" + ", ".join(f"{value:g}" for value in distinct) + "}"
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
        raise ValueError(f"{name} has {_describe_values(values)}; {expected}.")
    for index, single in enumerate(values):
        where = name if len(values) == 1 else f"{name}[{index}]"
        grey = ((single > GREY_BAND[0] * scale) & (single < GREY_BAND[1] * scale)).mean()
        if grey > MAX_GREY_FRACTION:
            raise ValueError(
                f"{where} is not a binary mask: {grey:.0%} of its pixels lie between {GREY_BAND[0]:g} and "
                f"{GREY_BAND[1]:g} of its range (a JPEG mask has under {MAX_GREY_FRACTION:.0%}); it has "
                f"{_describe_values(single)}; {expected}."
            )
        peak = single.max()
        if (0 if is_integer else FLOAT_EMPTY_PEAK * scale) < peak < GREY_BAND[1] * scale:  # neither empty nor a polyp
            raise ValueError(f"{where} has {_describe_values(single)}; {expected}.")
        third_level = _third_level(array[index] if is_integer else single, scale * overshoot, scale)
        if third_level is not None:
            value, fraction = third_level
            raise ValueError(
                f"{where} has three levels: {fraction:.0%} of its pixels are {value:g}, neither background (0) nor "
                f"polyp ({scale}) (a label map?); it has {_describe_values(single)}; {expected}."
            )
    return values >= scale / 2


def _third_level(single: np.ndarray, tolerance: float, scale: int) -> tuple[float, float] | None:
    """
    The most frequent value of a mask that lies more than `tolerance` from both levels, and the fraction of pixels
    it covers, when that is above `MAX_THIRD_LEVEL_FRACTION`.
    """
    if np.issubdtype(single.dtype, np.integer):  # counted in one pass: masks of 1920 x 1080 pixels are common
        counts = np.bincount(single.ravel().astype(np.int64), minlength=scale + 1)
        values = np.arange(len(counts))
    else:
        values, counts = np.unique(single, return_counts=True)
    others = (np.abs(values) > tolerance) & (np.abs(values - scale) > tolerance)
    if not others.any():
        return None
    top = counts[others].argmax()
    fraction = counts[others][top] / single.size
    return (float(values[others][top]), fraction) if fraction > MAX_THIRD_LEVEL_FRACTION else None


def prepare_masks(masks, size: tuple[int, int], warn: bool = False) -> torch.Tensor:
    """
    Validates, binarizes and resizes masks for the model; with `warn`, warns of masks the model will not draw as
    they are (mostly polyp: inverted?; a polyp too small to survive the resize).

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
        warn: whether to warn (a pipeline's input), or not (training batches).

    Returns:
        `torch.Tensor` of shape `(N, 1, height, width)`, float32, values exactly 0 or 1, in input order.
    """
    binaries = _binary_masks(masks)
    resized = torch.cat([resize_masks(binary, size) for binary in binaries])
    if warn:
        _warn_if_mostly_polyp(resized)
        _warn_if_polyp_vanished(binaries, resized)
    return resized


def _binary_masks(masks, argument: str = "masks", single_name: str = "mask") -> list[torch.Tensor]:
    """Each mask input validated and binarized at its own size: `(B, 1, H, W)` float32 tensors of 0 and 1."""
    items = masks if isinstance(masks, (list, tuple)) else [masks]
    if len(items) == 0:
        raise ValueError(f"{argument} is empty; expected at least one mask.")
    binaries = []
    for index, item in enumerate(items):
        name = f"{argument}[{index}]" if isinstance(masks, (list, tuple)) else single_name
        binaries.append(torch.from_numpy(_binarize(_mask_array(item, name), name).astype(np.float32))[:, None])
    return binaries


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary `(B, 1, H, W)` masks at `size` (height, width), nearest-neighbour, so they stay binary."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=size, mode="nearest-exact")


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


def check_sampling_arguments(output_type: str, num_images_per_mask, num_inference_steps, batch_size, generator):
    """The arguments both pipelines share, checked before any work."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type is {output_type!r}; expected 'pil', 'np' or 'pt'.")
    check_positive_int(num_images_per_mask, "num_images_per_mask")
    check_positive_int(num_inference_steps, "num_inference_steps")
    check_positive_int(batch_size, "batch_size")
    _check_generator(generator)


def _check_start(start_timestep, start_color, num_train_timesteps: int):
    """A start inside the trained chain, from an RGB colour in [0, 1]."""
    if (
        isinstance(start_timestep, bool)
        or not isinstance(start_timestep, numbers.Integral)
        or not 0 < start_timestep < num_train_timesteps
    ):
        raise ValueError(
            f"start_timestep is {start_timestep!r}; expected an int from 1 to {num_train_timesteps - 1} (the "
            "scheduler's training timesteps), or None for the whole chain."
        )
    if start_color is None:
        raise ValueError(
            "start_timestep needs start_color, the RGB colour in [0, 1] to start from (training/train.py saves the "
            "training images' mean in the pipeline config); pass start_color=[r, g, b]."
        )
    try:
        values = np.asarray(start_color, dtype=float) if not isinstance(start_color, str) else np.zeros(0)
    except (TypeError, ValueError):  # a dict, nested lists of other lengths
        values = np.zeros(0)
    if values.shape != (3,) or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"start_color is {start_color!r}; expected three numbers in [0, 1] (RGB).")


def _check_generator_count(generator, num_images: int, num_images_per_mask: int):
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(
            f"generator is a list of {len(generator)} generators, but {num_images} images are requested "
            f"({num_images // num_images_per_mask} masks x {num_images_per_mask}); pass one per image."
        )


def _warn_if_mostly_polyp(masks: torch.Tensor):
    mostly_polyp = (masks.mean(dim=(1, 2, 3)) > MAX_POLYP_FRACTION).nonzero().flatten().tolist()
    if mostly_polyp:
        logger.warning(
            f"masks {mostly_polyp} are over {MAX_POLYP_FRACTION:.0%} polyp; are they inverted (white "
            "should be the polyp, black the background)?"
        )


def _warn_if_polyp_vanished(binaries: list[torch.Tensor], masks: torch.Tensor):
    """Warns of masks with a polyp at their own size and none at the model's: too small to survive the resize."""
    had_polyp = torch.cat([binary.flatten(1).any(dim=1) for binary in binaries])
    vanished = (had_polyp & ~masks.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if vanished:
        height, width = masks.shape[-2:]
        logger.warning(
            f"masks {vanished} lose their polyp when resized to the model's {width}x{height} pixels (it is too "
            "small): they are generated as polyp-free mucosa. Draw the polyp larger, or crop around it."
        )


def mask_channels_of(unet_config) -> int:
    """How many times a UNet takes the mask: its input channels beyond the 3 of the noisy image it predicts."""
    return unet_config.in_channels - unet_config.out_channels


def is_mask_model(unet_config) -> bool:
    """Whether a UNet denoises masks alone (`PolypMaskPipeline`): one channel in and out, no condition."""
    return unet_config.in_channels == unet_config.out_channels == 1


class ModelKindError(ValueError):
    """A model of masks alone given to an image pipeline, the reverse, or a UNet that is neither (one without a mask)."""


def non_finite_names(named_tensors) -> list[str]:
    """The names of `(name, tensor)` pairs whose tensor holds NaN or inf, with one host sync for all of them."""
    named = [(name, tensor.detach()) for name, tensor in named_tensors]
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(tensor).all().to(device) for _, tensor in named]).tolist()
    return [name for (name, _), is_finite in zip(named, finite) if not is_finite]


def mask_condition(masks: torch.Tensor, mask_channels: int) -> torch.Tensor:
    """The mask as the UNet sees it: `(B, 1, H, W)` in {0, 1} scaled to {-1, 1}, repeated `mask_channels` times."""
    return (masks * 2 - 1).repeat(1, mask_channels, 1, 1)


def step_kwargs(scheduler: SchedulerMixin, generator) -> dict:
    """The `generator` for a scheduler step that draws noise (DDPM); schedulers that draw none (PNDM) take no such
    argument (as diffusers' pipelines do it, by the step's signature, once per batch rather than per step)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def denoiser_output(unet, scheduler, image: torch.Tensor, mask_input: torch.Tensor, t) -> torch.Tensor:
    """
    One call of the denoiser, seeing the noisy `image` at timestep `t` and the mask side by side: its estimate of
    the noise in `image`, or of the velocity for a `v_prediction` scheduler. Training and sampling both call it.
    The UNet sees `mask_input`'s dtype (the model's, for a model cast to bfloat16); the estimate comes back in
    `image`'s, so that a sampler keeps its chain in float32: 250 bfloat16 steps, each dividing by a square root of
    alpha-bar down to 2e-4, drift by several grey levels.
    """
    model_input = torch.cat([scheduler.scale_model_input(image, t).to(mask_input.dtype), mask_input], dim=1)
    return unet(model_input, t).sample.to(image.dtype)


# Masks in {0, 1} and inpainted images in [0, 1] are in the output range already: postprocessed as they are.
UNIT_RANGE_PROCESSOR = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=False)


def masks_for_output(masks: torch.Tensor, output_type: str):
    """`(N, 1, H, W)` masks in {0, 1} as `output_type`: the tensor, `(N, H, W, 1)` arrays or mode "L" images."""
    return UNIT_RANGE_PROCESSOR.postprocess(masks, output_type=output_type)


class PolypPipelineMixin:
    """
    What both pipelines of this file share: the model's size and mask layout, safetensors-only loading, saving
    this file beside the weights, and `from_pipe` that keeps the model's dtype.
    """

    @property
    def sample_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def mask_channels(self) -> int:
        return mask_channels_of(self.unet.config)

    # Whether this pipeline's UNet denoises masks alone (`PolypMaskPipeline`) or images beside their masks.
    denoises_masks = False

    def check_model_kind(self) -> None:
        """
        A model of the kind this pipeline runs: otherwise torch fails far from the cause, or a mask model's one
        channel comes out as "images".
        """
        config = self.unet.config
        if not is_mask_model(config) and not (config.out_channels == 3 and mask_channels_of(config) >= 1):
            raise ModelKindError(
                f"{type(self).__name__} cannot run a UNet with {config.in_channels} input and {config.out_channels} "
                "output channels: a model of polyp images takes the noisy RGB image and the mask (4 or more inputs, 3 "
                "outputs), a model of masks one channel in and out. An unconditional DDPM (3 in, 3 out) would ignore "
                "the masks."
            )
        if is_mask_model(config) != self.denoises_masks:
            kind, use = (
                ("a model of masks alone", "PolypMaskPipeline")
                if not self.denoises_masks
                else ("a model of images", "PolypDDPMPipeline or PolypInpaintPipeline")
            )
            raise ModelKindError(f"{type(self).__name__} cannot run {kind}; load it with {use}.")

    def check_weights(self, source: str | os.PathLike) -> None:
        """
        Refuses weights that would sample nonsense: ones the file lacks (diffusers leaves them on the `meta` device,
        and sampling fails far from the cause) and ones holding NaN or inf (all-black images, and no error at all).
        """
        missing = [name for name, tensor in self.unet.state_dict().items() if tensor.is_meta]
        if missing:
            raise ValueError(
                f"{source} lacks {len(missing)} weight tensors of its UNet (first: {', '.join(missing[:3])}): its "
                "unet/ weights file is incomplete or damaged: save or download the pipeline again."
            )
        non_finite = non_finite_names(self.unet.named_parameters())
        if non_finite:
            raise ValueError(
                f"{source} has NaN or inf in {len(non_finite)} weight tensors of its UNet (first: "
                f"{', '.join(non_finite[:3])}): the training diverged or the file is damaged."
            )

    def check_model_and_steps(self, num_inference_steps: int) -> None:
        """
        The model's kind, and no more steps than the scheduler can take on its schedule: more than the schedule
        has, or so many that a first-order scheduler repeats timesteps (DPM-Solver++ beyond 248 on the paper's
        schedule), would fail mid-run.
        """
        self.check_model_kind()
        trained_steps = self.scheduler.config.num_train_timesteps
        if num_inference_steps > trained_steps:
            raise ValueError(
                f"num_inference_steps is {num_inference_steps}; the model's schedule has {trained_steps} steps, no more."
            )
        try:
            self.scheduler.set_timesteps(num_inference_steps)
        except (ValueError, IndexError) as error:  # PNDM below 4 steps: a numpy broadcasting error
            more = range(num_inference_steps + 1, trained_steps + 1)
            fewest = next((steps for steps in more if self._can_take(steps)), None)
            raise ValueError(
                f"num_inference_steps is {num_inference_steps}; {type(self.scheduler).__name__} cannot take "
                f"{num_inference_steps} steps on this model's schedule"
                + (f": use at least {fewest}" if fewest is not None else "")
                + f" ({error})."
            ) from error
        timesteps = self.scheduler.timesteps
        distinct = len(torch.unique(timesteps))
        # One timestep a step, some of them repeated (second-order schedulers such as Heun repeat theirs by design).
        if len(timesteps) == num_inference_steps and distinct < num_inference_steps:
            # The most steps that are all distinct (not `distinct`, which can be far fewer at the failing count).
            most = next(steps for steps in range(num_inference_steps - 1, 0, -1) if self._all_distinct(steps))
            raise ValueError(
                f"num_inference_steps is {num_inference_steps}; {type(self.scheduler).__name__} finds only {distinct} "
                f"distinct timesteps on this model's schedule: use at most {most}."
            )

    def _can_take(self, num_inference_steps: int) -> bool:
        try:
            self.scheduler.set_timesteps(num_inference_steps)
        except (ValueError, IndexError):
            return False
        return True

    def _all_distinct(self, num_inference_steps: int) -> bool:
        self.scheduler.set_timesteps(num_inference_steps)
        return len(torch.unique(self.scheduler.timesteps)) == num_inference_steps

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """
        Like [`DiffusionPipeline.from_pretrained`], but loads only safetensors weights by default: a pickled
        `.bin` file can run code when loaded. Pass `use_safetensors=False` to load one you trust.
        It also refuses a model of the other kind (`ModelKindError`) and weights that are missing or hold NaN or inf.
        """
        kwargs.setdefault("use_safetensors", True)
        unet_folder = os.path.join(pretrained_model_name_or_path, "unet")
        if kwargs["use_safetensors"] and os.path.isdir(unet_folder):
            names = os.listdir(unet_folder)
            if not any(name.endswith(".safetensors") for name in names) and any(
                name.endswith(".bin") for name in names
            ):
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds only pickled .bin weights, which can run code when loaded, "
                    f"so they are refused. If you trust the file, convert it once: {cls.__name__}.from_pretrained("
                    "folder, use_safetensors=False).save_pretrained(new_folder)."
                )
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipeline.check_model_kind()
        if kwargs.get("device_map") is None:  # offloaded weights stay on the `meta` device until used
            pipeline.check_weights(pretrained_model_name_or_path)
        return pipeline

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """
        Like [`DiffusionPipeline.from_pipe`]: a pipeline of this class around the same UNet and scheduler (no
        copy). Unlike it, the shared modules keep their dtype unless `dtype=` is given (diffusers casts them to
        float32 by default, the original pipeline's too).
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs and hasattr(pipeline, "unet"):
            kwargs["dtype"] = pipeline.unet.dtype
        return super().from_pipe(pipeline, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves weights and configs, plus this file so the folder loads without `polyp_diffusers` installed."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, f"{PIPELINE_MODULE_NAME}.py"))


class PolypDDPMPipeline(PolypPipelineMixin, DiffusionPipeline):
    r"""
    Generates colonoscopy images with a polyp where a binary mask says, by denoising random noise with a
    UNet that sees the noisy image and the mask side by side (Polyp-DDPM, Dorjsembe et al., arXiv:2402.04031).

    The UNet takes `3 + k` input channels: the noisy RGB image in `[-1, 1]` followed by the mask, scaled to
    `[-1, 1]` and repeated `k` times (`k = 1` for models trained here, `k = 3` for the authors' original layout).

    Args:
        unet ([`UNet2DModel`]):
            Predicts the noise of the image (or its velocity, per the scheduler's `prediction_type`) from
            `(noisy image, mask)`; `out_channels` is 3.
        scheduler ([`SchedulerMixin`]):
            [`DDPMScheduler`] as trained (250 steps, `squaredcos_cap_v2`), or [`DDIMScheduler`] /
            [`DPMSolverMultistepScheduler`] for fewer steps (`make_sampler`). Other diffusers schedulers run too
            (tried: Euler, Euler ancestral, Heun, UniPC, DEIS; PNDM from 4 steps); steps a scheduler cannot take on
            this schedule are refused before sampling.
        start_color (`list[float]`, *optional*):
            RGB in `[0, 1]`: the mean colour of the training images (`training/train.py` saves it), for
            `start_timestep`.
        start_timestep (`int`, *optional*):
            The default of the call's `start_timestep`; None: the whole chain from pure noise.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        start_color: list[float] | None = None,
        start_timestep: int | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(start_color=start_color, start_timestep=start_timestep)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)

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
        start_timestep: int | None = None,
        start_color: list[float] | None = None,
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
            start_timestep (`int`, *optional*):
                Start the chain at this training timestep (the sampler's nearest timestep at or below it), from an
                image of `start_color` noised to it, instead of from pure noise at the last one; the sampler's
                later timesteps are skipped. A fix without
                retraining for briefly trained noise-predicting models: with the paper's schedule the last
                timesteps keep almost no signal (alpha-bar 4e-8 at 249), and their small errors set wrong colours.
                Defaults to the pipeline config's (None: the whole chain; to run the whole chain with a config that
                sets one, `pipe.register_to_config(start_timestep=None)`).
            start_color (`list[float]`, *optional*):
                RGB in `[0, 1]` to start from; defaults to the pipeline config's (the training images' mean).

        Examples:
        """
        check_sampling_arguments(output_type, num_images_per_mask, num_inference_steps, batch_size, generator)
        self.check_model_and_steps(num_inference_steps)
        start_timestep = self.config.start_timestep if start_timestep is None else start_timestep
        start_color = self.config.start_color if start_color is None else start_color
        if start_timestep is not None:
            _check_start(start_timestep, start_color, self.scheduler.config.num_train_timesteps)
        masks = prepare_masks(masks, self.sample_size, warn=True)
        masks = masks.repeat_interleave(num_images_per_mask, dim=0)
        num_images = masks.shape[0]
        _check_generator_count(generator, num_images, num_images_per_mask)

        device = self._execution_device
        dtype = self.unet.dtype
        num_batches = -(-num_images // batch_size)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if start_timestep is not None:
            timesteps = timesteps[timesteps <= start_timestep]
        if len(timesteps) == 0:
            raise ValueError(
                f"start_timestep {start_timestep} lies below every timestep of this sampler with "
                f"{num_inference_steps} steps (the lowest is {int(self.scheduler.timesteps.min())}): nothing would run."
            )
        images = []
        with self.progress_bar(total=num_batches * len(timesteps)) as progress_bar:
            for start in range(0, num_images, batch_size):
                batch_masks = masks[start : start + batch_size].to(device=device, dtype=dtype)
                batch_generator = generator[start : start + batch_size] if isinstance(generator, list) else generator
                mask_input = mask_condition(batch_masks, self.mask_channels)
                extra_step_kwargs = step_kwargs(self.scheduler, batch_generator)
                shape = (batch_masks.shape[0], self.unet.config.out_channels, *self.sample_size)
                image = randn_tensor(shape, generator=batch_generator, device=device, dtype=torch.float32)
                self.scheduler.set_timesteps(num_inference_steps, device=device)  # multistep ones keep state: anew
                if start_timestep is None:
                    image = image * self.scheduler.init_noise_sigma
                else:
                    color = torch.tensor(start_color, device=device).view(1, 3, 1, 1) * 2 - 1
                    image = self.scheduler.add_noise(color.expand_as(image), image, timesteps[:1])
                for t in timesteps:
                    model_output = denoiser_output(self.unet, self.scheduler, image, mask_input, t)
                    image = self.scheduler.step(model_output, t, image, **extra_step_kwargs).prev_sample
                    progress_bar.update()
                images.append(image.cpu())

        self.maybe_free_model_hooks()
        images = self.image_processor.postprocess(torch.cat(images), output_type=output_type)
        masks = masks_for_output(masks, output_type)
        if not return_dict:
            return (images, masks)
        return PolypDDPMPipelineOutput(images=images, masks=masks)


# New masks -------------------------------------------------------------------------------------------------------


@dataclass
class PolypMaskPipelineOutput(BaseOutput):
    """
    Output of [`PolypMaskPipeline`].

    Args:
        masks (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            Binary masks, white (1) where the polyp is: mode "L" images, `(N, H, W, 1)` arrays or
            `(N, 1, H, W)` tensors in {0, 1}.
    """

    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class PolypMaskPipeline(PolypPipelineMixin, DiffusionPipeline):
    r"""
    Generates new binary polyp masks by denoising random noise with an unconditional UNet trained on the masks
    of a dataset (`training/train.py --mask_model`): shapes, sizes and positions that no training mask has, for
    [`PolypDDPMPipeline`] to turn into images.

    Args:
        unet ([`UNet2DModel`]):
            Predicts the noise (or velocity) of a one-channel mask in `[-1, 1]`.
        scheduler ([`SchedulerMixin`]):
            The trained [`DDPMScheduler`], or DDIM / DPM-Solver++ for fewer steps (others as in
            [`PolypDDPMPipeline`]).
    """

    model_cpu_offload_seq = "unet"
    denoises_masks = True

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        num_masks: int = 1,
        num_inference_steps: int = 250,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> PolypMaskPipelineOutput | tuple:
        r"""
        Generates `num_masks` masks, thresholded at 0 of the denoised `[-1, 1]` sample.

        Args:
            num_masks (`int`, defaults to 1): How many masks.
            num_inference_steps (`int`, defaults to 250): Denoising steps.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per mask (then each mask is independent of `batch_size`).
            batch_size (`int`, defaults to 16): Masks denoised at once.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            return_dict (`bool`, defaults to `True`): Return a [`PolypMaskPipelineOutput`] instead of `(masks,)`.
        """
        check_sampling_arguments(output_type, 1, num_inference_steps, batch_size, generator)
        self.check_model_and_steps(num_inference_steps)
        check_positive_int(num_masks, "num_masks")
        _check_generator_count(generator, num_masks, 1)
        device = self._execution_device
        masks = []
        with self.progress_bar(total=-(-num_masks // batch_size) * num_inference_steps) as progress_bar:
            for start in range(0, num_masks, batch_size):
                count = min(batch_size, num_masks - start)
                batch_generator = generator[start : start + count] if isinstance(generator, list) else generator
                extra_step_kwargs = step_kwargs(self.scheduler, batch_generator)
                shape = (count, self.unet.config.out_channels, *self.sample_size)
                sample = randn_tensor(shape, generator=batch_generator, device=device, dtype=torch.float32)
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                sample = sample * self.scheduler.init_noise_sigma
                for t in self.scheduler.timesteps:  # the chain in float32, as `denoiser_output` says why
                    model_input = self.scheduler.scale_model_input(sample, t).to(self.unet.dtype)
                    model_output = self.unet(model_input, t).sample.float()
                    sample = self.scheduler.step(model_output, t, sample, **extra_step_kwargs).prev_sample
                    progress_bar.update()
                masks.append((sample > 0).float().cpu())
        self.maybe_free_model_hooks()
        masks = masks_for_output(torch.cat(masks), output_type)
        if not return_dict:
            return (masks,)
        return PolypMaskPipelineOutput(masks=masks)


# Inpainting ------------------------------------------------------------------------------------------------------


def check_frame_mode(frame: PIL.Image.Image, name: str) -> None:
    """Refuses 16-bit, 32-bit and float frames: PIL's RGB conversion clips them to 8 bits (white or black frames)."""
    if frame.mode.startswith(("I", "F")):
        raise ValueError(
            f"{name} has mode {frame.mode} (16-bit, 32-bit or float pixels); convert it to 8-bit RGB first."
        )


def _frame_tensor(frame, name: str) -> torch.Tensor:
    """One frame input as a `(B, 3, H, W)` float32 tensor in `[0, 1]`, validating type, shape and range."""
    if isinstance(frame, PIL.Image.Image):
        check_frame_mode(frame, name)
        values = torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.uint8).copy())[None].permute(0, 3, 1, 2)
        layout = "(H, W, 3)"
    elif isinstance(frame, np.ndarray):
        if frame.ndim not in (3, 4) or frame.shape[-1] != 3:
            raise ValueError(
                f"{name} has shape {frame.shape}; expected an RGB frame (H, W, 3) or (B, H, W, 3) as a numpy array."
            )
        if frame.dtype.kind not in "uif":
            raise ValueError(f"{name} has dtype {frame.dtype}; expected uint8 (0-255) or floats in [0, 1].")
        # A copy: an array of a PIL image is read-only, which torch warns of.
        values = torch.from_numpy(np.array(frame if frame.ndim == 4 else frame[None])).permute(0, 3, 1, 2)
        layout = "(H, W, 3)"
    elif isinstance(frame, torch.Tensor):
        if frame.ndim not in (3, 4) or frame.shape[-3] != 3:
            raise ValueError(
                f"{name} has shape {tuple(frame.shape)}; expected an RGB frame (3, H, W) or (B, 3, H, W) as a tensor."
            )
        values = (frame if frame.ndim == 4 else frame[None]).detach().cpu()
        layout = "(3, H, W)"
    else:
        raise ValueError(
            f"{name} has unsupported type {type(frame).__name__}; expected a PIL image, a numpy array (H, W, 3), "
            "a torch tensor (3, H, W) or a list of these."
        )
    if 0 in values.shape:
        raise ValueError(f"{name} has a zero-sized dimension; expected an RGB frame {layout}.")
    if values.dtype == torch.uint8:
        return values.float() / 255
    if not values.is_floating_point():
        raise ValueError(f"{name} has dtype {values.dtype}; expected uint8 (0-255) or floats in [0, 1].")
    values = values.float()
    if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(
            f"{name} has values in [{values.min().item():g}, {values.max().item():g}]; expected floats in [0, 1] "
            "(or uint8 0-255)."
        )
    return values


def prepare_inpainting_inputs(image, mask_image) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Validates frames and their masks for [`PolypInpaintPipeline`].

    Returns:
        `(frames, masks)`: `(N, 3, H, W)` float32 in `[0, 1]` and `(N, 1, H, W)` float32 in {0, 1}, at the
        frames' size. Refused: a frame without a mask (or a mask without a frame), frames of different sizes in one
        call, a mask of another size than its frame, colour or grey-level masks, a mask with no polyp pixel.
    """
    if image is None:
        raise ValueError(
            "image is missing: PolypInpaintPipeline inserts a polyp into a frame (image=frame, mask_image=mask); "
            "to generate a whole image from a mask, use PolypDDPMPipeline."
        )
    if mask_image is None:
        raise ValueError(
            "mask_image is missing: pass the binary mask (white = polyp) of where to insert the polyp into image."
        )
    frame_items = image if isinstance(image, (list, tuple)) else [image]
    if len(frame_items) == 0:
        raise ValueError("image is empty; expected at least one frame.")
    frames = [
        _frame_tensor(item, f"image[{index}]" if isinstance(image, (list, tuple)) else "image")
        for index, item in enumerate(frame_items)
    ]
    sizes = sorted({tuple(frame.shape[-2:]) for frame in frames})
    if len(sizes) > 1:
        listed = ", ".join(f"{width}x{height}" for height, width in sizes)
        raise ValueError(f"the frames have different sizes ({listed}); pass frames of one size per call.")
    frames = torch.cat(frames)
    masks = torch.cat(
        [
            binary
            if tuple(binary.shape[-2:]) == sizes[0]
            else _refuse_mask_size(binary, index, isinstance(mask_image, (list, tuple)), sizes[0])
            for index, binary in enumerate(_binary_masks(mask_image, "mask_image", "mask_image"))
        ]
    )
    if masks.shape[0] != frames.shape[0]:
        raise ValueError(
            f"image holds {frames.shape[0]} frame(s) and mask_image {masks.shape[0]} mask(s); pass one mask per frame."
        )
    empty = (masks.amax(dim=(1, 2, 3)) == 0).nonzero().flatten().tolist()
    if empty:
        where = "mask_image" if masks.shape[0] == 1 else f"mask_image{empty}"
        raise ValueError(
            f"{where} has no polyp pixel: there is nothing to insert. White (1 or 255) marks where the polyp goes."
        )
    return frames, masks


def _refuse_mask_size(binary: torch.Tensor, index: int, is_list: bool, frame_size: tuple[int, int]):
    name = f"mask_image[{index}]" if is_list else "mask_image"
    (height, width), (frame_height, frame_width) = binary.shape[-2:], frame_size
    raise ValueError(
        f"{name} is {width}x{height} pixels but its frame is {frame_width}x{frame_height}; a mask must have its "
        "frame's size (it says which pixels of the frame become polyp)."
    )


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(B, 3, H, W)` images in `[0, 1]` at `size` (height, width): bicubic with antialiasing, clamped."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary `(B, 1, H, W)` masks grown by a disk of `radius` pixels."""
    if radius == 0:
        return masks
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()[None, None]
    return (F.conv2d(masks.float(), disk.to(masks.device), padding=radius) > 0.5).to(masks.dtype)


def squared_distances(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """
    The squared Euclidean distance `(B, 1, H, W)` from each pixel to the nearest pixel of its binary mask, exact
    where it is at most `radius ** 2` and above that elsewhere (and where the mask is empty): two passes of 1D
    distances, along rows then columns, each over offsets up to `radius` (and the image's size).
    """
    far = float((masks.shape[-2] + masks.shape[-1] + radius) ** 2)
    distances = torch.where(masks > 0.5, 0.0, far)
    for dim in (-1, -2):
        size = masks.shape[dim]
        reach = min(radius, size - 1)
        padding = (reach, reach, 0, 0) if dim == -1 else (0, 0, reach, reach)
        padded = F.pad(distances, padding, value=far)
        for offset in range(-reach, reach + 1):
            shifted = padded.narrow(dim, reach + offset, size) + offset**2
            distances = torch.minimum(distances, shifted)
    return distances


def blend_weights(masks: torch.Tensor, blend_radius: int) -> torch.Tensor:
    """
    How much of each pixel the generated image supplies: 1 on the mask, falling linearly to `1 / (r + 1)` at
    `r = blend_radius` pixels from it, 0 beyond. Where it is above 0 is the edit region: the mask dilated by r
    (`dilate`). From the distance to the mask: linear in the radius, not cubic as dilating by every radius.
    """
    distances = squared_distances(masks.float(), blend_radius).sqrt().ceil()
    return (blend_radius + 1 - distances).clamp(min=0) / (blend_radius + 1)


def repaint_path(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """
    The positions along the inference timesteps that RePaint visits, in order: position `k < num_steps` is the
    noise level of `timesteps[k]`, `num_steps` the clean image. A step forward is one denoising step; a step back
    is a resampling jump. Every `jump_length` positions the chain jumps back `jump_length` positions
    `jump_n_sample - 1` times (Lugmayr et al. 2022, their `jump_length` and `jump_n_sample`); `jump_n_sample=1`
    never jumps.
    """
    jumps_left = {position: jump_n_sample - 1 for position in range(jump_length, num_steps, jump_length)}
    position, path = 0, [0]
    while position < num_steps:
        position += 1
        path.append(position)
        if jumps_left.get(position, 0) > 0:
            jumps_left[position] -= 1
            position -= jump_length
            path.append(position)
    return path


def renoise(sample: torch.Tensor, alpha_prod_from, alpha_prod_to, generator) -> torch.Tensor:
    """A sample of `q(x_to | x_from)`: `sample` noised from cumulative alpha `alpha_prod_from` down to `alpha_prod_to`."""
    ratio = (alpha_prod_to / alpha_prod_from).to(torch.float32)
    noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    return (ratio.sqrt() * sample.float() + (1 - ratio).sqrt() * noise.float()).to(sample.dtype)


def images_for_output(images: torch.Tensor, output_type: str):
    """`(N, 3, H, W)` images in `[0, 1]` as `output_type`: the tensor, `(N, H, W, 3)` arrays or RGB images."""
    return UNIT_RANGE_PROCESSOR.postprocess(images, output_type=output_type)


class PolypInpaintPipeline(PolypPipelineMixin, DiffusionPipeline):
    r"""
    Inserts a polyp into a real colonoscopy frame where a binary mask says, with a trained Polyp-DDPM model and no
    retraining (RePaint, Lugmayr et al., CVPR 2022): the UNet denoises the whole image conditioned on the mask,
    and before every step the region outside the edit region is replaced by the frame noised to that step, so the
    new polyp and the mucosa around it are generated to fit the real frame. Build it from a loaded model with
    `PolypInpaintPipeline.from_pipe(pipe)`.

    The edit region is the mask grown by `blend_radius` pixels; across that margin the output fades from the
    generated image to the frame, so no seam shows. Pixels outside the edit region are the frame's, exactly.

    Args:
        unet ([`UNet2DModel`]):
            The Polyp-DDPM denoiser (noisy image and mask in, noise out), as in [`PolypDDPMPipeline`].
        scheduler ([`SchedulerMixin`]):
            [`DDPMScheduler`] as trained, or [`DDIMScheduler`] for fewer steps. Multistep solvers keep state
            between steps and cannot resample, so they are refused.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    @replace_example_docstring(INPAINT_EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image=None,
        mask_image=None,
        num_images_per_mask: int = 1,
        num_inference_steps: int = 250,
        blend_radius: int = 4,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> PolypDDPMPipelineOutput | tuple:
        r"""
        Inserts a polyp into each frame (times `num_images_per_mask`).

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of these):
                The frames: RGB PIL images, arrays `(H, W, 3)` / `(B, H, W, 3)` or tensors `(3, H, W)` /
                `(B, 3, H, W)`, uint8 (0-255) or floats in `[0, 1]`. All frames of a call have one size, any size:
                they are resized to the model's size for sampling and the result is brought back to theirs.
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of these):
                One binary mask per frame, of its frame's size, white where the polyp goes (the mask rule of
                [`prepare_masks`]). It is both what the UNet sees as the polyp's shape and the region to edit. An
                empty mask is refused (nothing to insert).
            num_images_per_mask (`int`, defaults to 1):
                Different polyps inserted into each frame; they follow each other in the output.
            num_inference_steps (`int`, defaults to 250):
                Denoising steps: 250 is the trained DDPM chain; with [`DDIMScheduler`] 25-50 work.
            blend_radius (`int`, defaults to 4):
                The margin in pixels of the model's grid (the frame's pixels when it has the model's size) by
                which the mask is grown into the edit region. The mucosa there is generated too, and the output
                fades from generated to real across it. 0: only the mask is edited, with a hard edge (on a frame
                of another size than the model's, the edge is resampled with the model's grid: up to one model
                pixel around the mask changes too).
            jump_length (`int`, defaults to 10):
                RePaint's resampling: steps the chain jumps back each time.
            jump_n_sample (`int`, defaults to 1):
                RePaint's resampling: how often each stretch of `jump_length` steps is traversed; 1 disables the
                jumps, `n` makes sampling about `n` times slower and harmonizes the polyp with its surroundings
                better (the paper: `jump_length=10`, `jump_n_sample=10`).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic; a list needs one generator per output image and makes each image
                independent of `batch_size`.
            batch_size (`int`, defaults to 16):
                Images denoised at once.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (`(N, H, W, 3)` in `[0, 1]`) or `"pt"` (`(N, 3, H, W)` in `[0, 1]`).
            return_dict (`bool`, defaults to `True`):
                Return a [`PolypDDPMPipelineOutput`] (images and their masks, at the frames' size) instead of a
                tuple `(images, masks)`.

        Examples:
        """
        check_sampling_arguments(output_type, num_images_per_mask, num_inference_steps, batch_size, generator)
        if not isinstance(self.scheduler, INPAINT_SCHEDULERS):
            raise ValueError(
                f"PolypInpaintPipeline samples with DDPMScheduler (as trained) or DDIMScheduler; the scheduler is "
                f"{type(self.scheduler).__name__}, whose steps keep state and cannot resample. Set "
                "pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config) (or DDIMScheduler)."
            )
        self.check_model_and_steps(num_inference_steps)
        check_positive_int(jump_length, "jump_length")
        check_positive_int(jump_n_sample, "jump_n_sample")
        if isinstance(blend_radius, bool) or not isinstance(blend_radius, numbers.Integral) or blend_radius < 0:
            raise ValueError(f"blend_radius is {blend_radius!r}; expected an int of at least 0 (pixels).")

        # 1. Frames and masks at the frames' size, then at the model's size for sampling.
        frames, masks = prepare_inpainting_inputs(image, mask_image)
        model_masks = resize_masks(masks, self.sample_size)
        vanished = (model_masks.amax(dim=(1, 2, 3)) == 0).nonzero().flatten().tolist()
        if vanished:
            height, width = self.sample_size
            raise ValueError(
                f"the polyp of mask_image {vanished} is too small to survive resizing to the model's {width}x{height} "
                "pixels; draw a larger polyp."
            )
        _warn_if_mostly_polyp(model_masks)
        blend = blend_weights(model_masks, blend_radius)
        model_frames = resize_images(frames, self.sample_size) * 2 - 1
        frames, masks, model_masks, blend, model_frames = (
            tensor.repeat_interleave(num_images_per_mask, dim=0)
            for tensor in (frames, masks, model_masks, blend, model_frames)
        )
        num_images = frames.shape[0]
        _check_generator_count(generator, num_images, num_images_per_mask)

        # 2. RePaint: denoise the whole image, with the known region replaced by the frame noised to each step.
        device = self._execution_device
        dtype = self.unet.dtype
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        path = repaint_path(len(timesteps), jump_length, jump_n_sample)
        steps_per_batch = sum(after > before for before, after in zip(path, path[1:]))
        num_batches = -(-num_images // batch_size)
        samples = []
        with self.progress_bar(total=num_batches * steps_per_batch) as progress_bar:
            for start in range(0, num_images, batch_size):
                batch = slice(start, start + batch_size)
                batch_generator = generator[batch] if isinstance(generator, list) else generator
                known = model_frames[batch].to(device)
                edit = blend[batch].to(device) > 0
                mask_input = mask_condition(model_masks[batch].to(device=device, dtype=dtype), self.mask_channels)
                extra_step_kwargs = step_kwargs(self.scheduler, batch_generator)
                sample = randn_tensor(known.shape, generator=batch_generator, device=device, dtype=torch.float32)
                sample = sample * self.scheduler.init_noise_sigma
                for position, next_position in zip(path, path[1:]):
                    if next_position < position:  # a resampling jump back to a noisier step
                        alpha_from = alphas_cumprod[timesteps[position]]
                        alpha_to = alphas_cumprod[timesteps[next_position]]
                        sample = renoise(sample, alpha_from, alpha_to, batch_generator)
                        continue
                    t = timesteps[position]
                    noise = randn_tensor(known.shape, generator=batch_generator, device=device, dtype=torch.float32)
                    sample = torch.where(edit, sample, self.scheduler.add_noise(known, noise, t))
                    model_output = denoiser_output(self.unet, self.scheduler, sample, mask_input, t)
                    sample = self.scheduler.step(model_output, t, sample, **extra_step_kwargs).prev_sample
                    progress_bar.update()
                samples.append(torch.where(edit, sample, known).cpu())
        self.maybe_free_model_hooks()

        # 3. Back at the frames' size: generated inside the edit region, fading to the frame across the margin,
        # and the frame itself, exactly, outside it.
        generated = resize_images((torch.cat(samples) / 2 + 0.5).clamp(0, 1), tuple(frames.shape[-2:]))
        if tuple(blend.shape[-2:]) != tuple(frames.shape[-2:]):
            resized = F.interpolate(blend, size=tuple(frames.shape[-2:]), mode="bilinear", align_corners=False)
            blend = torch.maximum(resized.clamp(0, 1), masks)
        images = torch.where(blend > 0, blend * generated + (1 - blend) * frames, frames)

        images = images_for_output(images, output_type)
        masks = masks_for_output(masks, output_type)
        if not return_dict:
            return (images, masks)
        return PolypDDPMPipelineOutput(images=images, masks=masks)


def __dir__():
    # `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_polyp_ddpm")` takes the one subclass of
    # DiffusionPipeline that `dir()` of this file lists, and refuses a file that lists two. That pipeline is
    # PolypDDPMPipeline; PolypInpaintPipeline stays importable by name and is built from it with `from_pipe`, and
    # PolypMaskPipeline (a model of its own) loads through polyp_diffusers.
    return sorted(name for name in globals() if name not in ("PolypInpaintPipeline", "PolypMaskPipeline"))
