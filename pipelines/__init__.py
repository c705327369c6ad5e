from .pipeline_polyp_ddpm import (
    PolypDDPMPipeline,
    PolypDDPMPipelineOutput,
    PolypInpaintPipeline,
    PolypMaskPipeline,
    PolypMaskPipelineOutput,
    is_mask_model,
    mask_channels_of,
    mask_model_input,
    masks_for_output,
    prepare_masks,
)

__all__ = [
    "PolypDDPMPipeline",
    "PolypDDPMPipelineOutput",
    "PolypInpaintPipeline",
    "PolypMaskPipeline",
    "PolypMaskPipelineOutput",
    "is_mask_model",
    "mask_channels_of",
    "mask_model_input",
    "masks_for_output",
    "prepare_masks",
]
