"""
The names the command line offers (samplers, precisions, compile modes, default sources), kept apart from the
modules that act on them so that `polyp-ddpm --help` and an argument error need neither torch nor diffusers.
"""

SAMPLERS = ("ddpm", "ddim", "dpmsolver")
# torch.compile's modes, as the training and sampling commands accept them: reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Model precisions by their short names, each with the name of its torch dtype.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# accelerate's mixed-precision modes, as the training scripts take them.
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# The study's presets and denoiser objectives (`study.STUDY_PRESETS`, `study.OBJECTIVES`).
STUDY_PRESET_NAMES = ("smoke", "quick-64", "paper")
STUDY_OBJECTIVES = ("paper", "velocity")
DINOV2_WEIGHTS = "facebook/dinov2-large"  # ViT-L/14, the features of Stein et al. (NeurIPS 2023)
# prepare-data's source for the built-in synthetic smoke-test set.
DEMO_SOURCE = "demo"
# Images per batch when a segmenter scores generated pairs (mask fidelity).
FIDELITY_BATCH_SIZE = 32
