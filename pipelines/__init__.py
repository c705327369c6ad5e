from .pipeline_polyp_ddpm import (
    PolypDDPMPipeline,
    PolypDDPMPipelineOutput,
    PolypInpaintPipeline,
    mask_channels_of,
    mask_model_input,
    prepare_masks,
)

__all__ = [
    "PolypDDPMPipeline",
    "PolypDDPMPipelineOutput",
    "PolypInpaintPipeline",
    "mask_channels_of",
    "mask_model_input",
    "prepare_masks",
]
