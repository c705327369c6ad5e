"""PolypInpaintPipeline: a polyp inserted into a real frame by a trained Polyp-DDPM model (RePaint), nothing else touched."""

import json
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from polyp_diffusers import (
    PolypDDPMPipeline,
    PolypInpaintPipeline,
    make_polyp_scheduler,
    make_polyp_unet_from_preset,
)
from polyp_diffusers.pipelines.pipeline_polyp_ddpm import PIPELINE_MODULE_NAME, blend_weights, dilate, repaint_path

STEPS = 3


@pytest.fixture(scope="module")
def inpaint(tiny_pipeline):
    pipe = PolypInpaintPipeline.from_pipe(tiny_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frame_and_mask(height=32, width=32, seed=0):
    """A random RGB frame (uint8) and a mask with one rectangular polyp, both `height x width`."""
    frame = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : height // 2, width // 3 : width // 2] = 255
    return frame, mask


def disk_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by a disk of `radius` pixels, computed here independently of the pipeline."""
    grown = np.zeros(mask.shape, dtype=bool)
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    for y, x in zip(ys, xs):
        grown |= (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    return grown


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pixels_outside_the_edit_region_are_the_frame_exactly(inpaint):
    frame, mask = frame_and_mask()
    out = inpaint(image=PIL.Image.fromarray(frame), mask_image=mask, num_inference_steps=STEPS, blend_radius=3)
    image = np.asarray(out.images[0])
    outside = ~disk_dilation(mask > 0, 3)
    np.testing.assert_array_equal(image[outside], frame[outside])
    assert (image[mask > 0] != frame[mask > 0]).any(axis=-1).mean() > 0.9  # the polyp region is new
    np.testing.assert_array_equal(np.asarray(out.masks[0]), mask)  # the pair's label


def test_a_read_only_array_of_a_pil_frame_is_taken_without_a_warning(inpaint):
    frame, mask = frame_and_mask()
    read_only = np.asarray(PIL.Image.fromarray(frame))
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of arrays it cannot write to
        out = inpaint(image=read_only, mask_image=mask, num_inference_steps=STEPS, output_type="np")
    assert out.images.shape == (1, *frame.shape)


def test_float_frames_come_back_unchanged_outside_the_edit_region(inpaint):
    frame, mask = frame_and_mask(seed=1)
    frame = frame.astype(np.float32) / 255
    image = inpaint(image=frame, mask_image=mask, num_inference_steps=STEPS, blend_radius=0, output_type="np").images
    outside = mask == 0  # blend_radius=0: the edit region is the mask itself
    np.testing.assert_array_equal(image[0][outside], frame[outside])


def test_a_frame_of_another_size_is_restored_and_only_its_edit_region_changes(inpaint):
    frame, mask = frame_and_mask(height=40, width=56)
    out = inpaint(image=frame, mask_image=mask, num_inference_steps=STEPS, blend_radius=2, output_type="np")
    assert out.images.shape == (1, 40, 56, 3) and out.masks.shape == (1, 40, 56, 1)
    np.testing.assert_array_equal(out.masks[0, ..., 0], mask > 0)
    # 2 model pixels of margin are at most 2 * 56 / 32 = 3.5 frame pixels, plus the resampling's reach.
    outside = ~disk_dilation(mask > 0, 6)
    np.testing.assert_array_equal(out.images[0][outside], frame[outside].astype(np.float32) / 255)
    assert np.abs(out.images[0][mask > 0] - frame[mask > 0] / 255).max() > 0.1


@pytest.mark.parametrize("radius", [0, 1, 3, 7, 40])
def test_blend_weights_are_the_mean_of_the_mask_dilated_by_every_radius_up_to_the_margin(radius):
    masks = (torch.rand(3, 1, 24, 37, generator=torch.Generator().manual_seed(radius)) > 0.97).float()
    masks[0] = 0  # an empty mask: no edit region
    dilated = [dilate(masks, r) for r in range(radius + 1)]
    assert torch.equal(blend_weights(masks, radius), sum(dilated) / (radius + 1))


def test_inpainting_is_deterministic_for_a_seed_and_independent_of_batching(inpaint):
    frame, mask = frame_and_mask()
    frames, masks = [frame, np.flipud(frame).copy()], [mask, np.fliplr(mask).copy()]
    arguments = dict(num_inference_steps=STEPS, output_type="np")
    first = inpaint(image=frames, mask_image=masks, generator=seeded(3), **arguments).images
    again = inpaint(image=frames, mask_image=masks, generator=seeded(3), **arguments).images
    np.testing.assert_array_equal(first, again)
    together = inpaint(image=frames, mask_image=masks, generator=[seeded(0), seeded(1)], batch_size=2, **arguments)
    one_by_one = inpaint(image=frames, mask_image=masks, generator=[seeded(0), seeded(1)], batch_size=1, **arguments)
    np.testing.assert_allclose(together.images, one_by_one.images, atol=1e-5)


def test_outputs_follow_the_pipeline_conventions(inpaint):
    frame, mask = frame_and_mask()
    tensor_frame = torch.from_numpy(frame).permute(2, 0, 1).float() / 255
    images, masks = inpaint(
        image=tensor_frame, mask_image=mask, num_images_per_mask=2, num_inference_steps=STEPS, output_type="pt",
        return_dict=False,
    )  # fmt: skip
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 1, 32, 32)
    assert 0 <= images.min() and images.max() <= 1
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(images[0], images[1])  # two different polyps for one frame


def test_resampling_jumps_follow_repaint_schedule():
    assert repaint_path(4, 2, 1) == [0, 1, 2, 3, 4]  # jump_n_sample=1: no jumps
    # Every 2 positions, jump back 2, once: the stretch between is traversed twice.
    assert repaint_path(6, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]


def test_resampling_and_ddim_keep_the_frame_outside_the_edit_region(tiny_pipeline):
    frame, mask = frame_and_mask()
    outside = ~disk_dilation(mask > 0, 4)
    ddpm = PolypInpaintPipeline.from_pipe(tiny_pipeline)
    ddpm.set_progress_bar_config(disable=True)
    jumped = ddpm(image=frame, mask_image=mask, num_inference_steps=4, jump_length=2, jump_n_sample=2).images[0]
    np.testing.assert_array_equal(np.asarray(jumped)[outside], frame[outside])
    ddim = PolypInpaintPipeline.from_pipe(
        tiny_pipeline, scheduler=DDIMScheduler.from_config(make_polyp_scheduler().config)
    )
    ddim.set_progress_bar_config(disable=True)
    image = np.asarray(ddim(image=frame, mask_image=mask, num_inference_steps=STEPS).images[0])
    np.testing.assert_array_equal(image[outside], frame[outside])


def test_a_multistep_solver_is_refused_with_the_way_out(tiny_pipeline):
    solver = DPMSolverMultistepScheduler.from_config(make_polyp_scheduler().config)
    pipe = PolypInpaintPipeline.from_pipe(tiny_pipeline, scheduler=solver)
    frame, mask = frame_and_mask()
    with pytest.raises(ValueError, match="DDPMScheduler .* or DDIMScheduler"):
        pipe(image=frame, mask_image=mask)


def test_from_pipe_shares_the_model_and_keeps_its_dtype():
    unet = make_polyp_unet_from_preset("tiny").to(torch.bfloat16)
    pipe = PolypDDPMPipeline(unet=unet, scheduler=make_polyp_scheduler())
    inpaint = PolypInpaintPipeline.from_pipe(pipe)
    assert inpaint.unet is pipe.unet and inpaint.scheduler is pipe.scheduler
    assert pipe.unet.dtype == torch.bfloat16  # diffusers' from_pipe would have cast the shared UNet to float32


def test_the_inpaint_pipeline_saves_and_loads_like_the_generator(inpaint, tmp_path):
    inpaint.save_pretrained(tmp_path)
    assert (tmp_path / f"{PIPELINE_MODULE_NAME}.py").is_file()
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "PolypInpaintPipeline"
    loaded = PolypInpaintPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    frame, mask = frame_and_mask()
    arguments = dict(image=frame, mask_image=mask, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(
        loaded(generator=seeded(), **arguments).images, inpaint(generator=seeded(), **arguments).images, atol=1e-5
    )


def test_the_saved_file_alone_gives_both_pipelines(saved_pipeline_dir, tmp_path):
    """Without polyp_diffusers: `custom_pipeline` still finds the one generator, and the inpainter comes from it."""
    script = f"""
import importlib
import numpy as np
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(saved_pipeline_dir)!r}, custom_pipeline="pipeline_polyp_ddpm", trust_remote_code=True)
inpaint = importlib.import_module(type(pipe).__module__).PolypInpaintPipeline.from_pipe(pipe)
frame = np.zeros((32, 32, 3), np.uint8); mask = np.zeros((32, 32), np.uint8); mask[4:12, 4:12] = 255
out = inpaint(image=frame, mask_image=mask, num_inference_steps=2, output_type="np")
print(type(pipe).__name__, type(inpaint).__name__, type(inpaint).__module__, out.images.shape)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    generator, inpainter, module, *shape = result.stdout.split()
    assert (generator, inpainter) == ("PolypDDPMPipeline", "PolypInpaintPipeline")
    assert not module.startswith("polyp_diffusers") and " ".join(shape) == "(1, 32, 32, 3)"


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (dict(mask_image="mask"), "image is missing"),
        (dict(image="frame"), "mask_image is missing"),
        (dict(image="frame", mask_image="large mask"), r"mask_image is 48x48 pixels but its frame is 32x32"),
        (dict(image="frame", mask_image="colour mask"), "colour image"),
        (dict(image="frame", mask_image="empty mask"), "no polyp pixel: there is nothing to insert"),
        (dict(image=["frame", "small frame"], mask_image=["mask", "mask"]), "different sizes"),
        (dict(image=["frame", "frame"], mask_image=["mask"]), "2 frame.* and mask_image 1 mask"),
        (dict(image="bright frame", mask_image="mask"), r"expected floats in \[0, 1\]"),
        (dict(image="frame", mask_image="mask", blend_radius=-1), "blend_radius"),
        (dict(image="frame", mask_image="mask", jump_n_sample=0), "jump_n_sample"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(inpaint, arguments, expected):
    frame, mask = frame_and_mask()
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[8:16, 8:16] = (255, 0, 0)
    inputs = {
        "frame": frame,
        "small frame": frame[:16, :16],
        "bright frame": frame.astype(np.float32),  # 0-255 as floats
        "mask": mask,
        "large mask": np.pad(mask, 8),
        "colour mask": PIL.Image.fromarray(colour),
        "empty mask": np.zeros_like(mask),
    }
    resolved = {
        name: [inputs[v] for v in value] if isinstance(value, list) else inputs.get(value, value)
        for name, value in arguments.items()
    }
    with pytest.raises(ValueError, match=expected):
        inpaint(num_inference_steps=STEPS, **resolved)
