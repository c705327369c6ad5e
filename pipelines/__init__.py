from .pipeline_polyp_ddpm import (
    ModelKindError,
    PolypDDPMPipeline,
    PolypDDPMPipelineOutput,
    PolypInpaintPipeline,
    PolypMaskPipeline,
    PolypMaskPipelineOutput,
    is_mask_model,
    mask_channels_of,
    mask_condition,
    masks_for_output,
    non_finite_names,
    prepare_masks,
)

__all__ = [
    "ModelKindError",
    "PolypDDPMPipeline",
    "PolypDDPMPipelineOutput",
    "PolypInpaintPipeline",
    "PolypMaskPipeline",
    "PolypMaskPipelineOutput",
    "is_mask_model",
    "mask_channels_of",
    "mask_condition",
    "masks_for_output",
    "non_finite_names",
    "prepare_masks",
]
