"""The converter against the authors' own code: same denoiser outputs, same samples, clear refusals.

The authors' code is found through POLYP_REFERENCE_DIR (`.ci/run` sets it to
../shared/reference/polyp_ddpm_official); the tests skip with the reason when it is absent.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polyp_diffusers import PolypDDPMPipeline
from polyp_diffusers.convert_official import ConversionError, convert_official_checkpoint, infer_config

SIZE = 32  # their create_model at 32 px, widths 32-64, one residual block per level, attention at 16x16


@pytest.fixture(scope="module")
def reference():
    folder = os.environ.get("POLYP_REFERENCE_DIR")
    if not folder or not (Path(folder) / "diffusion_model" / "unet.py").exists():
        pytest.skip(
            "POLYP_REFERENCE_DIR does not point at the authors' code (CI sets ../shared/reference/polyp_ddpm_official)"
        )
    sys.path.insert(0, folder)
    try:
        from diffusion_model.trainer import GaussianDiffusion
        from diffusion_model.unet import create_model
    finally:
        sys.path.remove(folder)
    return create_model, GaussianDiffusion


@pytest.fixture(scope="module")
def official_checkpoint(reference, tmp_path_factory):
    """A checkpoint in their format ({'step', 'model', 'ema'}) with random weights; 'ema' differs from 'model'."""
    create_model, GaussianDiffusion = reference
    torch.manual_seed(0)
    network = create_model(SIZE, 32, 1, channel_mult="1,2", attention_resolutions="16", in_channels=6, out_channels=3)
    diffusion = GaussianDiffusion(network, image_size=SIZE, timesteps=250, loss_type="l1")
    # Their output convolution starts at zero; give every tensor random values so the test sees every weight.
    with torch.no_grad():
        for parameter in diffusion.parameters():
            parameter.normal_(0, 0.05)
    ema = {k: v + 0.01 if k.startswith("denoise_fn.") else v for k, v in diffusion.state_dict().items()}
    path = tmp_path_factory.mktemp("official") / "model.pt"
    torch.save({"step": 1234, "model": diffusion.state_dict(), "ema": ema}, path)
    diffusion.load_state_dict(ema)  # their inference uses the EMA weights
    return path, diffusion.eval()


def random_inputs(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    masks = (torch.rand(batch, 1, SIZE, SIZE, generator=generator) > 0.6).float()
    timesteps = torch.randint(0, 250, (batch,), generator=generator)
    return noisy, masks, timesteps


def test_inferred_configuration_is_their_network(official_checkpoint):
    path, diffusion = official_checkpoint
    denoiser = {k[len("denoise_fn.") :]: v for k, v in diffusion.state_dict().items() if k.startswith("denoise_fn.")}
    config = infer_config(denoiser)
    assert config == {
        "image_size": 32,
        "base_channels": 32,
        "channel_mult": (1, 2),
        "layers_per_block": 1,
        "attention_levels": [1],
        "in_channels": 6,
        "out_channels": 3,
    }


@pytest.mark.parametrize("keep_rgb_mask", [False, True], ids=["folded-4-channels", "rgb-mask-6-channels"])
def test_denoiser_outputs_match_theirs(official_checkpoint, keep_rgb_mask):
    path, diffusion = official_checkpoint
    pipeline, description = convert_official_checkpoint(path, keep_rgb_mask=keep_rgb_mask)
    assert pipeline.unet.config.in_channels == (6 if keep_rgb_mask else 4) and description["step"] == 1234
    noisy, masks, timesteps = random_inputs()
    mask_rgb = (masks * 2 - 1).repeat(1, 3, 1, 1)  # how their code feeds a mask
    with torch.no_grad():
        theirs = diffusion.denoise_fn(torch.cat([noisy, mask_rgb], 1), timesteps)
        ours_input = torch.cat([noisy, mask_rgb if keep_rgb_mask else masks * 2 - 1], 1)
        ours = pipeline.unet(ours_input, timesteps).sample
    assert theirs.abs().mean() > 0.01  # a real signal, not two zero outputs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_model_weights_are_chosen_with_weights_model(official_checkpoint):
    path, diffusion = official_checkpoint
    ema_pipeline, _ = convert_official_checkpoint(path, weights="ema")
    raw_pipeline, _ = convert_official_checkpoint(path, weights="model")
    difference = ema_pipeline.unet.conv_out.bias - raw_pipeline.unet.conv_out.bias
    torch.testing.assert_close(difference, torch.full_like(difference, 0.01))


def test_full_sampling_run_matches_their_sampler(official_checkpoint):
    """250 ancestral steps from the same noise: their GaussianDiffusion.sample against our pipeline."""
    path, diffusion = official_checkpoint
    pipeline, _ = convert_official_checkpoint(path)
    pipeline.set_progress_bar_config(disable=True)
    _, masks, _ = random_inputs(batch=2)
    torch.manual_seed(7)  # their sampler draws from the global generator, in the same order as ours
    theirs = diffusion.sample(batch_size=2, condition_tensors=(masks * 2 - 1).repeat(1, 3, 1, 1))
    ours = pipeline(masks, num_inference_steps=250, generator=torch.Generator().manual_seed(7), output_type="pt").images
    theirs = ((theirs + 1) / 2).clamp(0, 1)
    difference = (ours - theirs).abs()
    # Measured on this setup: max 3.5e-5, mean 1.7e-5 in [0, 1] units, under 1% of one 8-bit grey level. Not
    # bit-equal because they compute the schedule's coefficients in float64 NumPy and diffusers in float32
    # torch; the rounding differences pass through the network 250 times.
    assert difference.max() < 1e-3 and difference.mean() < 1e-4, (difference.max(), difference.mean())
    assert theirs.std() > 0.05


def test_weights_that_hold_nan_are_refused_not_converted(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    name = next(key for key in checkpoint["ema"] if key.startswith("denoise_fn.") and key.endswith("weight"))
    checkpoint["ema"][name] = torch.full_like(checkpoint["ema"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.pt")
    with pytest.raises(ConversionError, match="the checkpoint's ema weights hold NaN or inf in 1 tensors"):
        convert_official_checkpoint(tmp_path / "diverged.pt")


def test_converted_folder_is_a_normal_pipeline_with_a_card(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    output = tmp_path / "polyp-ddpm-kvasir-official"
    result = subprocess.run(
        [sys.executable, "-m", "polyp_diffusers.cli", "convert-official", str(path), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "step 1234" in result.stdout
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (output / "pipeline_polyp_ddpm.py").exists()
    card = (output / "README.md").read_text()
    assert "converted, not trained here" in card and "mobaidoctor/polyp-ddpm" in card and "model.pt" in card
    assert f"a model of {SIZE} px images" in card  # the checkpoint's size, not the authors' release's
    pipe = PolypDDPMPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(np.ones((SIZE, SIZE), np.uint8), num_inference_steps=2, output_type="np").images
    assert images.shape == (1, SIZE, SIZE, 3)


def test_rgb_mask_model_is_fed_three_mask_channels(official_checkpoint):
    path, _ = official_checkpoint
    pipeline, _ = convert_official_checkpoint(path, keep_rgb_mask=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.mask_channels == 3
    images = pipeline(np.ones((SIZE, SIZE), np.uint8), num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()


# Refusals ----------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls `os.mkdir(folder)`: the kind of file that must be refused, never executed."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (self.folder,)


@pytest.mark.parametrize("content", [b"hello", b"definitely not a checkpoint"])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="model.pt is not a PyTorch file that can be read safely"):
        convert_official_checkpoint(path)


def test_a_missing_checkpoint_a_folder_or_a_device_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_official_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is a folder; expected the authors' checkpoint"):
        convert_official_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="/dev/null is not a regular file"):  # was: "does not exist"
        convert_official_checkpoint("/dev/null")


def test_a_truncated_checkpoint_is_refused(official_checkpoint, tmp_path):
    data = Path(official_checkpoint[0]).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a PyTorch file that can be read safely"):
        convert_official_checkpoint(path)


def test_a_pickle_with_arbitrary_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"ema": {"denoise_fn.x": object()}}, path)
    with pytest.raises(ConversionError, match="model.pt is refused: loading it would run code"):
        convert_official_checkpoint(path)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, protocol):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(RunsCode(tmp_path / "ran"), protocol=protocol))
    with pytest.raises(ConversionError, match="model.pt is refused: loading it would run code"):
        convert_official_checkpoint(path)
    assert not (tmp_path / "ran").exists()


def test_wrong_keys_are_refused(official_checkpoint, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ConversionError, match="expected the official format"):
        convert_official_checkpoint(path)
    torch.save({"ema": {"unet.weight": torch.zeros(1)}, "model": {}, "step": 1}, path)
    with pytest.raises(ConversionError, match="no 'denoise_fn"):
        convert_official_checkpoint(path)

    state = torch.load(official_checkpoint[0], weights_only=True)
    state["ema"]["denoise_fn.extra.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(ConversionError, match=r"not mapped: \['extra.weight'\]"):
        convert_official_checkpoint(path)


def test_entries_that_are_not_tensors_are_refused_and_a_step_that_is_no_number_is_not_recorded(
    official_checkpoint, tmp_path
):
    path = tmp_path / "model.pt"
    for name, value in (("denoise_fn.out.2.weight", [0.0, 1.0]), ("betas", torch.tensor(0.5))):
        state = torch.load(official_checkpoint[0], weights_only=True)
        state["ema"][name] = value
        torch.save(state, path)
        with pytest.raises(ConversionError, match=f"holds 1 entries that are not tensors \\(first: '{name}'"):
            convert_official_checkpoint(path)
    state = torch.load(official_checkpoint[0], weights_only=True)
    for step in (float("inf"), float("nan"), True, "1234"):
        torch.save({**state, "step": step}, path)
        assert convert_official_checkpoint(path)[1]["step"] is None


def test_a_checkpoint_stored_in_half_precision_converts(official_checkpoint, tmp_path):
    state = torch.load(official_checkpoint[0], weights_only=True)
    for weights in ("model", "ema"):
        state[weights] = {name: tensor.half() for name, tensor in state[weights].items()}
    path = tmp_path / "model-fp16.pt"
    torch.save(state, path)
    pipeline, description = convert_official_checkpoint(path)
    assert description["step"] == 1234 and pipeline.unet.dtype == torch.float32
    state["ema"]["betas"] = state["ema"]["betas"].flip(0)  # another schedule is still refused
    torch.save(state, path)
    with pytest.raises(ConversionError, match="betas differ from the cosine schedule"):
        convert_official_checkpoint(path)


def test_wrong_shapes_are_refused(official_checkpoint, tmp_path):
    state = torch.load(official_checkpoint[0], weights_only=True)
    key = "denoise_fn.middle_block.1.proj_out.weight"
    state["ema"][key] = state["ema"][key][:, :-1]
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(ConversionError, match="wrong shapes"):
        convert_official_checkpoint(path)


@pytest.mark.parametrize(
    ("runs_code", "message"), [(False, "is not a PyTorch file"), (True, "loading it would run code")]
)
def test_convert_cli_reports_errors_in_one_line(tmp_path, runs_code, message):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")) if runs_code else b"hello")
    result = subprocess.run(
        [sys.executable, "-m", "polyp_diffusers.cli", "convert-official", str(path), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and result.stderr.startswith(f"error: {path} ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "ran").exists()
