"""polyp-diffusers: colonoscopy polyp images from binary masks (Polyp-DDPM) as a diffusers pipeline."""

from .modeling import UNET_PRESETS, make_polyp_scheduler, make_polyp_unet, make_polyp_unet_from_preset, make_sampler
from .pipelines import (
    PolypDDPMPipeline,
    PolypDDPMPipelineOutput,
    PolypInpaintPipeline,
    PolypMaskPipeline,
    PolypMaskPipelineOutput,
    prepare_masks,
)

__version__ = "0.1.0"

__all__ = [
    "PolypDDPMPipeline",
    "PolypDDPMPipelineOutput",
    "PolypInpaintPipeline",
    "PolypMaskPipeline",
    "PolypMaskPipelineOutput",
    "UNET_PRESETS",
    "make_polyp_scheduler",
    "make_polyp_unet",
    "make_polyp_unet_from_preset",
    "make_sampler",
    "prepare_masks",
]
