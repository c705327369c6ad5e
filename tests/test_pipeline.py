"""PolypDDPMPipeline: inputs, outputs, determinism, schedulers and save/load, with a tiny untrained model."""

import copy
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DModel

from polyp_diffusers import PolypDDPMPipeline, make_sampler, prepare_masks
from polyp_diffusers.pipelines import ModelKindError

STEPS = 3


def generate(pipe, masks, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(masks, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize(
    "output_type, image_check, mask_check",
    [
        ("pil", lambda im: im.size == (32, 32) and im.mode == "RGB", lambda m: m.size == (32, 32) and m.mode == "L"),
        ("np", lambda im: im.shape == (32, 32, 3) and im.dtype == np.float32, lambda m: m.shape == (32, 32, 1)),
        ("pt", lambda im: im.shape == (3, 32, 32) and im.dtype == torch.float32, lambda m: m.shape == (1, 32, 32)),
    ],
)
def test_output_types_give_one_image_and_mask_per_request(
    tiny_pipeline, square_mask, output_type, image_check, mask_check
):
    out = generate(tiny_pipeline, [square_mask, square_mask], num_images_per_mask=2, output_type=output_type)
    assert len(out.images) == len(out.masks) == 4
    assert all(image_check(image) for image in out.images)
    assert all(mask_check(mask) for mask in out.masks)


def test_image_values_lie_in_unit_range(tiny_pipeline, square_mask):
    images = generate(tiny_pipeline, square_mask, output_type="np").images
    assert images.min() >= 0 and images.max() <= 1


def test_output_masks_are_paired_with_images_in_input_order(tiny_pipeline):
    empty, full = np.zeros((32, 32), np.uint8), np.full((32, 32), 255, np.uint8)
    out = generate(tiny_pipeline, [empty, full], num_images_per_mask=2, output_type="pt")
    assert [float(mask.mean()) for mask in out.masks] == [0.0, 0.0, 1.0, 1.0]


def test_return_dict_false_returns_images_and_masks(tiny_pipeline, square_mask):
    images, masks = generate(tiny_pipeline, square_mask, output_type="np", return_dict=False)
    assert images.shape == (1, 32, 32, 3) and masks.shape == (1, 32, 32, 1)


def test_same_seed_gives_same_images_and_other_seed_differs(tiny_pipeline, square_mask):
    first = generate(tiny_pipeline, square_mask, seed=1, output_type="np").images
    again = generate(tiny_pipeline, square_mask, seed=1, output_type="np").images
    other = generate(tiny_pipeline, square_mask, seed=2, output_type="np").images
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3


def test_generator_list_makes_each_image_independent_of_batching(tiny_pipeline, square_mask):
    def run(batch_size):
        generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
        return tiny_pipeline(
            [square_mask] * 3, num_inference_steps=STEPS, generator=generators, batch_size=batch_size, output_type="np"
        ).images

    np.testing.assert_allclose(run(batch_size=3), run(batch_size=1), atol=1e-5)
    single = generate(tiny_pipeline, square_mask, seed=2, output_type="np").images
    np.testing.assert_allclose(run(batch_size=2)[2], single[0], atol=1e-5)


def test_generator_list_of_wrong_length_is_refused(tiny_pipeline, square_mask):
    with pytest.raises(ValueError, match="one per image"):
        tiny_pipeline(square_mask, num_images_per_mask=2, generator=[torch.Generator()], num_inference_steps=1)


def test_the_mask_changes_the_generated_image(tiny_pipeline, square_mask):
    with_polyp = generate(tiny_pipeline, square_mask, output_type="np").images
    without = generate(tiny_pipeline, np.zeros_like(square_mask), output_type="np").images
    assert np.abs(with_polyp - without).mean() > 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver"])
def test_schedulers_swap_and_run_with_few_steps(tiny_pipeline, square_mask, sampler):
    original = tiny_pipeline.scheduler
    try:
        tiny_pipeline.scheduler = make_sampler(sampler, original.config)
        images = generate(tiny_pipeline, [square_mask] * 2, num_inference_steps=4, output_type="np").images
    finally:
        tiny_pipeline.scheduler = original
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_a_scheduler_that_draws_no_noise_runs_too(tiny_pipeline, square_mask):
    pipe = PolypDDPMPipeline(
        unet=tiny_pipeline.unet, scheduler=PNDMScheduler.from_config(tiny_pipeline.scheduler.config)
    )
    pipe.set_progress_bar_config(disable=True)  # PNDMScheduler.step takes no generator
    first, again = (generate(pipe, square_mask, num_inference_steps=4, output_type="np").images for _ in range(2))
    assert np.isfinite(first).all() and np.array_equal(first, again)
    with pytest.raises(
        ValueError,
        match="num_inference_steps is 3; PNDMScheduler cannot take 3 steps on this model's schedule: use at least 4 ",
    ):
        pipe(square_mask, num_inference_steps=3)


def test_more_steps_than_dpm_solver_finds_distinct_timesteps_are_refused_before_sampling(tiny_pipeline, square_mask):
    pipe = PolypDDPMPipeline(
        unet=tiny_pipeline.unet, scheduler=make_sampler("dpmsolver", tiny_pipeline.scheduler.config)
    )
    with pytest.raises(ValueError, match="finds only 248 distinct timesteps on this model's schedule: use at most 248"):
        pipe(square_mask, num_inference_steps=250)


def test_a_unet_without_a_mask_input_is_refused_by_name(tiny_pipeline, tmp_path):
    """An unconditional DDPM (3 in, 3 out) would run and ignore every mask."""
    unconditional = UNet2DModel.from_config({**tiny_pipeline.unet.config, "in_channels": 3})
    DDPMPipeline(unet=unconditional, scheduler=tiny_pipeline.scheduler).save_pretrained(tmp_path)
    with pytest.raises(ModelKindError, match="a UNet with 3 input and 3 output channels.*would ignore the masks"):
        PolypDDPMPipeline.from_pretrained(tmp_path)


def test_scheduler_swaps_the_diffusers_way(tiny_pipeline, square_mask):
    ddim = DDIMScheduler.from_config(tiny_pipeline.scheduler.config)
    pipe = PolypDDPMPipeline(unet=tiny_pipeline.unet, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(generate(pipe, square_mask, num_inference_steps=5, output_type="np").images).all()


@pytest.mark.parametrize(
    "sampler, steps, start, calls", [("ddpm", 250, 10, 11), ("ddim", 10, 100, 5), ("dpmsolver", 10, 100, 4)]
)
def test_a_start_timestep_runs_only_the_timesteps_from_there(tiny_pipeline, square_mask, sampler, steps, start, calls):
    pipe = PolypDDPMPipeline(
        unet=tiny_pipeline.unet,
        scheduler=make_sampler(sampler, tiny_pipeline.scheduler.config),
        start_color=[0.8, 0.4, 0.3],
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.unet.register_forward_hook(lambda module, inputs, output: seen.append(int(inputs[1].flatten()[0])))
    try:
        images = generate(pipe, square_mask, num_inference_steps=steps, start_timestep=start, output_type="np").images
    finally:
        hook.remove()
    assert len(seen) == calls and max(seen) <= start and np.isfinite(images).all()


def test_a_start_close_to_the_data_keeps_the_start_colour(tiny_pipeline, square_mask):
    # At timestep 1 almost nothing of the colour is noised away: an untrained model cannot change it much.
    pipe = PolypDDPMPipeline(unet=tiny_pipeline.unet, scheduler=tiny_pipeline.scheduler, start_color=[0.8, 0.4, 0.3])
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, square_mask, num_inference_steps=250, start_timestep=1, output_type="np").images
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), [0.8, 0.4, 0.3], atol=0.05)


def test_the_start_is_saved_in_the_pipeline_config_and_used_by_default(tiny_pipeline, square_mask, tmp_path):
    pipe = PolypDDPMPipeline(
        unet=tiny_pipeline.unet, scheduler=tiny_pipeline.scheduler, start_color=[0.8, 0.4, 0.3], start_timestep=1
    )
    pipe.save_pretrained(tmp_path / "saved")
    loaded = PolypDDPMPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.config.start_color, loaded.config.start_timestep) == ([0.8, 0.4, 0.3], 1)
    from_config = generate(loaded, square_mask, num_inference_steps=250, output_type="np").images
    explicit = generate(pipe, square_mask, num_inference_steps=250, start_timestep=1, output_type="np").images
    np.testing.assert_allclose(from_config, explicit, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start_timestep": 100}, "start_timestep needs start_color"),
        ({"start_timestep": 0, "start_color": [0.5] * 3}, "start_timestep is 0; expected an int from 1 to 249"),
        ({"start_timestep": 250, "start_color": [0.5] * 3}, "expected an int from 1 to 249"),
        ({"start_timestep": 1.5, "start_color": [0.5] * 3}, "expected an int"),
        ({"start_timestep": 100, "start_color": [200, 100, 80]}, "expected three numbers in \\[0, 1\\]"),
        ({"start_timestep": 100, "start_color": [0.5, 0.5]}, "expected three numbers"),
        ({"start_timestep": 100, "start_color": {"r": 1}}, "start_color is \\{'r': 1\\}; expected three numbers"),
    ],
)
def test_bad_starts_are_refused(tiny_pipeline, square_mask, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_pipeline, square_mask, **kwargs)


def test_a_start_below_every_timestep_of_the_sampler_is_refused(tiny_pipeline, square_mask):
    # DPM-Solver++ with 25 of 250 steps ends at timestep 10: a start at 5 would leave nothing to run.
    pipe = PolypDDPMPipeline(
        unet=tiny_pipeline.unet, scheduler=make_sampler("dpmsolver", tiny_pipeline.scheduler.config)
    )
    with pytest.raises(ValueError, match=r"start_timestep 5 lies below every timestep .* \(the lowest is 10\)"):
        generate(pipe, square_mask, num_inference_steps=25, start_timestep=5, start_color=[0.5] * 3)


def test_a_bfloat16_model_samples_within_a_grey_level_of_float32(tiny_pipeline, square_mask):
    # Only the UNet runs in bfloat16; a chain of bfloat16 steps drifted by 0.9 grey levels on average in 50 steps
    # (2.9 in 250), this one by 0.16.
    pipe = PolypDDPMPipeline(unet=copy.deepcopy(tiny_pipeline.unet), scheduler=tiny_pipeline.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu", torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    images = generate(pipe, square_mask, output_type="pt", num_inference_steps=50).images
    assert images.dtype == torch.float32
    float32_images = generate(tiny_pipeline, square_mask, output_type="pt", num_inference_steps=50).images
    assert (images - float32_images).abs().mean() * 255 < 0.4


def test_save_and_load_round_trip_reproduces_images(tiny_pipeline, saved_pipeline_dir, square_mask):
    files = {
        os.path.relpath(os.path.join(root, f), saved_pipeline_dir)
        for root, _, names in os.walk(saved_pipeline_dir)
        for f in names
    }
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert json.loads((saved_pipeline_dir / "model_index.json").read_text())["_class_name"] == "PolypDDPMPipeline"
    loaded = PolypDDPMPipeline.from_pretrained(saved_pipeline_dir)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    # Weights are bit-identical; BLAS may round differently on freshly loaded (differently aligned) tensors.
    np.testing.assert_allclose(
        generate(loaded, square_mask, output_type="np").images,
        generate(tiny_pipeline, square_mask, output_type="np").images,
        atol=1e-5,
    )
    for name, tensor in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(tensor, loaded.unet.state_dict()[name]), name


def test_pickled_weights_load_only_when_asked_for(tiny_pipeline, tmp_path):
    """A `.bin` file is a pickle that can run code on load: refused unless `use_safetensors=False` says so."""
    tiny_pipeline.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(ValueError, match="only pickled .bin weights.*use_safetensors=False"):
        PolypDDPMPipeline.from_pretrained(tmp_path)
    loaded = PolypDDPMPipeline.from_pretrained(tmp_path, use_safetensors=False)
    for name, tensor in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(tensor, loaded.unet.state_dict()[name]), name


def test_saved_folder_loads_with_diffusers_alone(saved_pipeline_dir, tmp_path):
    """The pipeline file saved beside the weights runs in a process where polyp_diffusers cannot be imported."""
    script = f"""
import sys
sys.modules["polyp_diffusers"] = None  # any import of the package now fails
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(saved_pipeline_dir)!r}, custom_pipeline="pipeline_polyp_ddpm", trust_remote_code=True)
mask = np.zeros((32, 32), np.uint8); mask[4:12, 4:12] = 255
out = pipe(mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
print(type(pipe).__name__, type(pipe).__module__, out.images.shape)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    name, module, *shape = result.stdout.split()
    assert name == "PolypDDPMPipeline" and not module.startswith("polyp_diffusers")
    assert " ".join(shape) == "(1, 32, 32, 3)"


# Mask preprocessing ------------------------------------------------------------------------------------------


def _binary_square(dtype=np.uint8, high=255, size=(32, 32)):
    mask = np.zeros(size, dtype=dtype)
    mask[8:20, 10:24] = high
    return mask


@pytest.mark.parametrize(
    "mask",
    [
        _binary_square(),
        _binary_square(np.float32, 1.0),
        _binary_square(np.float64, 255.0),
        _binary_square(bool, True),
        torch.from_numpy(_binary_square())[None],
        torch.from_numpy(_binary_square(np.float32, 1.0))[None, None],
        torch.from_numpy(_binary_square(np.float32, 1.0)).half(),
        PIL.Image.fromarray(_binary_square()),
        PIL.Image.fromarray(_binary_square()).convert("RGB"),
        PIL.Image.fromarray(_binary_square()).convert("RGBA"),
        PIL.Image.fromarray(_binary_square()).convert("1"),
        PIL.Image.fromarray(_binary_square()).convert("LA"),
    ],
    ids=[
        "uint8-255",
        "float-1",
        "float-255",
        "bool",
        "torch-1HW",
        "torch-B1HW",
        "half",
        "pil-L",
        "pil-RGB",
        "pil-RGBA",
        "pil-1",
        "pil-LA",
    ],
)
def test_every_supported_mask_form_gives_the_same_binary_mask(mask):
    expected = torch.from_numpy(_binary_square(np.float32, 1.0))[None, None]
    assert torch.equal(prepare_masks(mask, (32, 32)), expected)


def _palette_square(inverted_palette=False):
    """A palette ("P") mask showing the white square on black; with `inverted_palette`, index 0 is white."""
    indices = _binary_square(high=1)
    image = PIL.Image.fromarray(1 - indices if inverted_palette else indices, mode="P")
    image.putpalette([255, 255, 255, 0, 0, 0] if inverted_palette else [0, 0, 0, 255, 255, 255])
    return image


def _alpha_square(colour_mode, colour=255):
    """A mask drawn only as opacity: uniform colour, alpha 255 on the square."""
    colour_bands = [PIL.Image.new("L", (32, 32), colour)] * len(colour_mode)
    return PIL.Image.merge(colour_mode + "A", [*colour_bands, PIL.Image.fromarray(_binary_square())])


def _transparent_palette_square():
    """Both palette colours white; index 0 is transparent (a tRNS chunk), so only alpha shows the square."""
    image = PIL.Image.fromarray(_binary_square(high=1), mode="P")
    image.putpalette([255, 255, 255, 255, 255, 255])
    image.info["transparency"] = 0
    return image


def _square_with_noisy_alpha():
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    square = PIL.Image.fromarray(_binary_square())
    return PIL.Image.merge("RGBA", [square, square, square, PIL.Image.fromarray(noise)])


@pytest.mark.parametrize(
    "mask",
    [
        _binary_square(np.float32, 1.0001),
        _binary_square(np.uint16, 65535),
        _binary_square(np.int64, 1),
        torch.from_numpy(_binary_square(np.int32, 65535)),
        _palette_square(),
        _palette_square(inverted_palette=True),
        _transparent_palette_square(),
        _alpha_square("L", colour=0),
        _alpha_square("RGB"),
        _square_with_noisy_alpha(),
        PIL.Image.fromarray(_binary_square(np.float32, 1.0)),
    ],
    ids=[
        "float-overshoot",
        "uint16-65535",
        "int64-1",
        "torch-int32-65535",
        "pil-P",
        "pil-P-inverted-palette",
        "pil-P-transparency",
        "pil-LA-alpha-only",
        "pil-RGBA-alpha-only",
        "pil-RGBA-colour-wins-over-alpha",
        "pil-F",
    ],
)
def test_masks_are_read_by_what_they_show(mask):
    """Palette images by their colours, alpha only when the colour is uniform, float rounding above 1 tolerated."""
    expected = torch.from_numpy(_binary_square(np.float32, 1.0))[None, None]
    assert torch.equal(prepare_masks(mask, (32, 32)), expected)


def test_an_opaque_uniform_mask_with_alpha_is_judged_by_its_colour():
    opaque_black = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    assert prepare_masks(opaque_black, (32, 32)).sum() == 0


@pytest.mark.parametrize("mode", ["I;16", "I"])
@pytest.mark.parametrize("polyp_level", [65535, 255, 1])
def test_16_bit_png_masks_are_read(tmp_path, mode, polyp_level):
    path = tmp_path / "mask.png"
    PIL.Image.fromarray(_binary_square(np.uint16, polyp_level)).save(path)
    with PIL.Image.open(path) as png:
        assert png.mode == "I;16"
        mask = png.convert(mode)
    expected = torch.from_numpy(_binary_square(np.float32, 1.0))[None, None]
    assert torch.equal(prepare_masks(mask, (32, 32)), expected)


def _with_extra_value(mask, value):
    mask = mask.copy()
    mask[0, 0] = value
    return mask


@pytest.mark.parametrize(
    "masks, message",
    [
        (
            _with_extra_value(_binary_square(high=1), 2),
            r"^mask has values \{0, 1, 2\}; expected two levels: "
            r"\{0, 1\} or \{0, 255\}\.$",
        ),
        ([_binary_square(), _binary_square(high=3)], r"^masks\[1\] has values \{0, 3\}; expected two levels"),
        (
            torch.stack([torch.from_numpy(_binary_square()), torch.from_numpy(_binary_square(high=1))])[:, None],
            r"^mask\[1\] has values \{0, 1\}; expected two levels: \{0, 1\} or \{0, 255\}\.$",
        ),
        (_binary_square(np.float32, 1.02), r"^mask has values \{0, 1.02\}; expected two levels"),
        (np.pad(np.full((4, 4), 0.5, np.float32), 14), r"^mask has values \{0, 0.5\}; expected two levels"),
        (
            _binary_square(np.uint16, 1000),
            r"^mask has values \{0, 1000\}; expected two levels: \{0, 1\}, "
            r"\{0, 255\} or \{0, 65535\}\.$",
        ),
        (
            _binary_square(np.int64, 300),
            r"^mask has values \{0, 300\}; expected two levels: \{0, 1\}, "
            r"\{0, 255\} or \{0, 65535\}\.$",
        ),
        (
            _binary_square(np.uint8, 255) // 2,
            r"^mask is not a binary mask: 16% of its pixels .* it has values "
            r"\{0, 127\}; expected two levels",
        ),
        (PIL.Image.fromarray(_binary_square(np.uint16, 1000)), r"^mask has values \{0, 1000\}; expected"),
        (
            np.maximum(_binary_square(np.uint8, 255), np.pad(np.ones((6, 32), np.uint8), ((0, 26), (0, 0)))),
            r"^mask has three levels: 19% of its pixels are 1, neither background \(0\) nor polyp \(255\) \(a label "
            r"map\?\); it has values \{0, 1, 255\}",
        ),
        (_binary_square(np.float32, 1 / 255), r"^mask has values \{0, 0.00392157\}; expected two levels"),
    ],
    ids=[
        "0-1-2",
        "list-0-3",
        "batch-of-two-scales",
        "float-1.02",
        "float-half",
        "uint16-1000",
        "int64-300",
        "half-grey",
        "pil-I;16-1000",
        "label-map-0-1-255",
        "float-divided-by-255-twice",
    ],
)
def test_masks_that_are_not_two_levels_are_refused_with_their_values(masks, message):
    with pytest.raises(ValueError, match=message):
        prepare_masks(masks, (32, 32))


def test_jpeg_mask_artifacts_are_thresholded_away():
    buffer = io.BytesIO()
    PIL.Image.fromarray(_binary_square(size=(64, 64))).convert("RGB").save(buffer, format="JPEG", quality=75)
    jpeg = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    assert len(np.unique(np.asarray(jpeg))) > 2
    prepared = prepare_masks(jpeg, (64, 64))
    assert set(prepared.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(prepared[0, 0], torch.from_numpy(_binary_square(np.float32, 1.0, size=(64, 64))))


def test_masks_of_different_sizes_are_resized_with_nearest_neighbour():
    small = _binary_square(size=(16, 16))
    big = np.kron(_binary_square(), np.ones((4, 4), np.uint8))  # 128x128, same shape upscaled
    prepared = prepare_masks([small, big], (32, 32))
    assert prepared.shape == (2, 1, 32, 32)
    assert set(prepared.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(prepared[1, 0], torch.from_numpy(_binary_square(np.float32, 1.0)))


def test_batched_masks_expand_in_order():
    batch = torch.stack([torch.zeros(1, 32, 32), torch.ones(1, 32, 32)])
    prepared = prepare_masks([batch, torch.ones(32, 32)], (32, 32))
    assert prepared.mean(dim=(1, 2, 3)).tolist() == [0.0, 1.0, 1.0]


def test_an_empty_mask_is_allowed(tiny_pipeline):
    out = generate(tiny_pipeline, np.zeros((32, 32), np.uint8), output_type="pt")
    assert out.masks.sum() == 0 and torch.isfinite(out.images).all()


def _colour_photo():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB")


@pytest.mark.parametrize(
    "masks, message",
    [
        (torch.zeros(2, 3, 32, 32), r"mask has shape \(2, 3, 32, 32\), with 3 channels"),
        (torch.zeros(3, 32, 32), r"mask has shape \(3, 32, 32\).*one channel"),
        (torch.zeros(1, 1, 1, 32, 32), r"mask has shape \(1, 1, 1, 32, 32\)"),
        (np.zeros(32), r"mask has shape \(32,\)"),
        (np.zeros((0, 32)), "zero-sized"),
        (torch.zeros(0, 1, 32, 32), r"mask has shape \(0, 1, 32, 32\) with a zero-sized dimension"),
        ([_binary_square(), torch.full((32, 32), float("nan"))], r"masks\[1\] contains NaN"),
        (np.full((32, 32), np.inf), "NaN or infinite"),
        (_colour_photo(), "colour image"),
        (np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8), "not a binary mask"),
        (np.full((32, 32), -1.0), r"mask has values \{-1\}; expected two levels: \{0, 1\} or \{0, 255\}"),
        (np.full((32, 32), 300.0), r"mask has values \{300\}; expected two levels: \{0, 1\} or \{0, 255\}"),
        (torch.zeros(32, 32, dtype=torch.float8_e4m3fn), "dtype torch.float8_e4m3fn; expected bool, an integer"),
        (torch.zeros(32, 32).to_sparse(), "mask is a torch.sparse_coo tensor; expected a dense tensor"),
        ("mask.png", "unsupported type str"),
        (np.zeros((32, 32), dtype=np.complex64), "dtype complex64"),
        ([], "masks is empty"),
    ],
    ids=[
        "3-channel-batch",
        "3-channel",
        "rank-5",
        "rank-1",
        "zero-size",
        "empty-batch",
        "nan",
        "inf",
        "colour-photo",
        "grey-photo",
        "negative",
        "above-255",
        "float8",
        "sparse",
        "string",
        "complex",
        "empty-list",
    ],
)
def test_bad_masks_are_refused_with_a_message_naming_them(tiny_pipeline, masks, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(masks, num_inference_steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(output_type="latent"), "output_type"),
        (dict(num_images_per_mask=0), r"num_images_per_mask is 0 \(int\); expected an int of at least 1"),
        (dict(num_images_per_mask=2.5), r"num_images_per_mask is 2.5 \(float\); expected an int of at least 1"),
        (dict(num_images_per_mask=True), r"num_images_per_mask is True \(bool\); expected an int of at least 1"),
        (dict(num_images_per_mask="2"), r"num_images_per_mask is '2' \(str\); expected an int of at least 1"),
        (dict(batch_size=0), r"batch_size is 0 \(int\); expected an int of at least 1"),
        (dict(batch_size=1.5), r"batch_size is 1.5 \(float\); expected an int of at least 1"),
        (dict(num_inference_steps=0), r"num_inference_steps is 0 \(int\); expected an int of at least 1"),
        (dict(num_inference_steps=2.5), r"num_inference_steps is 2.5 \(float\); expected an int of at least 1"),
        (dict(generator=0), r"generator is 0 \(int\); expected a torch.Generator, a list of them"),
        (dict(generator=[torch.Generator(), 0]), r"generator\[1\] is 0 \(int\); expected a torch.Generator"),
    ],
    ids=[
        "output-type",
        "images-zero",
        "images-float",
        "images-bool",
        "images-str",
        "batch-zero",
        "batch-float",
        "steps-zero",
        "steps-float",
        "generator-int",
        "generator-list-with-int",
    ],
)
def test_bad_arguments_are_refused(tiny_pipeline, square_mask, kwargs, message):
    kwargs.setdefault("num_inference_steps", 1)
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(square_mask, **kwargs)


def test_arguments_are_checked_before_the_masks_are_read(tiny_pipeline):
    with pytest.raises(ValueError, match="batch_size is 1.5"):
        tiny_pipeline([], batch_size=1.5, num_inference_steps=1)


def test_numpy_integers_are_accepted_as_counts(tiny_pipeline, square_mask):
    out = generate(tiny_pipeline, square_mask, num_images_per_mask=np.int64(2), num_inference_steps=np.int32(1))
    assert len(out.images) == 2


def test_a_mostly_white_mask_is_flagged_as_possibly_inverted(tiny_pipeline, square_mask, caplog):
    inverted = np.full_like(square_mask, 255)
    inverted[8:12, 10:16] = 0  # white background, a small black polyp: 98% "polyp"
    with caplog.at_level(logging.WARNING):
        tiny_pipeline([square_mask, inverted], num_inference_steps=1, output_type="np")
    assert any("masks [1] are over 90% polyp" in message for message in caplog.messages)


def test_a_polyp_too_small_to_survive_the_resize_is_warned_of(tiny_pipeline, square_mask, caplog):
    speck = np.zeros((1001, 1001), dtype=np.uint8)
    speck[500, 500] = 255  # one pixel in a thousand: gone at 32x32
    with caplog.at_level(logging.WARNING):
        out = tiny_pipeline([square_mask, speck, np.zeros_like(speck)], num_inference_steps=1, output_type="np")
    assert not out.masks[1].any()
    assert any("masks [1] lose their polyp when resized to the model's 32x32 pixels" in m for m in caplog.messages)
