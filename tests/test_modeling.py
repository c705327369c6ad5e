"""The denoiser factory and the noise schedule follow the paper's network and diffusion."""

import math

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from polyp_diffusers import (
    UNET_PRESETS,
    PolypDDPMPipeline,
    make_polyp_scheduler,
    make_polyp_unet,
    make_polyp_unet_from_preset,
    make_sampler,
)
from polyp_diffusers.modeling import check_snr_gamma, diffusion_loss


def test_default_unet_is_the_papers_256px_denoiser():
    unet = make_polyp_unet()
    config = unet.config
    assert (config.sample_size, config.in_channels, config.out_channels) == (256, 4, 3)
    assert tuple(config.block_out_channels) == (64, 64, 128, 128, 256, 256)
    assert tuple(config.down_block_types) == ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
    assert tuple(config.up_block_types) == ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4
    assert config.layers_per_block == 2 and config.attention_head_dim is None
    # The reference denoiser with a 4-channel input has 28.45 M parameters.
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(28.45e6, rel=1e-3)


def test_time_embedding_has_the_reference_maximum_period_of_1000():
    unet = make_polyp_unet_from_preset("tiny")
    timesteps = torch.tensor([0, 7, 249])
    half = unet.config.block_out_channels[0] // 2
    freqs = torch.exp(-math.log(1000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(unet.time_proj(timesteps), expected, atol=1e-5, rtol=1e-5)


def test_mask_channels_set_the_input_width():
    assert make_polyp_unet_from_preset("tiny", mask_channels=3).config.in_channels == 6


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_every_preset_builds_and_runs(name):
    unet = make_polyp_unet_from_preset(name)
    if unet.config.sample_size <= 64:
        size = unet.config.sample_size
        with torch.no_grad():
            out = unet(torch.randn(1, 4, size, size), torch.tensor([3])).sample
        assert out.shape == (1, 3, size, size)


def test_unknown_preset_and_size_without_defaults_are_refused():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        make_polyp_unet_from_preset("huge")
    with pytest.raises(ValueError, match="image_size 96 has no default channel_mult"):
        make_polyp_unet(image_size=96)
    with pytest.raises(ValueError, match="not divisible"):
        make_polyp_unet(image_size=36, channel_mult=(1, 2, 2, 2))


def test_scheduler_is_the_cosine_schedule_with_250_steps():
    scheduler = make_polyp_scheduler()
    steps = 250
    t = np.arange(steps + 1) / steps
    alphas_cumprod = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
    np.testing.assert_allclose(scheduler.betas.numpy(), betas, atol=1e-6)
    assert scheduler.config.clip_sample and scheduler.config.prediction_type == "epsilon"


def test_v_prediction_with_zero_terminal_snr_is_kept_in_the_config_and_followed_by_every_sampler():
    scheduler = make_polyp_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # the last step is (almost exactly) pure noise
    for name in ("ddim", "dpmsolver"):
        sampler = make_sampler(name, scheduler.config)
        sampler.set_timesteps(10)
        assert sampler.config.prediction_type == "v_prediction"
        assert int(sampler.timesteps[0]) == 249  # "trailing" spacing starts at the last training step
    assert make_sampler("ddim", make_polyp_scheduler().config).config.timestep_spacing != "trailing"


class PredictsZero(torch.nn.Module):
    """A denoiser whose prediction is 0: its loss is the target's own size, computable by hand."""

    def forward(self, sample, timestep):
        return UNet2DOutput(sample=torch.zeros_like(sample[:, :3]))


def target_and_timesteps(scheduler, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What `diffusion_loss` with a generator seeded `seed` compares the prediction with, and its timesteps."""
    generator = torch.Generator().manual_seed(seed)  # the same draws as inside the loss
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, 250, (len(images),), generator=generator)
    velocity = scheduler.config.prediction_type == "v_prediction"
    return (scheduler.get_velocity(images, noise, timesteps) if velocity else noise), timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_compares_the_prediction_with_the_noise_or_the_velocity(prediction_type):
    scheduler = make_polyp_scheduler(prediction_type=prediction_type)
    images, masks = torch.rand(2, 3, 8, 8) * 2 - 1, torch.ones(2, 1, 8, 8)
    loss = diffusion_loss(PredictsZero(), scheduler, images, masks, 1, torch.Generator().manual_seed(0), "l1")
    target, _ = target_and_timesteps(scheduler, images)
    torch.testing.assert_close(loss, target.abs().mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_weights_each_image_by_its_timestep(prediction_type):
    scheduler = make_polyp_scheduler(prediction_type=prediction_type)
    images, masks = torch.rand(4, 3, 8, 8) * 2 - 1, torch.ones(4, 1, 8, 8)

    def loss(snr_gamma):
        generator = torch.Generator().manual_seed(0)
        return diffusion_loss(PredictsZero(), scheduler, images, masks, 1, generator, "l2", snr_gamma)

    target, timesteps = target_and_timesteps(scheduler, images)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    weights = snr.clamp(max=5) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert weights.min() < 0.99  # a draw where the weighting changes something
    torch.testing.assert_close(loss(5.0), (target.square().mean(dim=(1, 2, 3)) * weights).mean())
    if prediction_type == "epsilon":  # a gamma above every SNR weighs every image 1: the paper's loss
        torch.testing.assert_close(loss(1e12), loss(None))


def test_min_snr_weighting_needs_a_positive_gamma_a_squared_error_and_a_nonzero_snr_for_noise():
    check_snr_gamma(None, "epsilon", True, "l1")
    check_snr_gamma(5, "v_prediction", True, "l2")
    with pytest.raises(ValueError, match="positive gamma"):
        check_snr_gamma(0, "epsilon", False, "l2")
    with pytest.raises(ValueError, match="derived for a squared error, and the loss is l1"):
        check_snr_gamma(5, "epsilon", False, "l1")
    with pytest.raises(ValueError, match="--zero_terminal_snr makes 0"):
        check_snr_gamma(5, "epsilon", True, "l2")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver"])
def test_a_velocity_model_with_zero_terminal_snr_samples_finite_images(sampler):
    scheduler = make_polyp_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)
    pipe = PolypDDPMPipeline(
        unet=make_polyp_unet_from_preset("tiny"), scheduler=make_sampler(sampler, scheduler.config)
    )
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    images = pipe(mask, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
