"""The commands as a user runs them: what they refuse, what they never delete, what they say when input is wrong."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
from datasets import Dataset, DatasetDict, Features, Value, load_from_disk
from datasets import Image as ImageFeature
from safetensors.torch import load_file, save_file

from polyp_diffusers import PolypDDPMPipeline, PolypMaskPipeline, make_polyp_scheduler, make_polyp_unet_from_preset
from polyp_diffusers import cli as cli_module
from polyp_diffusers import commands as commands_module
from polyp_diffusers import generate as generate_module
from polyp_diffusers.cli import main as polyp_ddpm
from polyp_diffusers.data import RawPair, build_dataset, load_polyp_dataset, validate_pair
from polyp_diffusers.folders import OutputClaim, OutputInUseError, staging_folder, write_text_atomically
from polyp_diffusers.generate import PARTS_DIR, SETTINGS_FILE, OtherRunError, generate_dataset, load_pipeline
from polyp_diffusers.hub_card import publish as publish_module
from polyp_diffusers.hub_card.cards import with_results_of, write_model_card
from polyp_diffusers.hub_card.publish import UploadError, hub_repo_id, push_dataset, push_folder
from polyp_diffusers.pipelines import ModelKindError
from polyp_diffusers.prepare_data import prepare_dataset
from polyp_diffusers.results import card_naming

from .test_data import polyp_pair, write_folder

GENERATION = dict(split="test", sampler="ddim", num_inference_steps=2, batch_size=4)


@pytest.fixture
def pair_folder(tmp_path):
    pairs = {f"case{i}": (*polyp_pair(seed=i), ".png", ".png") for i in range(4)}
    return write_folder(tmp_path / "source", pairs)


def run_cli(capsys, *argv):
    """Runs `polyp-ddpm ARGV` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = polyp_ddpm([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse rejects arguments with exit code 2
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# prepare-data ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_of", [lambda source: source, lambda source: source.parent])
def test_prepare_data_never_overwrites_its_own_source(pair_folder, output_of):
    before = sorted(p.name for p in (pair_folder / "images").iterdir())
    with pytest.raises(ValueError, match="would delete the input"):
        prepare_dataset(str(pair_folder), output_of(pair_folder), test_size=1, overwrite=True)
    assert sorted(p.name for p in (pair_folder / "images").iterdir()) == before


def test_the_demo_set_refuses_a_split_file_rather_than_ignore_it(tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text('{"train": ["a"], "test": ["b"]}')
    with pytest.raises(ValueError, match="demo set is split at random"):
        prepare_dataset("demo", tmp_path / "demo", split_file=str(split_file))
    assert not (tmp_path / "demo").exists()


def test_a_folder_with_images_but_no_masks_names_the_missing_folder(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no 'masks/' folder.*--mask-dir"):
        build_dataset(str(tmp_path / "src"))


def test_a_missing_relative_path_is_named_as_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="data/kvasir-seg does not exist"):
        load_polyp_dataset("data/kvasir-seg")


def test_a_name_that_may_be_a_hub_id_costs_one_quick_look_at_the_hub(tmp_path, monkeypatch):
    """No `data/` folder: the name may be a Hub id. One request, no download retries (offline here: it fails)."""
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"data/kvasir-seg is (not a folder under|neither a folder under)"):
        load_polyp_dataset("data/kvasir-seg")
    assert time.perf_counter() - started < 10


def test_an_exif_rotated_image_turns_its_mask_with_it(tmp_path):
    """The stored pixels of image and mask match; the tag says how to show the image upright (here: 90 degrees)."""
    image, mask = polyp_pair(width=48, height=32)
    mask_pixels = np.asarray(mask)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    folder = tmp_path / "exif"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    image.save(folder / "images" / "a.jpg", exif=exif)
    mask.save(folder / "masks" / "a.png")
    row = validate_pair(RawPair("a", str(folder / "images" / "a.jpg"), str(folder / "masks" / "a.png")))
    stored_mask = np.asarray(PIL.Image.open(io.BytesIO(row["mask"]["bytes"])))
    stored_image = PIL.Image.open(io.BytesIO(row["image"]["bytes"]))
    assert stored_image.size == (32, 48) and stored_mask.shape == (48, 32)
    np.testing.assert_array_equal(stored_mask > 127, np.rot90(mask_pixels > 127, k=-1))
    assert (row["width"], row["height"]) == (32, 48)


def test_a_mostly_white_mask_is_flagged_as_possibly_inverted(tmp_path, caplog):
    image, mask = polyp_pair()
    inverted = np.full_like(np.asarray(mask), 255)
    inverted[10:14, 20:26] = 0  # white background, a small black polyp
    inverted = PIL.Image.fromarray(inverted)
    folder = write_folder(
        tmp_path / "src",
        {
            "inv": (image, inverted, ".png", ".png"),
            **{f"ok{i}": (*polyp_pair(seed=i), ".png", ".png") for i in range(2)},
        },
    )
    with caplog.at_level(logging.WARNING, logger="polyp_diffusers.data"):
        build_dataset(str(folder), test_size=1)
    assert any("inv:" in message and "inverted" in message for message in caplog.messages)
    assert not any(message.startswith("ok") for message in caplog.messages)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prepare-data", "demo", "--resolution", "0"], "--resolution: 0 is not a whole number of at least 1"),
        (["prepare-data", "demo", "--test-size", "nan"], "--test-size: nan is neither a whole count"),
        (["prepare-data", "demo", "--test-size", "2.5"], "--test-size: 2.5 is neither a whole count"),
    ],
)
def test_prepare_data_rejects_bad_numbers_before_any_work(capsys, tmp_path, argv, expected):
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert code == 2 and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prepare-data", "demo", "--output", ""], "argument --output: is empty; name the folder or file to write"),
        (["prepare-data", "demo", "--output", " "], "argument --output: is empty"),
        (["demo", "--model", "m", "--port", "99999"], "argument --port: 99999 is not a port number (1 to 65535)"),
        (["demo", "--model", "m", "--port", "0"], "argument --port: 0 is not a port number"),
        (["demo", "--model", "m", "--write-space", ""], "argument --write-space: is empty"),  # before: served
    ],
)
def test_an_empty_output_or_a_port_out_of_range_is_refused_by_the_parser(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and expected in err


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**63 - 1, 2**64 - 1])
def test_seeds_a_generation_cannot_record_are_refused_before_the_model_loads(
    saved_pipeline_dir, demo_masks, tmp_path, seed
):
    output = tmp_path / "synthetic"
    with pytest.raises(ValueError, match=f"seed is {seed}; this generation draws [0-9]+ seeds from it on, so it must"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, seed=seed, **GENERATION)
    assert not output.exists()


def test_help_pages_show_defaults(capsys):
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0
    assert "(default: train)" in out and "(default: 16)" in out and "(default: 0)" in out


def test_parsing_imports_neither_torch_nor_diffusers_and_every_subcommand_has_its_run():
    # A fresh interpreter (this one has imported everything): help took 6-7 s on 2 CPU cores when it did.
    probe = "import sys; from polyp_diffusers import cli; cli.build_parser(); print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "'torch'" not in loaded and "'diffusers'" not in loaded and "'datasets'" not in loaded
    parser = cli_module.build_parser()
    subcommands = next(action for action in parser._actions if action.dest == "command").choices
    assert len(subcommands) == 8
    assert all(callable(getattr(commands_module, sub.get_default("run"), None)) for sub in subcommands.values())


# generate ------------------------------------------------------------------------------------------------------


def test_generate_refuses_a_folder_it_did_not_write_even_with_overwrite(saved_pipeline_dir, demo_masks, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="was not written by `polyp-ddpm generate`"):
            generate_dataset(str(saved_pipeline_dir), str(demo_masks), precious, overwrite=overwrite, **GENERATION)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_more_steps_than_the_model_was_trained_with_are_refused_before_any_work(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch
):
    monkeypatch.setattr(generate_module, "load_pipeline", pytest.fail)  # refused before the model is loaded
    with pytest.raises(ValueError, match=r"--steps \(num_inference_steps\) is 1000; the schedule of .* has 250 steps"):
        generate_dataset(
            str(saved_pipeline_dir), str(demo_masks), tmp_path / "out", **{**GENERATION, "num_inference_steps": 1000}
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["model", "masks"])
def test_generate_never_writes_over_its_inputs(saved_pipeline_dir, demo_masks, which):
    before = sorted(p.name for p in demo_masks.iterdir())
    output = saved_pipeline_dir if which == "model" else demo_masks
    with pytest.raises(ValueError, match="would delete the input"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, overwrite=True, **GENERATION)
    assert sorted(p.name for p in demo_masks.iterdir()) == before
    assert (saved_pipeline_dir / "model_index.json").is_file()


def test_overwrite_replaces_a_finished_generation_only_when_asked(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch
):
    output = tmp_path / "synthetic"
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, seed=0, **GENERATION)
    assert json.loads((output / SETTINGS_FILE).read_text())["seed"] == 0
    with pytest.raises(OtherRunError, match="generated with other settings; pass --overwrite"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, seed=1, **GENERATION)
    calls = []
    monkeypatch.setattr(PolypDDPMPipeline, "__call__", lambda *args, **kwargs: calls.append(1))
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, seed=0, **GENERATION)  # the same again
    assert calls == [] and json.loads((output / SETTINGS_FILE).read_text())["seed"] == 0
    monkeypatch.undo()
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, seed=1, overwrite=True, **GENERATION)
    assert list(load_from_disk(str(output))["test"]["seed"]) == [1, 2, 3, 4]
    assert not (output / PARTS_DIR).exists()
    hidden = [p.name for p in output.parent.iterdir() if p.name.startswith(".")]
    assert hidden == [".synthetic.lock"]  # no staging left behind, only the (released) claim's lock file


def test_a_second_generate_on_an_output_in_use_is_refused_and_touches_nothing(saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "synthetic"
    (output / PARTS_DIR).mkdir(parents=True)  # the first run, before its first batch: a second would remove it
    with OutputClaim(output, beside=True):  # as generate claims it
        with pytest.raises(OutputInUseError, match=f"{output} is being written by another running command"):
            generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
        assert (output / PARTS_DIR).is_dir()
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)  # once the first has ended


def test_overwrite_leaves_alone_a_generation_folder_holding_files_generate_does_not_write(
    saved_pipeline_dir, demo_masks, tmp_path
):
    output = tmp_path / "synthetic"
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
    (output / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="holds notes.md, which `polyp-ddpm generate` does not write"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, seed=1, overwrite=True, **GENERATION)
    assert (output / "notes.md").read_text() == "mine"


def test_a_generate_that_fails_before_its_first_image_leaves_nothing(saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "synthetic"
    with pytest.raises(FileNotFoundError):
        generate_dataset(str(tmp_path / "no-model"), str(demo_masks), output, **GENERATION)
    assert not output.exists()
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)  # the corrected command runs
    assert len(load_from_disk(str(output))["test"]) == 4


def test_overwrite_discards_an_unfinished_run_with_other_settings(saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "synthetic"
    (output / PARTS_DIR).mkdir(parents=True)
    (output / PARTS_DIR / SETTINGS_FILE).write_text(json.dumps({"seed": 99}))
    (output / PARTS_DIR / "part-000000.parquet").write_text("stale")
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, overwrite=True, **GENERATION)
    assert list(load_from_disk(str(output))["test"]["seed"]) == [0, 1, 2, 3]


def test_a_generation_is_of_the_masks_and_model_configuration_not_of_their_folders(
    saved_pipeline_dir, demo_masks, tmp_path
):
    model, masks, output = tmp_path / "model", tmp_path / "masks", tmp_path / "synthetic"
    shutil.copytree(saved_pipeline_dir, model)
    shutil.copytree(demo_masks, masks)
    generate_dataset(str(model), str(masks), output, **GENERATION)
    # Unfinished, as a killed run leaves it: its first batch written, the settings recorded beside it.
    (output / PARTS_DIR).mkdir()
    shutil.copy(output / SETTINGS_FILE, output / PARTS_DIR / SETTINGS_FILE)
    load_from_disk(str(output))["test"].to_parquet(str(output / PARTS_DIR / "part-000000-000004.parquet"))
    for finished in (False, True):
        # The masks prepared again in their folder (as many, other pairs): another generation.
        prepare_dataset("demo", masks, test_size=4, resolution=32, demo_pairs=10, seed=7, overwrite=True)
        with pytest.raises(OtherRunError, match="other settings"):
            generate_dataset(str(model), str(masks), output, **GENERATION)
        shutil.rmtree(masks)
        shutil.copytree(demo_masks, masks)
        # The model's start timestep edited in its config: every image changes.
        index = model / "model_index.json"
        original = index.read_text()
        index.write_text(json.dumps({**json.loads(original), "start_timestep": 60}))
        with pytest.raises(OtherRunError, match="other settings"):
            generate_dataset(str(model), str(masks), output, **GENERATION)
        index.write_text(original)
        if not finished:
            generate_dataset(str(model), str(masks), output, **GENERATION)  # as it was: the run continues


def test_a_checkpoint_folder_as_model_is_explained(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-500"
    (checkpoint / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="is a training checkpoint.*--output_dir"):
        load_pipeline(str(checkpoint))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing" / "model"))


def test_a_pipeline_whose_config_was_edited_into_the_wrong_types_is_one_line(saved_pipeline_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(saved_pipeline_dir, edited)
    scheduler_config = edited / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()), "num_train_timesteps": "abc"}))
    with pytest.raises(ValueError, match=f"could not load the pipeline {edited}: its configuration is damaged"):
        load_pipeline(str(edited))
    (edited / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="its configuration is damaged"):
        load_pipeline(str(edited))


@pytest.mark.parametrize(
    ("flag", "value"), [("--steps", "0"), ("--batch-size", "0"), ("--num-images-per-mask", "0"), ("--steps", "2.5")]
)
def test_generate_rejects_bad_numbers_before_any_work(capsys, saved_pipeline_dir, demo_masks, tmp_path, flag, value):
    output = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "generate", "--model", saved_pipeline_dir, "--mask-dataset", demo_masks, "--output", output, flag, value
    )
    assert code == 2 and flag in err
    assert not output.exists()


@pytest.mark.parametrize("value", [0, 2.5, True, "2"])
def test_generate_dataset_checks_its_numbers(saved_pipeline_dir, demo_masks, tmp_path, value):
    with pytest.raises(ValueError, match="num_images_per_mask is"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), tmp_path / "o", num_images_per_mask=value)
    assert not (tmp_path / "o").exists()


def test_a_wrong_model_on_the_command_line_is_one_line_not_a_traceback(capsys, demo_masks, tmp_path):
    checkpoint = tmp_path / "checkpoint-8"
    (checkpoint / "unet").mkdir(parents=True)
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--mask-dataset", demo_masks, "--output", tmp_path / "out"
    )
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err and "Error no file" not in err


# convert-official -----------------------------------------------------------------------------------------------


def test_convert_official_refuses_a_non_empty_output(tmp_path, tiny_pipeline):
    from polyp_diffusers.convert_official import write_converted_pipeline

    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    description = {
        "source": str(tmp_path / "model.pt"),
        "weights": "ema",
        "step": 1,
        "config": {},
        "mask_channels": 1,
        "num_train_timesteps": 250,
    }
    with pytest.raises(FileExistsError, match="is not empty"):
        write_converted_pipeline(tiny_pipeline, description, output)
    assert (output / "notes.txt").read_text() == "keep me"


def test_a_write_killed_between_its_two_moves_loses_nothing(saved_pipeline_dir, demo_masks, tmp_path):
    """The previous output was moved aside and the new one not yet moved in: the next run puts the old one back."""
    output = tmp_path / "synthetic"
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
    before = load_from_disk(str(output))["test"]["id"]
    output.rename(tmp_path / ".synthetic.previous")
    (tmp_path / ".synthetic.partial-999999999").mkdir()  # the staging folder of a process that no longer runs
    again = generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)  # nothing to redo
    assert load_from_disk(str(output))["test"]["id"] == again["test"]["id"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".synthetic.lock", "synthetic"]  # and the claim's lock


def test_a_staging_folder_of_a_running_writer_is_left_alone(tmp_path):
    """Two writers to one output each stage their own copy; neither deletes the other's."""
    running = tmp_path / f".out.partial-{os.getppid()}"
    running.mkdir()
    staging = staging_folder(tmp_path / "out")
    assert running.is_dir() and staging != running and staging.name == f".out.partial-{os.getpid()}"


def test_a_damaged_run_record_is_named_and_can_be_discarded(saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "synthetic"
    (output / PARTS_DIR).mkdir(parents=True)
    (output / PARTS_DIR / SETTINGS_FILE).write_text('{"model": "tru')  # damaged after its first batch
    (output / PARTS_DIR / "part-000000-000004.parquet").write_bytes(b"pairs of unknown settings")
    with pytest.raises(ValueError, match=f"{SETTINGS_FILE} is missing or damaged.*--overwrite"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, overwrite=True, **GENERATION)
    assert len(load_from_disk(str(output))["test"]) == 4


def test_generate_refuses_a_file_as_output_before_any_work(saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "synthetic"
    output.write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)
    with pytest.raises(FileExistsError, match=f"lies under {output}, which is a file; expected folders"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output / "pairs", **GENERATION)


def test_masks_without_an_id_column_get_ids_from_their_split(saved_pipeline_dir, demo_masks, tmp_path):
    masks = tmp_path / "masks"
    load_from_disk(str(demo_masks)).remove_columns("id").save_to_disk(str(masks))
    generate_dataset(str(saved_pipeline_dir), str(masks), tmp_path / "out", **GENERATION)
    assert load_from_disk(str(tmp_path / "out"))["test"]["source_id"] == [f"test-{i:05d}" for i in range(4)]


def test_a_split_of_a_dataset_without_splits_is_refused(demo_masks, tmp_path):
    single = tmp_path / "single"
    load_from_disk(str(demo_masks))["test"].save_to_disk(str(single))
    with pytest.raises(ValueError, match="single dataset without splits"):
        load_polyp_dataset(str(single), split="train")


def test_a_model_with_only_pickled_weights_is_refused_with_the_way_out(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError, match="only pickled .bin weights.*use_safetensors=False"):
        load_pipeline(str(tmp_path / "pickled"))


def _without_conv_in_weight(weights: dict) -> None:
    del weights["conv_in.weight"]


def _with_nan_in_conv_in_weight(weights: dict) -> None:
    weights["conv_in.weight"][0] = float("nan")


def _damaged_model(pipeline, tmp_path, damage):
    model = tmp_path / "damaged"
    pipeline.save_pretrained(model)
    weights_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    damage(weights)
    save_file(weights, weights_file)
    return model


@pytest.mark.parametrize(
    ("damage", "expected"),
    [(_without_conv_in_weight, "lacks 1 weight tensors"), (_with_nan_in_conv_in_weight, "NaN or inf in 1 weight")],
)
def test_a_model_with_missing_or_non_finite_weights_is_refused_by_name_before_any_work(
    capsys, tiny_pipeline, demo_masks, tmp_path, damage, expected
):
    model = _damaged_model(tiny_pipeline, tmp_path, damage)
    output = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "generate", "--model", model, "--mask-dataset", demo_masks, "--split", "test", "--output", output
    )
    error = err.splitlines()[-1]  # after the loading progress bar
    assert code == 1 and error.startswith(f"error: {model} ") and expected in error and "conv_in.weight" in error
    assert "Traceback" not in err and not output.exists()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [(_without_conv_in_weight, "lacks 1 weight tensors"), (_with_nan_in_conv_in_weight, "NaN or inf in 1 weight")],
)
def test_from_pretrained_refuses_missing_or_non_finite_weights_in_python_too(tiny_pipeline, tmp_path, damage, expected):
    model = _damaged_model(tiny_pipeline, tmp_path, damage)
    with pytest.raises(ValueError, match=f"{expected}.*conv_in.weight"):
        PolypDDPMPipeline.from_pretrained(model)


def test_from_pretrained_refuses_the_other_kind_of_model(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "images")
    with pytest.raises(ModelKindError, match="PolypMaskPipeline cannot run a model of images"):
        PolypMaskPipeline.from_pretrained(tmp_path / "images")


def test_results_go_into_a_card_edited_on_windows_with_a_renamed_section_and_code_in_it():
    rendered = "---\nlicense: mit\n---\n# Model\n\n## Results\n### FID\n| 9.5 |\n\n## Limitations\nResearch only.\n"
    edited = (
        "---\r\nlicense: cc-by-4.0\r\n---\r\n# Model\r\n\r\n## Results (FID)\r\nold\r\n```\r\n## a comment\r\n```\r\n"
        "\r\n## Intended use\r\nInternal.\r\n"
    )
    card = with_results_of(edited, rendered)
    assert card == (
        "---\r\nlicense: cc-by-4.0\r\n---\r\n# Model\r\n\r\n## Results\r\n### FID\r\n| 9.5 |\r\n\r\n"
        "## Intended use\r\nInternal.\r\n"
    )
    # No metadata and no Results section: the section is added at the end, and no empty metadata block.
    assert with_results_of("# Mine\n\nNotes.\n", rendered.replace("license: mit", "")) == (
        "# Mine\n\nNotes.\n\n## Results\n### FID\n| 9.5 |\n"
    )


def test_card_killed_while_writing_leaves_whole_files_and_names_a_damaged_context(
    capsys, tiny_pipeline, tmp_path, monkeypatch
):
    model = tmp_path / "model"
    tiny_pipeline.save_pretrained(model)
    results = tmp_path / "fid.json"
    results.write_text(json.dumps({"markdown": "| FID | 12.5 |", "eval_results": []}))
    assert polyp_ddpm(["card", str(model), "--results", str(results)]) == 0
    card = (model / "README.md").read_text()

    def killed_at_the_card(path, text):
        if Path(path).name == "README.md":
            raise OSError("killed")
        write_text_atomically(path, text)

    results.write_text(json.dumps({"markdown": "| FID | 9.5 |", "eval_results": []}))
    with monkeypatch.context() as patch:
        patch.setattr(commands_module, "write_text_atomically", killed_at_the_card)
        assert polyp_ddpm(["card", str(model), "--results", str(results)]) == 1
    assert (model / "README.md").read_text() == card  # the old card, whole; its inputs (card.json) are new and whole
    assert json.loads((model / "card.json").read_text())["results"]["markdown"] == "| FID | 9.5 |"
    assert polyp_ddpm(["card", str(model), "--results", str(results)]) == 0
    assert "| FID | 9.5 |" in (model / "README.md").read_text()
    capsys.readouterr()
    for damaged in ("", "[]", '{"repo_id": "x", "colour": "red"}'):
        (model / "card.json").write_text(damaged)
        assert polyp_ddpm(["card", str(model), "--results", str(results)]) == 1
        assert f"{model / 'card.json'}, the inputs of the card, is damaged" in capsys.readouterr().err


def _stopped_before_assembly(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, settings):
    """The pairs of an uninterrupted run, and the folder of the same run stopped with all its parts written."""
    expected = generate_dataset(str(saved_pipeline_dir), str(demo_masks), tmp_path / "whole", **settings)["test"]
    output = tmp_path / "synthetic"
    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "concatenate_datasets", lambda parts: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)
    return expected, output


def test_a_damaged_part_is_generated_again_by_the_same_command(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, caplog, capsys
):
    """A part truncated on disk (the run stopped before assembling): the rerun redoes its batch, same seeds, same images."""
    settings = dict(GENERATION, batch_size=2)
    expected, output = _stopped_before_assembly(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, settings)
    damaged = output / PARTS_DIR / "part-000000-000002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="polyp_diffusers.generate"):
        generated = generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)["test"]
    assert [message for message in caplog.messages if "damaged" in message] == [
        f"{damaged} is damaged (unreadable, or not its 2 pairs): its batch is generated again."
    ]
    # The damaged part is not counted as done.
    assert f"{len(expected) - 2} of {len(expected)} images are there already" in capsys.readouterr().out
    assert generated["id"] == expected["id"] and generated["image"] == expected["image"]


def test_files_put_into_a_generation_while_it_ran_or_was_stopped_are_never_deleted(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, capsys
):
    settings = dict(GENERATION, batch_size=2)
    expected, output = _stopped_before_assembly(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, settings)
    parts = sorted((output / PARTS_DIR).glob("part-*.parquet"))
    (output / "notes.md").write_text("mine")  # between the stop and the rerun
    with pytest.raises(FileExistsError, match="holds notes.md, which `polyp-ddpm generate` does not write"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)
    (output / "notes.md").unlink()
    assemble = generate_module._assemble

    def a_file_comes_while_it_runs(part_files):
        (output / ".env").write_text("mine")
        return assemble(part_files)

    monkeypatch.setattr(generate_module, "_assemble", a_file_comes_while_it_runs)
    with pytest.raises(FileExistsError, match="holds .env, which `polyp-ddpm generate` does not write"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)
    assert (output / ".env").read_text() == "mine"
    assert sorted((output / PARTS_DIR).glob("part-*.parquet")) == parts  # the work is kept: the rerun goes on
    (output / ".env").unlink()
    monkeypatch.setattr(generate_module, "_assemble", assemble)
    generated = generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)["test"]
    assert f"{len(expected)} of {len(expected)} images are there already" in capsys.readouterr().out
    assert generated["id"] == expected["id"] and generated["image"] == expected["image"]


def test_parts_that_cannot_be_assembled_for_want_of_a_writable_cache_are_all_kept(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch
):
    settings = dict(GENERATION, batch_size=2)
    expected, output = _stopped_before_assembly(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, settings)
    parts = sorted((output / PARTS_DIR).glob("part-*.parquet"))
    with monkeypatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "a-file" / "cache")  # as on a full disk
        (tmp_path / "a-file").write_text("")
        with pytest.raises(OSError, match="the generated parts could not be assembled"):
            generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)
    assert sorted((output / PARTS_DIR).glob("part-*.parquet")) == parts and len(parts) == 2
    generated = generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)["test"]
    assert generated["id"] == expected["id"] and generated["image"] == expected["image"]


def test_a_run_killed_while_recording_its_settings_is_started_again_but_parts_without_settings_are_kept(
    saved_pipeline_dir, demo_masks, tmp_path
):
    output = tmp_path / "synthetic"
    (output / PARTS_DIR).mkdir(parents=True)
    (output / PARTS_DIR / f"{SETTINGS_FILE}.partial").write_text('{"seed": ')  # killed mid-write, no part yet
    generated = generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **GENERATION)["test"]
    assert len(generated) == 4 and not (output / PARTS_DIR).exists()
    kept = tmp_path / "kept"
    (kept / PARTS_DIR).mkdir(parents=True)
    (kept / PARTS_DIR / "part-000000-000004.parquet").write_bytes(b"pairs of a run whose settings are lost")
    with pytest.raises(ValueError, match="holds an unfinished run whose .* is missing or damaged; pass --overwrite"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), kept, **GENERATION)
    assert (kept / PARTS_DIR / "part-000000-000004.parquet").exists()


def test_a_part_damaged_inside_a_whole_footer_is_set_aside_and_generated_again_by_the_rerun(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch
):
    settings = dict(GENERATION, batch_size=2)
    expected, output = _stopped_before_assembly(saved_pipeline_dir, demo_masks, tmp_path, monkeypatch, settings)
    damaged = output / PARTS_DIR / "part-000002-000004.parquet"
    content = bytearray(damaged.read_bytes())
    content[100 : len(content) // 2] = b"\xab" * (len(content) // 2 - 100)  # its pairs, not its footer
    damaged.write_bytes(content)
    with pytest.raises(ValueError, match=f"could not be read, damaged on disk \\({damaged}\\), and were set aside"):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)
    assert damaged.with_suffix(".damaged").exists() and (output / PARTS_DIR / "part-000000-000002.parquet").exists()
    generated = generate_dataset(str(saved_pipeline_dir), str(demo_masks), output, **settings)["test"]
    assert generated["id"] == expected["id"] and generated["image"] == expected["image"]


def test_prepare_data_overwrite_replaces_only_a_prepared_dataset(pair_folder, tmp_path):
    model = tmp_path / "runs" / "polyp-ddpm"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="was not written by `polyp-ddpm prepare-data`"):
        prepare_dataset(str(pair_folder), model, test_size=1, overwrite=True)
    assert (model / "model_index.json").read_text() == "{}"
    prepare_dataset(str(pair_folder), tmp_path / "data", test_size=1)
    prepare_dataset(str(pair_folder), tmp_path / "data", test_size=2, overwrite=True)
    assert len(load_from_disk(str(tmp_path / "data"))["test"]) == 2


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (dict(resolution=0), "resolution is 0"),
        (dict(resolution=2.5), "resolution is 2.5"),
        (dict(test_size=1.5), "test size is 1.5"),
        (dict(test_size=float("nan")), "test size is nan"),
        (dict(demo_pairs=0), "demo_pairs is 0"),
    ],
)
def test_prepare_dataset_checks_its_numbers_before_any_work(tmp_path, arguments, expected):
    with pytest.raises(ValueError, match=expected):
        prepare_dataset("demo", tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_exif_rotated_images_of_a_saved_dataset_turn_their_masks_too(tmp_path):
    """A `save_to_disk` source holds the files as bytes; `datasets` would turn the image on decode, not the mask."""
    image, mask = polyp_pair(width=48, height=32)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    image_bytes, mask_bytes = io.BytesIO(), io.BytesIO()
    image.save(image_bytes, format="JPEG", exif=exif)
    mask.save(mask_bytes, format="PNG")
    cells = {"image": [{"bytes": image_bytes.getvalue(), "path": None}] * 2,
             "mask": [{"bytes": mask_bytes.getvalue(), "path": None}] * 2, "id": ["a", "b"]}  # fmt: skip
    features = Features({"image": ImageFeature(), "mask": ImageFeature(), "id": Value("string")})
    Dataset.from_dict(cells, features=features).save_to_disk(str(tmp_path / "saved"))
    dataset, problems, _ = build_dataset(str(tmp_path / "saved"), test_size=1)
    row = dataset["train"][0]
    assert problems == [] and row["image"].size == row["mask"].size == (32, 48)
    np.testing.assert_array_equal(np.asarray(row["mask"]) > 127, np.rot90(np.asarray(mask) > 127, k=-1))


def test_ctrl_c_is_one_line_and_exit_code_130_not_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands_module, "prepare_dataset", interrupted)  # as if Ctrl-C came while it worked
    assert polyp_ddpm(["prepare-data", "demo", "--output", str(tmp_path / "demo")]) == 130
    error = capsys.readouterr().err
    assert error.startswith("polyp-ddpm: interrupted.") and len(error.strip().splitlines()) == 1
    monkeypatch.setenv("POLYP_DDPM_TRACEBACK", "1")  # for a bug report: the traceback
    with pytest.raises(KeyboardInterrupt):
        polyp_ddpm(["prepare-data", "demo", "--output", str(tmp_path / "demo")])


def test_a_failed_upload_is_one_error_that_says_the_files_are_saved_and_how_to_upload_them(tmp_path):
    # Offline here (no network, or HF_HUB_OFFLINE): the Hub cannot be reached, and that is the failure tested.
    with pytest.raises(
        UploadError, match=f"the files are saved locally: upload them with `hf upload me/x {tmp_path} .`"
    ):
        push_folder(tmp_path, "me/x")
    # The command pastes as it is: a folder with a space is quoted (before, `hf upload` took `my run` as two).
    with pytest.raises(UploadError) as error:
        push_folder(tmp_path / "my run", "me/x", ignore_patterns=["checkpoint-*"])
    assert f"`hf upload me/x '{tmp_path}/my run' . --exclude 'checkpoint-*'`" in str(error.value)
    with pytest.raises(UploadError) as error:
        push_dataset(DatasetDict(), "card", "me/x", tmp_path / "my set")
    assert f"`datasets.load_from_disk('{tmp_path}/my set').push_to_hub('me/x')`" in str(error.value)


def test_a_pushed_card_names_the_repo_the_hub_created_for_a_bare_name(tmp_path, monkeypatch):
    # The Hub puts a repo created as `run` (the default id, the folder's name) under the user's name: its card's
    # code must load `me/run`. The Hub cannot be reached here: its two calls are replaced by their effect.
    pipeline = PolypDDPMPipeline(
        unet=make_polyp_unet_from_preset("tiny", image_size=32), scheduler=make_polyp_scheduler()
    )
    folder = tmp_path / "run"
    pipeline.save_pretrained(folder)
    results = {"markdown": "### Image realism\n| FID |\n| 41.5 |", "eval_results": []}
    # As train.py writes it: a tuple among the settings (which card.json keeps as a list).
    training_config = {"max_train_steps": 16, "augment_zoom": (1.0, 1.0)}
    write_model_card(pipeline, folder, repo_id="run", training_config=training_config, results=results)
    uploaded = {}
    monkeypatch.setattr(publish_module, "create_repo", lambda repo_id, **_: SimpleNamespace(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(publish_module, "upload_folder", lambda folder_path, **_: uploaded.update(
        card=(Path(folder_path) / "README.md").read_text()))  # fmt: skip
    assert push_folder(folder, "run", name_repo=card_naming(pipeline, folder)) == "me/run"
    assert 'PolypDDPMPipeline.from_pretrained("me/run")' in uploaded["card"] and '"run"' not in uploaded["card"]
    assert "| 41.5 |" in uploaded["card"] and "| `max_train_steps` | 16 |" in uploaded["card"]  # all else kept
    assert json.loads((folder / "card.json").read_text())["repo_id"] == "me/run"
    # A card edited by hand is uploaded as it is: naming the repo would render it anew, without the edits.
    edited = (folder / "README.md").read_text() + "\n## Intended use\nInternal research only.\n"
    (folder / "README.md").write_text(edited)
    assert push_folder(folder, "other", name_repo=card_naming(pipeline, folder)) == "me/other"
    assert uploaded["card"] == edited


def test_a_repo_id_the_hub_would_refuse_is_refused_before_any_work(tmp_path, capsys):
    assert hub_repo_id("me/polyp-ddpm", tmp_path / "gen ü", "--hub-id") == "me/polyp-ddpm"
    assert hub_repo_id(None, tmp_path / "polyp-ddpm", "--hub-id") == "polyp-ddpm"
    with pytest.raises(ValueError, match="'gen ü' \\(by default the output folder's name\\) cannot be a Hub"):
        hub_repo_id(None, tmp_path / "gen ü", "--hub-id")
    # As the commands call it: before any sampling (or training, or preparing), naming the flag to set.
    output = tmp_path / "gen ü"
    assert polyp_ddpm(["generate", "--model", "never-loaded", "--mask-dataset", "demo", "--output", str(output),
                       "--push-to-hub", "--hub-id", "bad id"]) == 1  # fmt: skip
    error = capsys.readouterr().err
    assert "'bad id' cannot be a Hub repo id: Repo id must use alphanumeric" in error
    assert "Name one with --hub-id USER/NAME." in error
    assert not output.exists()
