"""The Polyp-DDPM denoiser as a configuration of `diffusers.UNet2DModel`, its noise schedule, its training
objective and its samplers."""

import hashlib
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin, UNet2DModel

from .choices import SAMPLERS
from .folders import file_sha256
from .pipelines.pipeline_polyp_ddpm import denoiser_output, mask_condition

# The paper's channel multipliers per image size (the guided-diffusion defaults its code uses).
PAPER_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}

# Named model sizes. "paper" is the published denoiser; the others exist for CPU demos and tests.
UNET_PRESETS = {
    "paper": dict(image_size=256),
    "paper-128": dict(image_size=128),
    "paper-64": dict(image_size=64),
    # About 1.1 M parameters at 64 px: trains on a laptop CPU in minutes (a smoke run, not a real model).
    "cpu-demo": dict(image_size=64, base_channels=32, channel_mult=(1, 2, 2), layers_per_block=1),
    # About 0.3 M parameters at 32 px: for unit tests.
    "tiny": dict(image_size=32, base_channels=32, channel_mult=(1, 1), layers_per_block=1),
}

# The reference embeds timesteps with a maximum period of 1000; diffusers' sinusoid uses 10000.
REFERENCE_MAX_PERIOD = 1000
DIFFUSERS_MAX_PERIOD = 10000

NUM_TRAIN_TIMESTEPS = 250
BETA_SCHEDULE = "squaredcos_cap_v2"
# log-SNR floor for DPM-Solver++. The cosine schedule's last beta is 0.999 (alpha-bar ~4e-8 at T, log-SNR -8.5):
# there the solver's data prediction divides by sqrt(alpha-bar) ~2e-4 and magnifies any error of the noise
# prediction 5000-fold. -5.1 (the floor of diffusers' fix for cosine schedules, used by DeepFloyd IF) starts the
# solver one training step later, at t=248.
DPMSOLVER_LAMBDA_MIN_CLIPPED = -5.1


def make_polyp_unet(
    image_size: int = 256,
    base_channels: int = 64,
    channel_mult: tuple[int, ...] | None = None,
    layers_per_block: int = 2,
    attention_resolutions: tuple[int, ...] = (16,),
    mask_channels: int = 1,
    dropout: float = 0.0,
    image_channels: int = 3,
) -> UNet2DModel:
    """
    Builds the mask-conditioned denoiser: input `3 + mask_channels` channels (noisy RGB, then the mask),
    output the 3-channel predicted noise (or velocity, with a `v_prediction` scheduler).

    The defaults are the paper's 256 px network (widths 64-64-128-128-256-256, two residual blocks per level,
    one-head self-attention at 16x16 and in the middle block, GroupNorm(32) + SiLU, sinusoidal time embedding
    with the reference's maximum period 1000), 28.4 M parameters.

    Args:
        image_size: square image side in pixels.
        base_channels: width of the first level.
        channel_mult: width multiplier per level; defaults to the paper's for 64, 128 and 256 px.
        layers_per_block: residual blocks per level (the decoder has one more).
        attention_resolutions: feature-map sides (in pixels) at which self-attention is applied.
        mask_channels: 1 for models trained with this package; 3 for the authors' RGB-mask layout.
        dropout: dropout inside the residual blocks.
        image_channels: channels of what is denoised: 3 (RGB); 1 with `mask_channels=0` for a model of masks
            alone (`PolypMaskPipeline`).
    """
    if channel_mult is None:
        if image_size not in PAPER_CHANNEL_MULT:
            raise ValueError(
                f"image_size {image_size} has no default channel_mult; pass channel_mult explicitly "
                f"(defaults exist for {sorted(PAPER_CHANNEL_MULT)})."
            )
        channel_mult = PAPER_CHANNEL_MULT[image_size]
    num_levels = len(channel_mult)
    if image_size % 2 ** (num_levels - 1):
        raise ValueError(f"image_size {image_size} is not divisible by 2**{num_levels - 1} for {num_levels} levels.")
    resolutions = [image_size // 2**level for level in range(num_levels)]
    with_attention = [resolution in attention_resolutions for resolution in resolutions]
    block_out_channels = tuple(base_channels * mult for mult in channel_mult)
    # Shift the sinusoid's frequency denominator so that its maximum period matches the reference's.
    half_dim = block_out_channels[0] // 2
    freq_shift = half_dim * (1 - math.log(DIFFUSERS_MAX_PERIOD) / math.log(REFERENCE_MAX_PERIOD))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=image_channels + mask_channels,
        out_channels=image_channels,
        layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in with_attention),
        up_block_types=tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(with_attention)),
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-5,
        freq_shift=freq_shift,
        flip_sin_to_cos=True,
        dropout=dropout,
    )


def make_polyp_unet_from_preset(name: str, **overrides) -> UNet2DModel:
    """Builds a named model size from `UNET_PRESETS`; keyword arguments override the preset."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(UNET_PRESETS)}.")
    return make_polyp_unet(**{**UNET_PRESETS[name], **overrides})


PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_polyp_scheduler(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, prediction_type: str = "epsilon", zero_terminal_snr: bool = False
) -> DDPMScheduler:
    """
    The paper's diffusion: cosine betas (clipped at 0.999), epsilon prediction, x0 clipped to [-1, 1].

    Options beyond the paper, saved in the scheduler config so that the pipeline and every sampler follow:
    `prediction_type="v_prediction"` and `zero_terminal_snr=True` (Lin et al. 2024, betas rescaled so the last
    step is pure noise). With the paper's objective the last steps (alpha-bar down to 4e-8) turn small noise
    errors into wrong colours at small training budgets; v-prediction with zero terminal SNR does not.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=BETA_SCHEDULE,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def diffusion_loss(unet, noise_scheduler, images, masks, mask_channels, generator, loss_type="l1", snr_gamma=None):
    """
    The paper's objective: predict the noise added to the image, given the noisy image and the mask (or the
    velocity, for a scheduler configured with `prediction_type="v_prediction"`). With `snr_gamma`, each image's
    loss is weighted by min-SNR (Hang et al., 2023: min(SNR, gamma) / SNR for noise, / (SNR + 1) for velocity),
    which keeps the many nearly clean timesteps from dominating the gradient; those weights are for `l2`
    (`check_snr_gamma`).
    """
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator, device=images.device
    )
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    prediction = denoiser_output(unet, noise_scheduler, noisy, mask_condition(masks, mask_channels), timesteps)
    velocity = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(images, noise, timesteps) if velocity else noise
    distance = F.l1_loss if loss_type == "l1" else F.mse_loss
    if snr_gamma is None:
        return distance(prediction.float(), target.float())
    from diffusers.training_utils import compute_snr  # here: that module adds 2 s to every command's imports

    per_image = distance(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma) / (snr + 1 if velocity else snr)
    return (per_image * weights).mean()


def check_snr_gamma(snr_gamma: float | None, prediction_type: str, zero_terminal_snr: bool, loss_type: str) -> None:
    """
    Min-SNR weighting as published, in train.py's terms: weights of a squared error (derived from the clean
    image's), divided by the SNR when predicting noise, so every training step needs an SNR above zero.
    """
    if snr_gamma is None:
        return
    if not snr_gamma > 0:
        raise ValueError(f"--snr_gamma is {snr_gamma}; min-SNR weighting needs a positive gamma (the paper's: 5).")
    if loss_type != "l2":
        raise ValueError(
            f"min-SNR weights are derived for a squared error, and the loss is {loss_type}: use --snr_gamma with "
            "--loss l2 (the paper's L1 would need other weights, which nobody has published)."
        )
    if zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError(
            "min-SNR weighting of a noise-predicting model divides by the SNR, which --zero_terminal_snr makes 0 at "
            "the last step: use --snr_gamma with --prediction_type v_prediction, or without --zero_terminal_snr."
        )


def make_sampler(name: str, config) -> SchedulerMixin:
    """
    A sampling scheduler (`ddpm`, `ddim` or `dpmsolver` = DPM-Solver++ 2M) from a trained scheduler's config.
    With zero terminal SNR the few-step samplers must start at the last training step ("trailing" spacing).
    """
    spacing = {"timestep_spacing": "trailing"} if config.get("rescale_betas_zero_snr") else {}
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config, **spacing)
    if name == "dpmsolver":
        # The log-SNR floor protects the data prediction of a noise-predicting model; a velocity-predicting one
        # gives x0 without dividing by sqrt(alpha-bar) and may start at the last step.
        floor = {"lambda_min_clipped": DPMSOLVER_LAMBDA_MIN_CLIPPED} if config.prediction_type == "epsilon" else {}
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", **floor, **spacing)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}.")


def default_device() -> str:
    """Where the commands run models unless told otherwise: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: str | torch.device) -> str:
    """A device as results record it: the GPU's name, or the CPU's with the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} {device.type.upper()}, {torch.get_num_threads()} threads"


# The weights that say which model a saved pipeline folder holds.
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def unet_weights_digest(model_dir: str | Path) -> str | None:
    """The SHA-256 of a local saved pipeline's UNet weights (None where there is none to read: a Hub id)."""
    try:
        return file_sha256(Path(model_dir) / UNET_WEIGHTS)
    except OSError:
        return None


# What a saved pipeline samples with besides its weights: its own options (start colour and timestep), the schedule
# its samplers are made from, and the network.
CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json")


def pipeline_config_digest(model_dir: str | Path) -> str | None:
    """
    The SHA-256 of a local saved pipeline's configuration, diffusers' own `_` entries (its version) left out, so
    that saving it again with another version is the same configuration. None where there is none to read (a Hub id).
    """
    digest = hashlib.sha256()
    try:
        for name in CONFIG_FILES:
            config = json.loads((Path(model_dir) / name).read_text())
            digest.update(
                json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True).encode()
            )
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object: loading it will say which
        return None
    return digest.hexdigest()
