"""Generation of synthetic datasets, FID/KID, segmentation scores and the end-to-end benchmark command."""

import json
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import urllib.error
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, load_from_disk
from datasets import Image as ImageFeature
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch_fidelity import feature_extractor_inceptionv3
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from transformers import Dinov2Config, Dinov2Model

from polyp_diffusers import PolypDDPMPipeline
from polyp_diffusers.arguments import load_training_script
from polyp_diffusers.cli import main as polyp_ddpm
from polyp_diffusers.demo import make_demo_dataset
from polyp_diffusers.generate import GENERATED_FEATURES, PARTS_DIR, even_batches, generate_dataset
from polyp_diffusers.metrics import INCEPTION_FEATURES, dinov2_extractor, fid_kid, inception_extractor, load_extractor
from polyp_diffusers.modeling import unet_weights_digest
from polyp_diffusers.results import fid_results, provenance
from polyp_diffusers.segmentation import (
    ARCHITECTURES,
    SMALLEST_RESOLUTION,
    build_segmenter,
    check_resolution,
    check_tests_apart,
    evaluate,
    held_out_ids,
    held_out_synthetic,
    import_extra,
    load_trained_segmenter,
    logits_of,
    make_training_step,
    name_test_sets,
    segmentation_scores,
    training_pairs,
)
from polyp_diffusers.transforms import pair_transform

from .conftest import REPO_ROOT

GENERATION = dict(split="train", num_images_per_mask=2, sampler="ddim", num_inference_steps=2, batch_size=4, seed=10)


@pytest.fixture(scope="module")
def generated(saved_pipeline_dir, demo_masks, tmp_path_factory):
    output = tmp_path_factory.mktemp("generated") / "synthetic"
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
    return output


@pytest.mark.slow
def test_a_compiled_unet_makes_the_same_pairs_up_to_rounding(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch):
    """generate --compile-mode (torch.compile's inductor on the CPU here, about 30 s to compile the tiny UNet)."""
    output = tmp_path / "compiled"
    # 8 images in batches of up to 3: 3, 3 and 2, the last one padded, so a second compilation would be an error.
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    settings = {**GENERATION, "split": "test", "batch_size": 3}
    generated = tmp_path / "eager"
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), generated, **settings)
    arguments = ["--num-images-per-mask", str(settings["num_images_per_mask"]), "--sampler", settings["sampler"],
                 "--steps", str(settings["num_inference_steps"]), "--batch-size", str(settings["batch_size"]),
                 "--seed", str(settings["seed"]), "--split", settings["split"]]  # fmt: skip
    assert polyp_ddpm(["generate", "--model", str(saved_pipeline_dir), "--mask-dataset", str(demo_masks), "--output",
                       str(output), *arguments, "--compile-mode", "default"]) == 0  # fmt: skip
    compiled, eager = load_from_disk(str(output))["test"], load_from_disk(str(generated))["test"]
    assert len(compiled) == 8 and compiled["id"] == eager["id"]
    for ours, theirs in zip(compiled["image"], eager["image"]):
        difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
        assert difference.max() <= 2


def test_generated_pairs_have_the_project_schema_and_provenance(generated, demo_masks, saved_pipeline_dir):
    dataset = load_from_disk(str(generated))
    assert list(dataset) == ["train"]
    pairs = dataset["train"]
    assert pairs.features == GENERATED_FEATURES and len(pairs) == 12  # 6 training masks x 2
    source = load_from_disk(str(demo_masks))["train"]
    assert list(pairs["id"][:2]) == [f"{source[0]['id']}-syn0", f"{source[0]['id']}-syn1"]
    assert list(pairs["seed"]) == list(range(10, 22))
    assert set(pairs["model"]) == {str(saved_pipeline_dir)}
    first = pairs[0]
    assert first["image"].size == (32, 32) and first["mask"].mode == "L"
    np.testing.assert_array_equal(np.asarray(first["mask"]), np.asarray(source[0]["mask"]))
    assert "Generated images" in (generated / "README.md").read_text()
    assert not (generated / PARTS_DIR).exists()


def test_each_image_is_reproducible_from_its_seed(generated, saved_pipeline_dir, demo_masks):
    pairs = load_from_disk(str(generated))["train"]
    pipe = PolypDDPMPipeline.from_pretrained(saved_pipeline_dir)
    from polyp_diffusers import make_sampler

    pipe.scheduler = make_sampler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    row = pairs[5]
    again = pipe(row["mask"], num_inference_steps=2, generator=torch.Generator().manual_seed(row["seed"])).images[0]
    assert np.abs(np.asarray(again, np.int16) - np.asarray(row["image"], np.int16)).max() <= 1


def test_generation_takes_the_fewest_batches_all_of_one_size_but_the_last():
    assert even_batches(898, 512) == [range(0, 449), range(449, 898)]
    assert [len(batch) for batch in even_batches(13, 5)] == [5, 5, 3]
    assert even_batches(0, 4) == []
    for num_requests, batch_size in [(898, 128), (1, 512), (513, 512), (12, 5)]:
        batches = even_batches(num_requests, batch_size)
        assert len(batches) == -(-num_requests // batch_size) and max(map(len, batches)) <= batch_size
        assert [request for batch in batches for request in batch] == list(range(num_requests))


# Continued with the same batch, or with a smaller one (a run killed for memory): the batches still to make are those.
@pytest.mark.parametrize(("resumed_batch_size", "batches_made"), [(4, 1), (3, 2)])
def test_an_interrupted_generation_continues_where_it_stopped(
    generated, saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, capsys, resumed_batch_size, batches_made
):
    output = tmp_path / "synthetic"
    calls = {"count": 0}
    original = PolypDDPMPipeline.__call__

    def crash_on_third_batch(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PolypDDPMPipeline, "__call__", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
    parts = sorted((output / PARTS_DIR).glob("part-*"))
    assert [p.name for p in parts] == ["part-000000-000004.parquet", "part-000004-000008.parquet"]  # whole batches
    # A part named as before batches were even (by batch index) is not one of this run's: it must not be mixed in.
    shutil.copy(parts[0], output / PARTS_DIR / "part-000000.parquet")

    calls["count"] = -100  # no more crashes
    generate_dataset(
        str(saved_pipeline_dir), str(demo_masks), output, **{**GENERATION, "batch_size": resumed_batch_size}
    )
    assert calls["count"] == -100 + batches_made  # only the missing images were generated
    assert f"Resuming the generation in {output}: 8 of 12 images are there already." in capsys.readouterr().out
    resumed, uninterrupted = load_from_disk(str(output))["train"], load_from_disk(str(generated))["train"]
    assert list(resumed["id"]) == list(uninterrupted["id"])
    for a, b in zip(resumed, uninterrupted):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_a_rerun_with_other_settings_is_refused(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch):
    output = tmp_path / "synthetic"
    (output / PARTS_DIR).mkdir(parents=True)
    settings = {
        **GENERATION,
        "model": str(saved_pipeline_dir),
        "mask_dataset": str(demo_masks),
        "dtype": "fp32",
        "sampler": "ddpm",
        "num_inference_steps": 250,
        "num_masks": 6,
    }
    (output / PARTS_DIR / "generation.json").write_text(json.dumps(settings))
    (output / PARTS_DIR / "part-000000-000016.parquet").write_bytes(b"pairs of those settings")
    with pytest.raises(ValueError, match="unfinished run with other settings"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)


def test_a_model_trained_again_in_its_folder_makes_another_generation(saved_pipeline_dir, demo_masks, tmp_path, capsys):
    model, output = tmp_path / "model", tmp_path / "synthetic"
    pipeline = PolypDDPMPipeline.from_pretrained(saved_pipeline_dir)
    pipeline.save_pretrained(model)
    settings = {**GENERATION, "split": "test", "num_images_per_mask": 1}
    generate_dataset(str(model), str(demo_masks), output, **settings)
    made_by = provenance(str(output))
    torch.nn.init.zeros_(next(pipeline.unet.parameters()))  # trained again, into the same folder
    pipeline.save_pretrained(model)
    # Before, the same command said "nothing to do" and kept the old model's pairs.
    with pytest.raises(ValueError, match="already holds a dataset generated with other settings"):
        generate_dataset(str(model), str(demo_masks), output, **settings)
    # Whose images they are stays as generated: the new weights are not those that made them, and the card says so.
    assert provenance(str(output)) == made_by and made_by["generated_by_weights"] != unet_weights_digest(model)
    (tmp_path / "scores.json").write_text(json.dumps({"markdown": "### Scores", "eval_results": [], **made_by}))
    assert polyp_ddpm(["card", str(model), "--results", str(tmp_path / "scores.json")]) == 1
    assert f"scores images that {model} generated before it was trained again (UNet SHA-256 " in capsys.readouterr().err


def test_generation_can_start_from_the_models_mean_colour(tiny_pipeline, saved_pipeline_dir, demo_masks, tmp_path):
    without_colour = tmp_path / "refused"
    with pytest.raises(ValueError, match="start_timestep needs start_color"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), without_colour, **GENERATION, start_timestep=100)
    assert not without_colour.exists()
    model = tmp_path / "with-colour"
    PolypDDPMPipeline(
        unet=tiny_pipeline.unet, scheduler=tiny_pipeline.scheduler, start_color=[0.7, 0.4, 0.3]
    ).save_pretrained(model)
    output = tmp_path / "started"
    dataset = generate_dataset(str(model), str(demo_masks), output, **GENERATION, start_timestep=100)
    assert len(dataset["train"]) == 12
    assert json.loads((output / "generation.json").read_text())["start_timestep"] == 100


def test_generate_cli_writes_a_dataset(saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyp_diffusers.cli",
            "generate",
            "--model",
            saved_pipeline_dir.name,
            "--mask-dataset",
            str(demo_masks),
            "--split",
            "test",
            "--output",
            str(output),
            "--sampler",
            "dpmsolver",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=saved_pipeline_dir.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "holds 4 generated pairs (test split)" in result.stdout
    assert len(load_from_disk(str(output))["test"]) == 4
    # A model named from its parent folder is recorded so that commands run from elsewhere find it.
    assert json.loads((output / "generation.json").read_text())["model"] == str(saved_pipeline_dir.resolve())


# FID / KID -----------------------------------------------------------------------------------------------------


class ColourStatistics(nn.Module):
    """A small stand-in feature extractor: per-channel means and spreads of a pooled image (8 features)."""

    def forward(self, images):
        pooled = nn.functional.avg_pool2d(images.float() / 255, 4)
        return torch.cat(
            [
                pooled.mean(dim=(2, 3)),
                pooled.std(dim=(2, 3)),
                pooled.amax(dim=(1, 2, 3))[:, None],
                pooled.amin(dim=(1, 2, 3))[:, None],
            ],
            dim=1,
        )


def test_fid_and_kid_are_near_zero_for_identical_sets_and_larger_for_different_ones():
    real = make_demo_dataset(40, 32, test_size=0.5, seed=0)["train"]
    same = fid_kid(real, real, extractor=ColourStatistics(), kid_subset_size=10, kid_subsets=20)
    other_demo = fid_kid(
        real,
        make_demo_dataset(40, 32, test_size=0.5, seed=1)["train"],
        extractor=ColourStatistics(),
        kid_subset_size=10,
        kid_subsets=20,
    )
    darker = real.map(lambda row: {"image": PIL.Image.eval(row["image"], lambda v: v // 2)})
    different = fid_kid(real, darker, extractor=ColourStatistics(), kid_subset_size=10, kid_subsets=20)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-3
    assert different["fid"] > 10 * max(other_demo["fid"], 1e-3)
    assert different["kid_mean"] > other_demo["kid_mean"]
    assert same["num_real"] == 20 and same["kid_subset_size"] == 10


def test_offline_inception_gives_a_message_that_says_what_to_do(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="--inception-weights PATH") as error:
        inception_extractor()
    assert URL_INCEPTION_V3 in str(error.value)


class TouchesAMarkerWhenUnpickled:
    """A pickle that runs code: unpickling it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_inception_weights_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "weights.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": TouchesAMarkerWhenUnpickled(marker)}, weights)
    with pytest.raises(ValueError, match=f"{weights}.*refused"):
        inception_extractor(weights)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello world", b"", bytes(range(256)) * 4])
def test_inception_weights_that_are_not_a_torch_file_are_one_clear_error(tmp_path, content):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(content)  # plain text made torch's safe unpickler raise a KeyError
    with pytest.raises(ValueError, match=f"{weights} is not a PyTorch file that can be read safely"):
        inception_extractor(weights)


def test_a_hub_cache_inception_file_that_would_run_code_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / pathlib.Path(URL_INCEPTION_V3).name
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"Conv2d_1a_3x3.conv.weight": TouchesAMarkerWhenUnpickled(marker)}, cached)
    with pytest.raises(ValueError, match=f"{cached}.*refused"):
        inception_extractor()
    assert not marker.exists()


@pytest.fixture(scope="module")
def random_inception_state_dict():
    """A state dict of torch-fidelity's InceptionV3 with random weights (the real ones are a download)."""
    with (
        mock.patch.object(feature_extractor_inceptionv3, "load_state_dict_from_url"),
        mock.patch.object(feature_extractor_inceptionv3.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        return feature_extractor_inceptionv3.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_plain_inception_state_dict_loads_and_gives_2048_features(random_inception_state_dict, suffix, tmp_path):
    weights = tmp_path / f"inception{suffix}"
    if suffix == ".pth":
        torch.save(random_inception_state_dict, weights)
    else:
        save_file(random_inception_state_dict, weights)
    extractor = inception_extractor(weights)
    for name, tensor in extractor.state_dict().items():
        assert torch.equal(tensor, random_inception_state_dict[name]), name
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = extractor(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()


def test_inception_weights_of_another_network_are_refused(tmp_path):
    weights = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), weights)
    with pytest.raises(ValueError, match=f"{weights} do not fit") as refused:
        inception_extractor(weights)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 600  # not hundreds of missing names


def test_fid_cli_uses_a_pluggable_extractor_and_writes_card_json(demo_masks, generated, tmp_path):
    output = tmp_path / "fid.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyp_diffusers.cli",
            "fid",
            "--real",
            str(demo_masks),
            "--generated",
            str(generated),
            "--feature-extractor",
            "tests.test_evaluation:ColourStatistics",
            "--kid-subset-size",
            "4",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(output.read_text())
    assert scores["scores"]["num_real"] == 4 and scores["scores"]["num_generated"] == 12
    # 4 real images for 8 features: said where it is printed and where it is published.
    few = "4 images are fewer than the 8 features, so this Fréchet distance is biased upward; compare it only with"
    assert scores["scores"]["num_features"] == 8 and f"Note: {few}" in scores["markdown"]
    assert f"warning: {few}" in result.stderr
    # Not Inception's features: the distances are published under their features' name, never as FID.
    name = f"FD ({scores['scores']['features']})"
    assert f"| {name} |" in scores["markdown"] and "FID" not in scores["markdown"]
    assert result.stdout.startswith(f"{name} ") and "FID" not in result.stdout
    assert [(entry["metric_type"], entry["metric_name"]) for entry in scores["eval_results"]][0] == ("fd", name)


def test_images_of_several_sizes_name_the_option_that_resizes_them():
    images = [PIL.Image.new("RGB", (size, size)) for size in (32, 48, 32)]
    mixed = Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()}))
    with pytest.raises(
        ValueError, match="the generated images are of several sizes \\(32x32, 48x48\\); pass --image-size"
    ):
        fid_kid(mixed.select([0, 2]), mixed, extractor=ColourStatistics())
    assert fid_kid(mixed.select([0, 2]), mixed, extractor=ColourStatistics(), image_size=32)["num_generated"] == 3


def test_kid_subsets_of_one_image_are_refused_before_any_feature_is_computed():
    images = Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (32, 32))] * 3}, features=Features({"image": ImageFeature()})
    )
    for real, subset_size in ((images, 1), (images.select([0]), 10)):  # asked for, or all a set holds
        with pytest.raises(ValueError, match="KID needs subsets of at least 2 images"):
            fid_kid(real, images, extractor=ColourStatistics(), kid_subset_size=subset_size)


def test_a_feature_extractor_in_the_current_folder_loads_as_with_python_m(tmp_path, monkeypatch):
    # A console script does not look in the current folder for modules; `python -m` does, and so do users.
    (tmp_path / "my_features.py").write_text("import torch\ndef make():\n    return torch.nn.Flatten()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    path_before = list(sys.path)
    assert isinstance(load_extractor("my_features:make"), torch.nn.Flatten)
    assert sys.path == path_before
    with pytest.raises(ValueError, match="'my_features:nonexistent': my_features has no function 'nonexistent'"):
        load_extractor("my_features:nonexistent")


class NotANumber(nn.Module):
    def forward(self, images):
        return torch.full((len(images), 4), float("nan"))


class OneFeatureInAll(nn.Module):
    def forward(self, images):
        return images.float().mean(dim=(0, 1, 2, 3), keepdim=True).flatten()


class HugeFeatures(nn.Module):
    def forward(self, images):
        return torch.full((len(images), 4), 1e30) * torch.arange(1, len(images) + 1)[:, None]


def test_features_that_are_not_numbers_or_not_one_row_per_image_are_refused_not_written():
    images = Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (32, 32))] * 4}, features=Features({"image": ImageFeature()})
    )
    for extractor, problem in [
        (NotANumber(), "the feature extractor gave NaN or inf features"),
        (OneFeatureInAll(), r"features of shape \(1,\) for images of shape \(1, 3, \d+, \d+\); expected \(N, D\)"),
        (HugeFeatures(), "the distances are not finite"),  # finite features whose covariance overflows
    ]:
        with pytest.raises(ValueError, match=problem):
            fid_kid(images, images, extractor=extractor, kid_subset_size=2, kid_subsets=2)


def test_only_scores_on_inception_features_are_published_as_fid_and_kid():
    scores = dict(real="data/kvasir-seg:test", num_real=100, num_generated=898, fid=41.5, kid_mean=0.02, kid_std=0.001)
    standard = fid_results({**scores, "features": INCEPTION_FEATURES})["eval_results"]
    assert [(entry["metric_type"], entry["metric_name"]) for entry in standard] == [("fid", "FID"), ("kid", "KID")]
    dinov2 = fid_results({**scores, "features": "DINOv2 ViT-L/14"})["eval_results"]
    assert [entry["metric_type"] for entry in dinov2] == ["fd", "kd"] and "DINOv2" in dinov2[0]["metric_name"]
    # KID's spread over subsets of 100 of 898 images, and none where each subset holds all 100 and 100 images.
    assert "| 0.0200 ± 0.0010 |" in fid_results({**scores, "kid_subset_size": 100, "features": "x"})["markdown"]
    same = {**scores, "num_generated": 100, "kid_subset_size": 100, "kid_std": 0.0, "features": "x"}
    assert "| 0.0200 (each subset holds every image: no spread) |" in fid_results(same)["markdown"]


def test_a_result_file_is_refused_before_any_work_where_writing_would_destroy_something(tmp_path, capsys):
    notes, earlier = tmp_path / "notes.txt", tmp_path / "fid.json"
    notes.write_text("mine")
    earlier.write_text(json.dumps({"scores": {"fid": 1.0}}))
    argv = ["fid", "--real", str(tmp_path / "no-such-set"), "--generated", str(tmp_path / "no-such-set")]
    for output, reason in {
        notes: "exists and is not an earlier result of this command",
        tmp_path: "is a folder; name a file",
        tmp_path / "missing" / "fid.json": "does not exist",
    }.items():
        assert polyp_ddpm([*argv, "--output", str(output)]) == 1
        assert reason in capsys.readouterr().err
    assert notes.read_text() == "mine"
    empty = tmp_path / "empty.json"  # as `mktemp` makes it
    empty.touch()
    for replaceable in (earlier, empty):  # accepted: the data fail next
        assert polyp_ddpm([*argv, "--output", str(replaceable)]) == 1
        assert "no-such-set" in capsys.readouterr().err


# DINOv2 features (transformers) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory):
    """A randomly initialised DINOv2 of a few thousand parameters, saved as a model folder (safetensors)."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(path)
    return path


def test_dinov2_distances_are_near_zero_for_identical_sets_and_larger_for_different_ones(tiny_dinov2_dir):
    extractor = dinov2_extractor(str(tiny_dinov2_dir))
    real = make_demo_dataset(24, 32, test_size=0.5, seed=0)["train"]
    darker = real.map(lambda row: {"image": PIL.Image.eval(row["image"], lambda v: v // 3)})
    same = fid_kid(real, real, extractor=extractor, kid_subset_size=6, kid_subsets=10)
    different = fid_kid(real, darker, extractor=extractor, kid_subset_size=6, kid_subsets=10)
    assert abs(same["fid"]) < 1e-2 and different["fid"] > 100 * max(abs(same["fid"]), 1e-3)
    assert different["kid_mean"] > same["kid_mean"]
    assert same["features"] == f"DINOv2 {tiny_dinov2_dir.name} class token (32)"


def test_dinov2_weights_that_cannot_be_loaded_say_how_to_provide_them(tmp_path):
    with pytest.raises(RuntimeError, match="pass it with --dinov2-weights DIR"):
        dinov2_extractor(str(tmp_path / "no-such-model"))


def test_fid_cli_computes_dinov2_distances(demo_masks, generated, tiny_dinov2_dir, tmp_path, capsys):
    output = tmp_path / "fid.json"
    argv = ["fid", "--real", str(demo_masks), "--generated", str(generated), "--features", "dinov2",
            "--dinov2-weights", str(tiny_dinov2_dir), "--kid-subset-size", "4", "--output", str(output)]  # fmt: skip
    assert polyp_ddpm(argv) == 0, capsys.readouterr().err
    scores = json.loads(output.read_text())["scores"]
    assert scores["features"].startswith("DINOv2") and scores["fid"] > 0


# Segmentation scores ---------------------------------------------------------------------------------------------


def test_test_sets_whose_folders_share_a_name_are_told_apart_and_one_given_twice_is_refused(tmp_path, monkeypatch):
    for folder in ("study/data/demo", "other/demo"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert name_test_sets(["data/kvasir-seg", "USER/cvc:validation"]) == ["kvasir-seg:test", "cvc:validation"]
    # Before, the second replaced the first, and one set was scored under the name of both.
    assert name_test_sets(["study/data/demo:test", f"{tmp_path}/other/demo:test", "other/demo:train"]) == [
        "data/demo:test",
        "other/demo:test",
        "demo:train",
    ]
    with pytest.raises(ValueError, match=f"--test ./other/demo:test and --test {tmp_path}/other/demo are the same"):
        name_test_sets(["./other/demo:test", f"{tmp_path}/other/demo"])


def test_segmentation_scores_match_hand_computed_values():
    target = torch.zeros(3, 1, 4, 4)
    prediction = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 target pixels
    prediction[0, 0, :2, :3] = 1  # 6 predicted, 4 of them right
    target[1, 0, 0, 0] = 1  # a missed polyp: nothing predicted
    # image 2: both empty
    scores = segmentation_scores(prediction, target)
    torch.testing.assert_close(scores["iou"], torch.tensor([4 / 6, 0.0, 1.0]))
    torch.testing.assert_close(scores["dice"], torch.tensor([8 / 10, 0.0, 1.0]))
    torch.testing.assert_close(scores["precision"], torch.tensor([4 / 6, 0.0, 1.0]))
    torch.testing.assert_close(scores["recall"], torch.tensor([1.0, 0.0, 1.0]))


def test_a_segformer_predicts_full_size_masks_and_learns_a_batch():
    torch.manual_seed(0)
    pairs = make_demo_dataset(8, 32, test_size=2, seed=0)["train"].with_transform(pair_transform(32))[:]
    model = build_segmenter("segformer", segformer_size="b0")
    training_step = make_training_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    losses = [training_step(pairs["images"], pairs["masks"]).item() for _ in range(15)]
    assert logits_of(model, pairs["images"]).shape == pairs["masks"].shape == (6, 1, 32, 32)
    assert losses[-1] < 0.8 * losses[0]


class HostTraffic(TorchDispatchMode):
    """
    Records the operators that read a tensor's value on the host (on a GPU each waits for all queued work) and
    those that copy between devices (host to device ones cannot be captured in a CUDA graph).
    """

    READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "unique", "masked_select"}

    def __init__(self):
        super().__init__()
        self.reads, self.transfers, self.operators = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators += 1
        output = func(*args, **(kwargs or {}))
        if func._schema.name.split("::")[-1] in self.READS:
            self.reads.append(func._schema.name)
        tensors = [leaf for leaf in tree_leaves((args, kwargs, output)) if isinstance(leaf, torch.Tensor)]
        if len({tensor.device.type for tensor in tensors}) > 1:
            self.transfers.append(func._schema.name)
        return output


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluating_leaves_the_segmenter_in_the_mode_it_was_in(mode):
    # A loaded segmenter is in eval mode: scoring it (mask fidelity) must not switch its BatchNorm to training.
    model = build_segmenter("monai").train(mode == "train")
    images, masks = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.zeros(2, 1, 32, 32)
    evaluate(model, images, masks, batch_size=2)
    assert model.training == (mode == "train")


@pytest.mark.parametrize("architecture", ["monai", "segformer"])
def test_a_segmenter_training_step_can_be_captured_as_a_cuda_graph(architecture):
    # What capture needs, checked without a GPU: no value read back to the host, gradients left at None (on the
    # CPU, with the fused Adam that CUDA runs; the unfused one reads its step count on the host), and no copy
    # between the model's device and the host (on the meta device, where a copy shows as an operator that mixes
    # devices; Adam has no meta kernels, so SGD steps there).
    torch.manual_seed(0)
    model = build_segmenter(architecture)
    training_step = make_training_step(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
    images, masks = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 1, 32, 32) > 0.5).float()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    for _ in range(2):  # the second step too: the optimizer creates its state in the first
        with HostTraffic() as watch:
            training_step(images, masks)
        assert watch.operators > 100 and watch.reads == []
    assert all(parameter.grad is None for parameter in model.parameters())
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))

    model = build_segmenter(architecture).to("meta")
    training_step = make_training_step(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    images, masks = images.to("meta"), masks.to("meta")
    with HostTraffic() as watch:
        training_step(images, masks)
    assert watch.operators > 100 and watch.transfers == []


def test_cuda_graphs_are_the_default_on_one_gpu_and_refused_where_they_cannot_run():
    use_cuda_graphs = load_training_script("train_segmentation").use_cuda_graphs
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs(None, cuda, "bf16", 1) and use_cuda_graphs(None, cuda, "no", 1)
    assert not use_cuda_graphs(False, cuda, "bf16", 1)
    # fp16's loss scaling reads the GPU; several processes share gradients through NCCL.
    assert not any(use_cuda_graphs(None, device, precision, processes)
                   for device, precision, processes in [(cpu, "no", 1), (cuda, "fp16", 1), (cuda, "bf16", 2)])  # fmt: skip
    with pytest.raises(SystemExit, match="needs one process on a CUDA device.*has 1 on cpu with no"):
        use_cuda_graphs(True, cpu, "no", 1)


def test_train_segmentation_runs_a_segformer(demo_masks, tmp_path):
    output = tmp_path / "segformer"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "train_segmentation.py"), "--train", "real",
         "--real", str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir", str(output),
         "--architecture", "segformer", "--resolution", "32", "--max_train_steps", "2", "--validation_steps", "2",
         "--train_batch_size", "2", "--validation_size", "2", "--cudnn_benchmark"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((output / "results.json").read_text())
    assert results["segmenter"] == "SegFormer (MiT-b0, random init)"
    assert 0 <= results["test"]["demo:test"]["iou"] <= 1
    timing = results["timing"]
    assert timing["cuda_graphs"] is False and timing["cudnn_benchmark"] is True and " CPU, " in timing["device"]
    assert 0 < timing["start_up_s"] and 0 < timing["training_s"] and 0 < timing["testing_s"]
    assert timing["start_up_s"] + timing["training_s"] + timing["testing_s"] <= timing["total_s"]
    phases = list(timing["start_up_phases_s"].values())
    assert list(timing["start_up_phases_s"]) == ["imports", "accelerator", "datasets", "pair_tensors"]
    assert 0 < phases[0] and phases == sorted(phases) and phases[-1] <= timing["start_up_s"]


def test_a_segmenter_that_diverges_stops_at_its_validation_and_writes_no_results(demo_masks, tmp_path):
    output = tmp_path / "diverged"
    main = load_training_script("train_segmentation").main
    with pytest.raises(
        FloatingPointError, match=r"NaN or inf in \d+ weight tensors at step 2 .* lower --learning_rate"
    ):
        main(["--train", "real", "--real", str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir",
              str(output), "--resolution", "32", "--max_train_steps", "4", "--validation_steps", "2",
              "--train_batch_size", "2", "--validation_size", "2", "--learning_rate", "1e30"])  # fmt: skip
    assert not (output / "results.json").exists() and not (output / "best.safetensors").exists()


def test_train_segmentation_refuses_what_it_would_mix_with_or_replace_in_one_line(demo_masks, tmp_path, capsys):
    def command(output, *flags):
        return [sys.executable, str(REPO_ROOT / "training" / "train_segmentation.py"), "--train", "real", "--real",
                str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir", str(output), "--resolution", "32",
                "--max_train_steps", "2", "--validation_steps", "2", "--train_batch_size", "2", "--validation_size",
                "2", *flags]  # fmt: skip

    def train(output, *flags):
        return subprocess.run(command(output, *flags), capture_output=True, text=True, timeout=300)

    finished, other = tmp_path / "finished", tmp_path / "other"
    assert train(finished).returncode == 0
    results = (finished / "results.json").read_text()
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refusals = {
        (finished,): "holds a finished run (results.json): choose another folder, or pass --overwrite",
        (demo_masks / "run",): "lies inside the real dataset",
        (other, "--overwrite"): "holds notes.txt, which this script does not write",
        (tmp_path / "new", "--test", f"{demo_masks}:nope"): "nope",
        (tmp_path / "new", "--validation_size", "1000"): "--validation_size 1000 leaves no train or no validation pair",
        (tmp_path / "twice", "--test", f"{demo_masks}:test"): "are the same test set: name it once",
    }
    main = load_training_script("train_segmentation").main  # in this process: no start-up for each refusal
    for (output, *flags), reason in refusals.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            main(command(output, *flags)[2:])
    with pytest.raises(SystemExit):
        main(command(tmp_path / "new", "--validation_size", "0")[2:])
    assert "argument --validation_size: 0 is neither a whole count" in capsys.readouterr().err
    result = train(finished)  # on the command line: one line, no traceback
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert refusals[(finished,)] in result.stderr.strip().splitlines()[-1]
    assert (finished / "results.json").read_text() == results and (other / "notes.txt").read_text() == "mine"
    assert not (demo_masks / "run").exists() and not (tmp_path / "twice").exists()
    # A replacing run that stops once its inputs have loaded (an encoder that cannot be found): the finished run
    # it would replace is whole.
    weights = (finished / "best.safetensors").read_bytes()
    stopped = train(finished, "--overwrite", "--architecture", "segformer", "--encoder_weights", str(tmp_path / "no"))
    assert stopped.returncode == 1 and "datasets" not in stopped.stderr.strip().splitlines()[-1]
    assert (finished / "results.json").read_text() == results and (
        finished / "best.safetensors"
    ).read_bytes() == weights
    assert train(finished, "--overwrite", "--seed", "1").returncode == 0
    assert json.loads((finished / "results.json").read_text())["config"]["seed"] == 1
    assert not (finished / ".running.safetensors").exists() and (finished / "best.safetensors").read_bytes() != weights


def generated_from(output, mask_dataset, split, source_ids):
    """A dataset as `polyp-ddpm generate` leaves it: pairs named after the real pairs they came from, and its settings."""
    real = load_from_disk(str(mask_dataset))[split].select(range(len(source_ids)))
    pairs = real.map(lambda pair, i: {"id": f"syn{i}", "source_id": source_ids[i]}, with_indices=True)
    DatasetDict({"train": pairs}).save_to_disk(str(output))
    (output / "generation.json").write_text(json.dumps({"mask_dataset": str(mask_dataset), "split": split}))
    return output


def test_test_sets_holding_pairs_the_segmenter_learns_from_are_refused_before_training(demo_masks, tmp_path):
    test_ids = list(load_from_disk(str(demo_masks))["test"]["id"])
    from_test_masks = generated_from(tmp_path / "from-test", demo_masks, "test", [f"{test_ids[0]}+{test_ids[1]}"])
    # The same ids in another dataset (CVC-ClinicDB and ETIS both number their frames) are other pairs.
    other_dataset = tmp_path / "other"
    shutil.copytree(demo_masks, other_dataset)

    def flags(train, *more):
        return ["--train", train, "--real", str(demo_masks), "--output_dir", str(tmp_path / "run"), "--resolution",
                "32", "--max_train_steps", "2", "--validation_steps", "2", "--train_batch_size", "2",
                "--validation_size", "2", *more]  # fmt: skip

    refusals = {
        ("real", "--test", f"{demo_masks}:train"): (
            f"test set {demo_masks}:train shares 6 of its 6 pairs with --real {demo_masks} (split train)"
        ),
        ("synthetic", "--synthetic", str(from_test_masks), "--test", f"{other_dataset}:test", "--test",
         f"{demo_masks}:test"): (
            f"test set {demo_masks}:test shares 2 of its 4 pairs with the real pairs whose masks made --synthetic "
            f"{from_test_masks} ({demo_masks}, split test)"
        ),
        ("real+synthetic", "--synthetic", str(demo_masks), "--synthetic_split", "test", "--test",
         f"{demo_masks}:test"): (
            f"test set {demo_masks}:test shares 4 of its 4 pairs with --synthetic {demo_masks} (split test)"
        ),
    }  # fmt: skip
    main = load_training_script("train_segmentation").main
    for (train, *more), reason in refusals.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            main(flags(train, *more))
    assert not (tmp_path / "run").exists()
    # Refused once for all settings, before any work: no run folder, no generated pairs.
    compare = load_training_script("compare_segmentation").main
    comparison = tmp_path / "comparison"
    with pytest.raises(ValueError, match=re.escape(refusals[next(iter(refusals))])):
        compare(["--real", str(demo_masks), "--model", "never-loaded", "--test", f"{demo_masks}:train",
                 "--output_dir", str(comparison)])  # fmt: skip
    with pytest.raises(ValueError, match="whose masks made --synthetic"):
        compare(["--real", str(demo_masks), "--synthetic", str(from_test_masks), "--test", f"{demo_masks}:test",
                 "--output_dir", str(comparison)])  # fmt: skip
    with pytest.raises(ValueError, match="are the same test set: name it once"):
        compare(["--real", str(demo_masks), "--model", "never-loaded", "--test", f"{demo_masks}:test", "--test",
                 f"{demo_masks}/:test", "--output_dir", str(comparison)])  # fmt: skip
    assert not comparison.exists()
    # Not refused: other datasets with the same ids, pairs made from the training masks, and synthetic pairs
    # that a --train real run only scores (mask fidelity).
    check_tests_apart(str(demo_masks), "train", [f"{other_dataset}:train", f"{other_dataset}:test"])
    from_training_masks = generated_from(tmp_path / "from-train", demo_masks, "train", ["train-a", "x+y"])
    check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(from_training_masks))
    train_segmentation = load_training_script("train_segmentation")
    only_scored = flags("real", "--synthetic", str(from_test_masks), "--test", f"{demo_masks}:test")
    train_segmentation.check_inputs(train_segmentation.parse_args(only_scored))


def test_test_sets_that_trained_the_models_behind_the_synthetic_pairs_are_refused(demo_masks, tmp_path):
    """A denoiser (or mask model) trained on the test split may reproduce its images: its pairs are no test set."""

    def trained_on(folder, split):
        folder.mkdir()
        (folder / "training_config.json").write_text(json.dumps({"dataset": str(demo_masks), "train_split": split}))
        return folder

    synthetic = generated_from(tmp_path / "synthetic", demo_masks, "train", ["train-a"])
    settings = {"mask_dataset": str(demo_masks), "split": "train", "model": str(trained_on(tmp_path / "d", "test"))}
    (synthetic / "generation.json").write_text(json.dumps(settings))
    expected = (
        f"test set {demo_masks}:test shares 4 of its 4 pairs with the real pairs that trained --model {tmp_path / 'd'} "
        f"({demo_masks}, split test), whose output the segmenter learns from"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(synthetic))
    # compare_segmentation.py, which generates its pairs with --model: refused before it generates or trains.
    comparison = tmp_path / "comparison"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_training_script("compare_segmentation").main(
            ["--real", str(demo_masks), "--model", str(tmp_path / "d"), "--test", f"{demo_masks}:test",
             "--output_dir", str(comparison)]
        )  # fmt: skip
    assert not comparison.exists()
    masks_from = {
        "model": str(trained_on(tmp_path / "e", "train")),
        "mask_model": str(trained_on(tmp_path / "m", "test")),
    }
    (synthetic / "generation.json").write_text(json.dumps({**settings, **masks_from}))
    with pytest.raises(
        ValueError, match=re.escape(f"trained --mask-model {tmp_path / 'm'} ({demo_masks}, split test)")
    ):
        check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(synthetic))
    # Models trained on the training split, or with no local record (a Hub id, a converted model), are no leak.
    (synthetic / "generation.json").write_text(json.dumps({**settings, "model": str(tmp_path / "e")}))
    check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(synthetic))
    (synthetic / "generation.json").write_text(json.dumps({**settings, "model": "someone/polyp-ddpm"}))
    check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(synthetic))
    # The resolved path train.py records now is read first: the folder named as given (relative) is no longer there.
    config = {"dataset": "moved-away", "dataset_path": str(demo_masks), "train_split": "test"}
    (tmp_path / "e" / "training_config.json").write_text(json.dumps(config))
    (synthetic / "generation.json").write_text(json.dumps({**settings, "model": str(tmp_path / "e")}))
    with pytest.raises(ValueError, match=re.escape(f"trained --model {tmp_path / 'e'} ({demo_masks}, split test)")):
        check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(synthetic))
    (tmp_path / "e" / "training_config.json").write_text("{")
    (synthetic / "generation.json").write_text(json.dumps({**settings, "model": str(tmp_path / "e")}))
    with pytest.raises(ValueError, match="training_config.json is damaged"):
        check_tests_apart(str(demo_masks), "train", [f"{demo_masks}:test"], str(synthetic))


def test_flags_that_would_fail_mid_run_are_refused_before_any_work(demo_masks, tmp_path, capsys):
    def command(*flags):
        return ["--train", "real", "--real", str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir",
                str(tmp_path / "run"), "--resolution", "32", *flags]  # fmt: skip

    refusals = {
        ("--eval_batch_size", "0"): "argument --eval_batch_size: 0 is not a whole number of at least 1",
        ("--validation_steps", "0"): "argument --validation_steps: 0 is not a whole number of at least 1",
        ("--resolution", "30"): "--resolution 30: --architecture monai needs at least 32 pixels",
        ("--resolution", "48", "--architecture", "smp"): "--resolution 48: --architecture smp needs a multiple of 32",
    }
    train_segmentation = load_training_script("train_segmentation")
    for flags, reason in refusals.items():
        with pytest.raises(SystemExit):
            train_segmentation.main(command(*flags))
        assert reason in capsys.readouterr().err
    # The benchmark refuses its settings' flags before generating pairs for them.
    compare = load_training_script("compare_segmentation").main
    with pytest.raises(SystemExit):
        compare(["--real", str(demo_masks), "--model", "never-loaded", "--test", f"{demo_masks}:test",
                 "--output_dir", str(tmp_path / "comparison"), "--eval_batch_size", "0"])  # fmt: skip
    assert "argument --eval_batch_size: 0 is not a whole number" in capsys.readouterr().err
    # A passed-on --train made every setting train on the same pairs (a table of one setting three times).
    for flag in (["--train", "real"], ["--train=synthetic"]):
        with pytest.raises(ValueError, match="compare_segmentation.py sets --train of train_segmentation.py itself"):
            compare(["--real", str(demo_masks), "--model", "never-loaded", "--test", f"{demo_masks}:test",
                     "--output_dir", str(tmp_path / "comparison"), *flag])  # fmt: skip
    assert not (tmp_path / "run").exists() and not (tmp_path / "comparison").exists()
    # A missing accelerate config failed each setting in turn; a folder of the user's had runs mixed into it.
    with pytest.raises(FileNotFoundError, match="--accelerate_config missing.yaml is not a file"):
        compare(["--real", str(demo_masks), "--model", "never-loaded", "--test", f"{demo_masks}:test",
                 "--output_dir", str(tmp_path / "comparison"), "--accelerate_config", "missing.yaml"])  # fmt: skip
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="holds thesis.tex, which no comparison writes"):
        compare(["--real", str(demo_masks), "--model", "never-loaded", "--test", f"{demo_masks}:test",
                 "--output_dir", str(theirs)])  # fmt: skip
    assert [path.name for path in theirs.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("architecture", ["monai", "segformer"])
def test_each_segmenter_runs_at_its_smallest_resolution_and_not_below(architecture):
    smallest = SMALLEST_RESOLUTION[architecture]
    torch.manual_seed(0)
    model = build_segmenter(architecture).train()
    assert logits_of(model, torch.zeros(2, 3, smallest, smallest)).shape == (2, 1, smallest, smallest)
    with pytest.raises((ValueError, RuntimeError)):  # the model's own late error that check_resolution forestalls
        logits_of(model, torch.zeros(2, 3, smallest - 1, smallest - 1))
    with pytest.raises(ValueError, match=f"needs at least {smallest} pixels"):
        check_resolution(architecture, smallest - 1)
    assert set(SMALLEST_RESOLUTION) == set(ARCHITECTURES)


def test_a_missing_optional_extra_is_one_line_that_names_it(demo_masks, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # its import now raises ImportError
    script = REPO_ROOT / "training" / "train_segmentation.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--train", "real", "--real", str(demo_masks), "--test",
                                      f"{demo_masks}:test", "--output_dir", str(tmp_path / "run"), "--architecture",
                                      "smp"])  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")  # as on the command line, in this process
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and "Traceback" not in error and len(error.splitlines()) == 1
    assert error.startswith("error: --architecture smp needs the [smp] extra")
    assert error.endswith("pip install 'polyp-diffusers[smp]'.")
    assert not (tmp_path / "run").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'polyp-diffusers[eval]'")):
        import_extra("segformer")


def test_a_segformer_started_from_pretrained_weights_reloads_without_them(demo_masks, tmp_path):
    # A local folder stands in for a Hub id such as nvidia/mit-b0; once trained, the run needs it no more.
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    pretrained = tmp_path / "mit-tiny"
    config = SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], decoder_hidden_size=16, num_labels=3)
    SegformerForSemanticSegmentation(config).save_pretrained(pretrained)
    output = tmp_path / "segformer"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "train_segmentation.py"), "--train", "real",
         "--real", str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir", str(output),
         "--architecture", "segformer", "--encoder_weights", str(pretrained), "--resolution", "32",
         "--max_train_steps", "2", "--validation_steps", "2", "--train_batch_size", "2", "--validation_size", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.rmtree(pretrained)
    model, config = load_trained_segmenter(output)
    assert config["encoder_weights"] == str(pretrained) and model.segformer.config.hidden_sizes == [8, 16, 24, 32]
    saved = load_file(str(output / "best.safetensors"))
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
    assert logits_of(model, torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.fixture(scope="module")
def real_segmenter(demo_masks, tmp_path_factory):
    """A segmenter trained on real pairs, on two processes as `accelerate launch` runs it on two GPUs (DDP, here
    over gloo on the CPU)."""
    segmenter = tmp_path_factory.mktemp("segmenter") / "real"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO_ROOT / "training" / "train_segmentation.py"), "--train", "real",
         "--real", str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir", str(segmenter),
         "--resolution", "32", "--max_train_steps", "2", "--validation_steps", "2", "--train_batch_size", "2",
         "--validation_size", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return segmenter


def test_mask_fidelity_scores_generated_pairs_with_a_segmenter_trained_on_real_ones(
    real_segmenter, demo_masks, generated, tmp_path, capsys
):
    output = tmp_path / "fidelity.json"
    arguments = ["--segmenter", str(real_segmenter), "--dataset", str(generated), "--output", str(output)]
    assert polyp_ddpm(["mask-fidelity", *arguments]) == 0
    scores = json.loads(output.read_text())
    assert scores["num_images"] == 12 and 0 <= scores["iou"] <= scores["dice"] <= 1
    assert scores["dataset"] == f"{generated}:train" and scores["segmenter_trained_on"] == "real"
    # Made from the 6 training masks, 2 images each; the segmenter learned from the 4 it did not hold out.
    assert scores["pairs_from_learned_masks"] == 8
    assert "Note: 8 of these 12 pairs were made from masks the segmenter learned from" in capsys.readouterr().out
    # Its training pairs unreadable now (here: a split gone): said, and the score is kept.
    moved = tmp_path / "moved-segmenter"
    shutil.copytree(real_segmenter, moved)
    record = json.loads((moved / "results.json").read_text())
    record["config"]["real_split"] = "gone"
    (moved / "results.json").write_text(json.dumps(record))
    assert polyp_ddpm(["mask-fidelity", "--segmenter", str(moved), "--dataset", str(generated)]) == 0
    assert "Note: whether these pairs were made from masks the segmenter learned from is unknown" in (
        capsys.readouterr().out
    )
    assert polyp_ddpm(["mask-fidelity", "--segmenter", str(tmp_path), "--dataset", str(generated)]) == 1
    assert "is not a train_segmentation.py output folder" in capsys.readouterr().err
    # Real pairs (no generation.json): said, and not published as a model's generated pairs.
    real_scores = tmp_path / "real-fidelity.json"
    arguments = ["--segmenter", str(real_segmenter), "--dataset", f"{demo_masks}:test", "--output", str(real_scores)]
    assert polyp_ddpm(["mask-fidelity", *arguments]) == 0
    assert f"Note: {demo_masks}:test has no generation.json" in capsys.readouterr().out
    assert "pairs (no record of the model that made them) of" in json.loads(real_scores.read_text())["markdown"]


def test_a_damaged_segmenter_folder_is_one_line_that_names_the_file(real_segmenter, generated, tmp_path, capsys):
    # Before: tracebacks, or hundreds of weight names for weights of another segmenter.
    damaged = tmp_path / "damaged-segmenter"
    shutil.copytree(real_segmenter, damaged)
    saved = json.loads((real_segmenter / "results.json").read_text())
    for text, problem in [
        ("{bad", "is damaged (JSONDecodeError"),
        ("[]", "is damaged (TypeError"),
        (json.dumps({**saved, "config": {k: v for k, v in saved["config"].items() if k != "resolution"}}),
         "is damaged (no resolution in its config)"),
        (json.dumps({**saved, "config": {**saved["config"], "architecture": "segformer"}}), "does not fit the segformer"),
    ]:  # fmt: skip
        (damaged / "results.json").write_text(text)
        assert polyp_ddpm(["mask-fidelity", "--segmenter", str(damaged), "--dataset", str(generated)]) == 1
        error = capsys.readouterr().err
        assert f"{damaged / 'results.json'} " in error or f"{damaged / 'best.safetensors'} " in error, error
        assert problem in error and "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    (damaged / "results.json").write_text(json.dumps(saved))
    weights = (real_segmenter / "best.safetensors").read_bytes()
    for cut in (weights[:100], b""):  # a copy cut short, an empty file
        (damaged / "best.safetensors").write_bytes(cut)
        assert polyp_ddpm(["mask-fidelity", "--segmenter", str(damaged), "--dataset", str(generated)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: {damaged / 'best.safetensors'} is damaged (") and "Traceback" not in error
    # Weights of a run that diverged: scored, they would be an IoU of 0 taken for a result.
    state = load_file(str(real_segmenter / "best.safetensors"))
    name = next(name for name, tensor in state.items() if tensor.is_floating_point())
    save_file({**state, name: torch.full_like(state[name], float("nan"))}, str(damaged / "best.safetensors"))
    assert polyp_ddpm(["mask-fidelity", "--segmenter", str(damaged), "--dataset", str(generated)]) == 1
    error = capsys.readouterr().err
    assert f"has NaN or inf in 1 weight tensors (first: {name}): its training diverged" in error


@pytest.fixture(scope="module")
def scored_generation(real_segmenter, demo_masks, saved_pipeline_dir, tmp_path_factory):
    """Pairs that `generate --fidelity-segmenter` made and scored: its folder and the scores it wrote."""
    made = tmp_path_factory.mktemp("scored") / "made"
    arguments = ["generate", "--model", str(saved_pipeline_dir), "--mask-dataset", str(demo_masks), "--sampler",
                 "ddim", "--steps", "2", "--batch-size", "4", "--output", str(made), "--fidelity-segmenter",
                 str(real_segmenter)]  # fmt: skip
    assert polyp_ddpm(arguments) == 0
    return made, json.loads((made / "mask_fidelity.json").read_text())


def test_generate_scores_its_pairs_as_mask_fidelity_does_and_uploads_last(
    real_segmenter, scored_generation, demo_masks, saved_pipeline_dir, tmp_path, capsys
):
    made, written = scored_generation
    output = tmp_path / "fidelity.json"
    arguments = ["--segmenter", str(real_segmenter), "--dataset", str(made), "--output", str(output)]
    assert polyp_ddpm(["mask-fidelity", *arguments]) == 0
    again = json.loads(output.read_text())
    assert written["num_images"] == 6 and written["dataset"] == f"{made}:train"
    assert written["iou"] == pytest.approx(again["iou"]) and written["dice"] == pytest.approx(again["dice"])
    # A wrong segmenter folder fails before sampling.
    generate = ["generate", "--model", str(saved_pipeline_dir), "--mask-dataset", str(demo_masks), "--sampler",
                "ddim", "--steps", "2", "--batch-size", "4"]  # fmt: skip
    assert polyp_ddpm([*generate, "--output", str(tmp_path / "never"), "--fidelity-segmenter", str(tmp_path)]) == 1
    assert not (tmp_path / "never").exists()
    # An upload (offline here, so it fails) comes last: the score is written before it, and the same command,
    # which has nothing more to generate, tries the upload again (before: "nothing to do").
    uploaded = tmp_path / "uploaded"
    upload = ["--push-to-hub", "--hub-id", "me/made", "--fidelity-segmenter", str(real_segmenter)]
    for _ in range(2):
        assert polyp_ddpm([*generate, "--output", str(uploaded), *upload]) == 1
        error = capsys.readouterr().err
        assert "uploading the dataset to the Hub repo me/made failed" in error
        assert "Or run the same generate command again: it finds the pairs made and uploads them." in error
        assert (uploaded / "mask_fidelity.json").is_file()


@pytest.fixture
def card_model(saved_pipeline_dir, tmp_path):
    """A copy of the saved pipeline, whose card the test may change."""
    model = tmp_path / "model"
    PolypDDPMPipeline.from_pretrained(saved_pipeline_dir).save_pretrained(model)
    return model


def test_mask_fidelity_goes_into_its_models_card_once_and_not_into_another_models(
    scored_generation, card_model, saved_pipeline_dir, tmp_path, capsys
):
    made, written = scored_generation
    scores = made / "mask_fidelity.json"
    assert polyp_ddpm(["card", str(card_model), "--results", str(scores)]) == 0
    card = (card_model / "README.md").read_text()
    assert (
        "### Mask fidelity (6 generated pairs of" in card
        and f"| {written['iou']:.4f} | {written['dice']:.4f} |" in card
    )
    assert "mask fidelity IoU (UNet++ trained on real)" in card and f"value: {round(written['iou'], 4)}" in card
    other = PolypDDPMPipeline.from_pretrained(saved_pipeline_dir)
    torch.nn.init.zeros_(next(other.unet.parameters()))
    other.save_pretrained(tmp_path / "other")
    assert polyp_ddpm(["card", str(tmp_path / "other"), "--results", str(scores)]) == 1
    assert f"scores images generated by {saved_pipeline_dir}, whose weights are not those of" in capsys.readouterr().err
    # The record holds the weights as they were when scored: a model folder moved away is still told apart.
    moved = {**written, "generated_by": str(tmp_path / "moved-away")}
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    assert polyp_ddpm(["card", str(tmp_path / "other"), "--results", str(tmp_path / "moved.json")]) == 1
    assert f"generated by {tmp_path / 'moved-away'}, whose weights are not those of" in capsys.readouterr().err
    shutil.copy(scores, tmp_path / "again.json")
    assert (
        polyp_ddpm(["card", str(card_model), "--results", str(scores), "--results", str(tmp_path / "again.json")]) == 1
    )
    assert f"--results {tmp_path / 'again.json'} holds the same results as {scores}" in capsys.readouterr().err
    assert (card_model / "README.md").read_text() == card


def test_a_card_edited_by_hand_keeps_its_edits_when_results_go_in(scored_generation, card_model):
    made, written = scored_generation
    scores = made / "mask_fidelity.json"
    assert polyp_ddpm(["card", str(card_model), "--results", str(scores)]) == 0
    readme = card_model / "README.md"
    edited = readme.read_text().replace("license: mit", "license: cc-by-nc-4.0")
    readme.write_text(edited.replace("## Limitations", "## Intended use\nInternal research only.\n\n## Limitations"))
    assert polyp_ddpm(["card", str(card_model), "--results", str(scores)]) == 0  # the same results, again
    card = readme.read_text()
    assert "license: cc-by-nc-4.0" in card and "## Intended use\nInternal research only.\n\n## Limitations" in card
    assert card.count("### Mask fidelity (6 generated pairs of") == 1 and card.count("model-index:") == 1
    assert f"value: {round(written['iou'], 4)}" in card
    # Without a Results section, one is added at the end.
    start, end = card.index("## Results"), card.index("## Intended use")
    readme.write_text(card[:start] + card[end:])
    assert polyp_ddpm(["card", str(card_model), "--results", str(scores)]) == 0
    card = readme.read_text()
    assert card.index("## Results") > card.index("## Citation") and "## Intended use" in card
    assert card.index(f"| {written['iou']:.4f} | {written['dice']:.4f} |") > card.index("## Results")


def test_results_files_edited_out_of_shape_are_one_line_each(scored_generation, card_model, tmp_path, capsys):
    _, written = scored_generation
    (tmp_path / "list.json").write_text("[]")
    assert polyp_ddpm(["card", str(card_model), "--results", str(tmp_path / "list.json")]) == 1
    assert "holds list; expected 'markdown' and 'eval_results'" in capsys.readouterr().err
    # Before: tracebacks, or "n/a" published as a metric.
    entry = written["eval_results"][0]
    for edit, problem in [
        ({"eval_results": [{"metric_type": "iou", "metric_value": 1.0}]}, "eval_results[0] is not a model-index entry"),
        ({"eval_results": "oops"}, "'eval_results' a list of model-index entries"),
        ({"markdown": 5}, "'markdown' must be text"),
        ({"eval_results": [{**entry, "extra_key": 1}]}, "eval_results[0] is not a model-index entry"),
        ({"eval_results": [{**entry, "metric_value": "n/a"}]}, "has metric_value 'n/a', not a finite number"),
        ({"generated_by": 5}, "'generated_by' is 5, not the path or id of a model"),
    ]:  # fmt: skip
        (tmp_path / "edited.json").write_text(json.dumps({**written, **edit}))
        assert polyp_ddpm(["card", str(card_model), "--results", str(tmp_path / "edited.json")]) == 1
        error = capsys.readouterr().err
        assert problem in error and len(error.strip().splitlines()) == 1, error
    assert not (card_model / "README.md").exists()  # no card was written
    (tmp_path / "notes.md").write_text("mine")  # a file named where the model folder goes
    assert polyp_ddpm(["card", str(tmp_path / "notes.md"), "--results", str(tmp_path / "edited.json")]) == 1
    assert f"{tmp_path / 'notes.md'} is not a folder; pass the folder of the saved pipeline" in capsys.readouterr().err


def test_synthetic_pairs_of_held_out_masks_stay_out_of_training_and_make_the_fidelity_set():
    ids = [f"r{i}" for i in range(10)]
    real = Dataset.from_dict({"image": ids, "mask": ids, "id": ids})
    sources = [*ids, "r0+r1", "r2+r3"]  # one twin per real pair, and two new masks made of two real ones each
    synthetic = Dataset.from_dict(
        {"image": sources, "mask": sources, "id": [f"s{i}" for i in range(12)], "source_id": sources}
    )
    held_out = held_out_ids(real, 0.2, seed=0)
    train_set, validation_set = training_pairs("real+synthetic", real, synthetic, 0.2, seed=0)
    assert set(validation_set["id"]) == held_out and len(held_out) == 2
    trained_sources = {source for source in train_set["image"]}
    assert not any(set(source.split("+")) & held_out for source in trained_sources)  # no part of a held-out mask
    fidelity = held_out_synthetic(real, synthetic, 0.2, seed=0)
    assert all(set(source.split("+")) <= held_out for source in fidelity["source_id"])
    assert set(fidelity["source_id"]) >= held_out


# End to end -----------------------------------------------------------------------------------------------------


def test_the_benchmark_command_says_in_one_line_what_failed(demo_masks, saved_pipeline_dir, tmp_path):
    def compare(*flags):
        command = [sys.executable, str(REPO_ROOT / "training" / "compare_segmentation.py"), "--real", str(demo_masks)]
        command += ["--test", f"{demo_masks}:test", "--output_dir", str(tmp_path / "comparison"), *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    earlier = tmp_path / "comparison" / "comparison.json"
    earlier.parent.mkdir()
    earlier.write_text("{}")  # kept: a setting that fails replaces none of the runs it compares
    generation = ("--model", str(saved_pipeline_dir), "--sampler", "ddim", "--generation_batch_size", "8")
    missing = tmp_path / "no-encoder"  # found missing by the setting's run, once its data has loaded
    failed_setting = compare(
        *generation, "--steps", "2", "--settings", "real", "--architecture", "segformer", "--encoder_weights", missing
    )
    assert earlier.read_text() == "{}"
    # The setting's own error and the launcher's traceback come before this command's line.
    assert failed_setting.returncode == 1 and str(missing) in failed_setting.stderr
    assert failed_setting.stderr.strip().splitlines()[-1] == (
        "error: the real setting failed (its error is above); nothing was compared."
    )
    # The pairs made above are kept, not mixed with pairs of other settings (in this process: no start-up).
    with pytest.raises(ValueError, match="holds synthetic pairs generated with other settings") as refusal:
        load_training_script("compare_segmentation").main(
            ["--real", str(demo_masks), "--test", f"{demo_masks}:test", "--output_dir", str(tmp_path / "comparison"),
             *generation, "--steps", "3"]
        )  # fmt: skip
    assert str(refusal.value).endswith("delete that folder to generate them again, or choose another --output_dir.")


def test_the_benchmark_command_runs_end_to_end_and_fills_the_model_card(
    demo_masks, generated, saved_pipeline_dir, tmp_path, capsys
):
    output = tmp_path / "comparison"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "training" / "compare_segmentation.py"),
            "--real",
            str(demo_masks),
            "--synthetic",
            str(generated),
            "--test",
            f"{demo_masks}:test",
            "--output_dir",
            str(output),
            "--accelerate_config",
            str(REPO_ROOT / "training" / "configs" / "cpu.yaml"),
            "--resolution",
            "32",
            "--max_train_steps",
            "3",
            "--validation_steps",
            "3",
            "--train_batch_size",
            "2",
            "--validation_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    comparison = json.loads((output / "comparison.json").read_text())
    assert list(comparison["runs"]) == ["real", "synthetic", "real+synthetic"]
    runs = comparison["runs"]
    assert (runs["real"]["num_train_pairs"], runs["synthetic"]["num_train_pairs"]) == (4, 8)  # validation held out
    assert runs["real+synthetic"]["num_train_pairs"] == 12
    for run in runs.values():
        scores = run["test"]["demo:test"]
        assert 0 <= scores["iou"] <= scores["dice"] <= 1 and scores["num_images"] == 4
    table = (output / "comparison.md").read_text()
    assert table.count("\n| real") == 2 and "| synthetic |" in table

    model = tmp_path / "model"
    PolypDDPMPipeline.from_pretrained(saved_pipeline_dir).save_pretrained(model)
    result = subprocess.run(
        [sys.executable, "-m", "polyp_diffusers.cli", "card", str(model), "--results", str(output / "comparison.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    card = (model / "README.md").read_text()
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"markdown": ')
    assert polyp_ddpm(["card", str(model), "--results", str(damaged)]) == 1
    assert f"--results {damaged} is not valid JSON" in capsys.readouterr().err
    assert (model / "README.md").read_text() == card
    assert (
        "model-index" in card and "UNet++ IoU, trained on real+synthetic" in card and "Downstream segmentation" in card
    )
