"""Colours after a short training, on a toy set of two flat colours (issue 16's diagnosis, kept as a test).

A tiny UNet trained 200 steps on a background of (200, 100, 80) with a polyp of (230, 210, 60): with the paper's
noise prediction, samples from pure noise come out in random colours, because the first steps of the chain
(alpha-bar down to 4e-8) turn small errors into the colour of the image; starting at timestep 200 from the
training images' mean colour, or training with v-prediction and zero terminal SNR, gives the data's colours.
"""

import pytest
import torch

from polyp_diffusers import PolypDDPMPipeline, make_polyp_scheduler, make_polyp_unet_from_preset
from polyp_diffusers.modeling import diffusion_loss
from polyp_diffusers.transforms import levels_of_images, mean_color

SIZE = 32
BACKGROUND = torch.tensor([200.0, 100.0, 80.0])
POLYP = torch.tensor([230.0, 210.0, 60.0])


def toy_pairs(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] of one round polyp of a flat colour on a flat background, and their masks."""
    rows, columns = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centres = torch.randint(8, 24, (count, 2), generator=generator)
    radii = torch.randint(4, 9, (count,), generator=generator)
    distance = (rows - centres[:, 0, None, None]) ** 2 + (columns - centres[:, 1, None, None]) ** 2
    masks = (distance < radii[:, None, None] ** 2).float()[:, None]
    colours = masks * POLYP.view(1, 3, 1, 1) + (1 - masks) * BACKGROUND.view(1, 3, 1, 1)
    return colours / 127.5 - 1, masks


def trained_pipeline(prediction_type: str, zero_terminal_snr: bool) -> PolypDDPMPipeline:
    torch.manual_seed(0)
    scheduler = make_polyp_scheduler(250, prediction_type, zero_terminal_snr)
    unet = make_polyp_unet_from_preset("tiny", image_size=SIZE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        images, masks = toy_pairs(16, generator)
        diffusion_loss(unet, scheduler, images, masks, 1, generator, "l1").backward()
        optimizer.step()
        optimizer.zero_grad()
    images, _ = toy_pairs(64, torch.Generator().manual_seed(2))
    pipeline = PolypDDPMPipeline(
        unet=unet.eval(), scheduler=scheduler, start_color=mean_color(levels_of_images(images))
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def background_colours(pipeline: PolypDDPMPipeline, **kwargs) -> torch.Tensor:
    """The mean background colour (0-255) of each of 8 images generated for toy masks."""
    _, masks = toy_pairs(8, torch.Generator().manual_seed(1))
    generators = [torch.Generator().manual_seed(seed) for seed in range(8)]
    images = pipeline(masks, generator=generators, batch_size=8, output_type="pt", **kwargs).images * 255
    background = 1 - masks
    return (images * background).sum(dim=(2, 3)) / background.sum(dim=(2, 3))


@pytest.fixture(scope="module")
def noise_predicting():
    return trained_pipeline("epsilon", zero_terminal_snr=False)


def test_noise_prediction_from_pure_noise_gives_random_colours(noise_predicting):
    # The failure the fixes below address: the colour spread across images is tens of levels.
    assert background_colours(noise_predicting).std(dim=0).min() > 40


def test_starting_from_the_mean_colour_gives_the_data_colours_without_retraining(noise_predicting):
    colours = background_colours(noise_predicting, start_timestep=200)
    assert (colours.mean(dim=0) - BACKGROUND).abs().max() < 20
    assert colours.std(dim=0).max() < 30


def test_velocity_with_zero_terminal_snr_gives_the_data_colours_from_pure_noise():
    colours = background_colours(trained_pipeline("v_prediction", zero_terminal_snr=True))
    assert (colours.mean(dim=0) - BACKGROUND).abs().max() < 15
    assert colours.std(dim=0).max() < 10
