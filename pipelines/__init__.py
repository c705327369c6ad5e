from .pipeline_polyp_ddpm import PolypDDPMPipeline, PolypDDPMPipelineOutput, prepare_masks

__all__ = ["PolypDDPMPipeline", "PolypDDPMPipelineOutput", "prepare_masks"]
