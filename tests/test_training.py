"""training/train.py launched with `accelerate launch` on the demo data, with a tiny model, on the CPU."""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from polyp_diffusers import PolypDDPMPipeline, PolypMaskPipeline, make_polyp_unet_from_preset
from polyp_diffusers.arguments import Stopped, exit_code_of, load_training_script
from polyp_diffusers.folders import OutputClaim
from polyp_diffusers.generate import load_pipeline
from polyp_diffusers.prepare_data import prepare_dataset
from polyp_diffusers.training_utils import (
    StopRequest,
    checkpoint_step,
    list_checkpoints,
    non_finite_weights,
    partial_path,
    previous_checkpoint,
    publish_checkpoint,
    resolve_checkpoint,
    step_generators,
    training_seconds,
    unexpected_entries,
    write_training_seconds,
)
from polyp_diffusers.transforms import LEVEL_VALUES, shuffled_batches, tensor_batches

from .conftest import REPO_ROOT

TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
STEPS = 16
TINY_RUN = [
    "--model_preset",
    "tiny",
    "--resolution",
    "32",
    "--train_batch_size",
    "8",
    "--learning_rate",
    "1e-3",
    "--max_train_steps",
    str(STEPS),
    "--checkpointing_steps",
    "4",
    "--checkpoints_total_limit",
    "2",
    "--validation_steps",
    str(STEPS),
    "--num_validation_masks",
    "2",
    "--validation_inference_steps",
    "2",
    "--dataloader_num_workers",
    "0",
    "--seed",
    "0",
]


def launch_command(*args):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(TRAIN_SCRIPT),
        *args,
    ]


def run_script(command: list[str]) -> subprocess.CompletedProcess:
    """
    A training command run to its end: `launch_command`'s, or else train.py run directly, on the CPU as `accelerate
    launch --cpu` runs its one process (without the launcher's 2-3 s of start-up).
    """
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)


def launch(*args, through_accelerate: bool = False):
    command = launch_command(*args) if through_accelerate else [sys.executable, str(TRAIN_SCRIPT), *args]
    result = run_script(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def launch_expecting_failure(*args):
    """The output of a run that must stop with an error."""
    result = run_script([sys.executable, str(TRAIN_SCRIPT), *args])
    assert result.returncode != 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "demo"
    prepare_dataset("demo", path, test_size=8, resolution=32, demo_pairs=48)
    return path


@pytest.fixture(scope="module")
def finished_run(demo_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    launch("--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN)
    return output


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def copy_checkpoints(run, output):
    """A new output folder holding only the checkpoints of `run`, to be damaged and resumed from."""
    for checkpoint in list_checkpoints(run):
        shutil.copytree(checkpoint, output / checkpoint.name)


def test_the_mean_loss_is_logged_at_each_checkpoint_and_decreases(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished_run / "logs" / "polyp-ddpm"))
    events.Reload()
    # Logged every --logging_steps (20) and at each checkpoint (every 4 steps): the loop's only waits for the device.
    logged = events.Scalars("loss")
    assert [event.step for event in logged] == [4, 8, 12, 16]
    assert logged[-1].value < 0.8 * logged[0].value
    assert all(event.value > 0 for event in events.Scalars("images_per_s"))


def test_the_logged_loss_is_the_mean_of_every_micro_batch_and_a_non_finite_one_stops_the_run():
    from accelerate import Accelerator

    train = load_training_script("train")
    window, accelerator = train.LogWindow(torch.device("cpu")), Accelerator(cpu=True)
    for loss, stepped in [(1.0, False), (3.0, True), (2.0, False), (6.0, True)]:  # 2 steps of 2 accumulated
        window.add(torch.tensor(loss), images=4, stepped=stepped)
    loss, images_per_second = window.read(accelerator, global_step=2)
    assert loss == 3.0 and images_per_second > 0
    for loss, stepped in [(float("nan"), False), (1.0, True)]:
        window.add(torch.tensor(loss), images=4, stepped=stepped)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3 \(mean of steps 3 to 3\)"):
        window.read(accelerator, global_step=3)


def test_checkpoints_are_written_and_pruned(finished_run):
    checkpoints = list_checkpoints(finished_run)
    assert [path.name for path in checkpoints] == ["checkpoint-12", "checkpoint-16"]
    for checkpoint in checkpoints:
        assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").exists()
        assert (checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors").exists()
        assert (checkpoint / "optimizer.bin").exists()
    assert not list(finished_run.glob("*.partial"))


def test_validation_grid_rows_are_masks_generated_and_real(finished_run):
    grid = np.asarray(PIL.Image.open(finished_run / "validation" / f"step-{STEPS:07d}.png"))
    assert grid.shape == (3 * 32, 2 * 32, 3)  # 3 rows of the 2 validation masks at 32 px
    assert set(np.unique(grid[:32])) == {0, 255}  # the masks: black and white only
    assert len(np.unique(grid[32:64])) > 2 and len(np.unique(grid[64:])) > 2


def test_saved_pipeline_loads_generates_and_has_a_card(finished_run):
    pipe = PolypDDPMPipeline.from_pretrained(finished_run)
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    images = pipe(mask, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    card = (finished_run / "README.md").read_text()
    assert "library_name: diffusers" in card and "| `max_train_steps` | 16 |" in card
    assert "pip install polyp-diffusers" not in card  # not on PyPI: a name anyone could take there
    config = json.loads((finished_run / "training_config.json").read_text())
    assert config["trained_steps"] == STEPS
    # The data's resolved path, for the segmenters' leakage check from any folder; not on the public card.
    assert Path(config["dataset_path"]).is_absolute() and "dataset_path" not in card
    # The training images' mean colour, for sampling with start_timestep.
    start_color = pipe.config.start_color
    assert len(start_color) == 3 and all(0 < value < 1 for value in start_color)
    assert pipe.config.start_timestep is None  # the whole chain unless asked otherwise
    # The saved weights are the EMA weights of the last checkpoint.
    ema = load_file(str(finished_run / "checkpoint-16" / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    for name, tensor in unet_weights(finished_run).items():
        assert torch.equal(tensor, ema[name]), name


def test_a_killed_run_resumes_and_ends_where_the_uninterrupted_run_ends(demo_dataset, finished_run, tmp_path):
    # Killed and resumed through `accelerate launch`, as the README runs it; the uninterrupted run ran train.py
    # directly, so equal weights also show that both ways run the same training.
    output = tmp_path / "killed"
    process = subprocess.Popen(
        launch_command("--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (output / "checkpoint-8").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (output / "checkpoint-8").exists()
    assert not (output / "model_index.json").exists(), "the run finished before it could be killed"
    # What a kill during a checkpoint write leaves behind must not be taken for a checkpoint.
    partial_path(output, 20).mkdir()

    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest",
        through_accelerate=True,
    )  # fmt: skip
    assert "Resuming from" in result.stderr + result.stdout
    assert list_checkpoints(output)[-1].name == f"checkpoint-{STEPS}"
    assert not partial_path(output, 20).exists()
    resumed, uninterrupted = unet_weights(output), unet_weights(finished_run)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0, msg=name)


def test_a_stop_request_takes_a_signal_once_and_a_later_one_as_a_stop_at_once():
    with StopRequest(force_after=0.2) as request:
        assert request.signum is None
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # at once: the same request, passed on by a launcher
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert request.signum == signal.SIGINT
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_is_one_line_with_the_exit_status_a_shell_gives_a_signal(capsys):
    assert exit_code_of(lambda: (_ for _ in ()).throw(KeyboardInterrupt), interrupted="interrupted here") == 130
    assert exit_code_of(lambda: (_ for _ in ()).throw(Stopped("stopped, saved", signal.SIGTERM))) == 143
    assert exit_code_of(lambda: (_ for _ in ()).throw(Stopped("", signal.SIGTERM))) == 143
    assert capsys.readouterr().err == "interrupted here\nstopped, saved\n"


def test_running_out_of_memory_is_one_line_that_says_what_to_lower(capsys):
    assert exit_code_of(lambda: (_ for _ in ()).throw(MemoryError("Unable to allocate 149. GiB"))) == 1
    assert exit_code_of(lambda: (_ for _ in ()).throw(MemoryError())) == 1
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nOf the allocated memory ...")
    assert exit_code_of(lambda: (_ for _ in ()).throw(gpu)) == 1  # a RuntimeError, not among train.py's errors
    assert capsys.readouterr().err == (
        "error: out of memory (Unable to allocate 149. GiB): use a smaller resolution or batch\n"
        "error: out of memory (no details): use a smaller resolution or batch\n"
        "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.): use a smaller resolution or batch\n"
    )


def test_a_run_told_to_stop_saves_a_checkpoint_at_its_next_step_and_resumes_exactly(demo_dataset, tmp_path):
    # Ctrl-C, which a terminal sends to every process of the run, DataLoader workers included.
    streamed = [*TINY_RUN, "--max_preload_gb", "0", "--dataloader_num_workers", "2"]
    uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    result = launch("--dataset", str(demo_dataset), "--output_dir", str(uninterrupted), *streamed)
    assert "(streamed)" in result.stdout + result.stderr
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), "--dataset", str(demo_dataset), "--output_dir", str(stopped), *streamed],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )
    deadline = time.monotonic() + 300
    while not (stopped / "checkpoint-4").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[0][-3000:]
    os.killpg(process.pid, signal.SIGINT)
    process.send_signal(signal.SIGTERM)  # at once, as a launcher passes a signal on: the same request
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGINT, log[-3000:]
    assert not (stopped / "model_index.json").exists(), "the run finished before it could be stopped"
    stopped_at = list_checkpoints(stopped)[-1]
    assert 4 < checkpoint_step(stopped_at) < STEPS
    assert f"Stopped by SIGINT at step {checkpoint_step(stopped_at)}, saved as {stopped_at}." in log
    assert "Traceback" not in log

    launch(
        "--dataset", str(demo_dataset), "--output_dir", str(stopped), *streamed, "--resume_from_checkpoint", "latest"
    )
    resumed, reference = unet_weights(stopped), unet_weights(uninterrupted)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], atol=1e-6, rtol=0, msg=name)


# train.py with its move of the scheduler into place failing, as a kill there would stop it.
STOPPED_WHILE_SAVING = """
import os, runpy, sys
replace = os.replace
def stopped_at_the_scheduler(source, target, *args, **kwargs):
    if os.path.basename(target) == "scheduler":
        raise OSError("stopped while saving the pipeline")
    return replace(source, target, *args, **kwargs)
os.replace = stopped_at_the_scheduler
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_stopped_while_saving_its_pipeline_is_no_pipeline_until_resumed(finished_run, demo_dataset, tmp_path):
    run = tmp_path / "stopped-while-saving"
    shutil.copytree(finished_run, run)
    (run / "training_config.json").unlink()  # not the pipeline of its last step: the resumed run saves it again
    resume = ("--dataset", str(demo_dataset), "--output_dir", str(run), *TINY_RUN, "--resume_from_checkpoint", "latest")
    stopped = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_SAVING, str(TRAIN_SCRIPT), *resume], capture_output=True, text=True
    )
    assert stopped.returncode == 1 and "stopped while saving the pipeline" in stopped.stderr
    assert not (run / "model_index.json").exists() and not (run / "scheduler").exists()
    with pytest.raises(ValueError, match="a training run without a whole saved pipeline.*--resume_from_checkpoint"):
        load_pipeline(str(run))
    launch(*resume)
    assert PolypDDPMPipeline.from_pretrained(run).scheduler.config.num_train_timesteps == 250
    resumed, uninterrupted = unet_weights(run), unet_weights(finished_run)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in uninterrupted.items())


def test_a_finished_run_resumed_keeps_its_pipeline_and_the_results_added_to_its_card(
    finished_run, demo_dataset, tmp_path
):
    run = tmp_path / "finished"
    shutil.copytree(finished_run, run)
    card = (run / "README.md").read_text() + "\n## Downstream\nIoU 0.62 (added by polyp-ddpm card)\n"
    (run / "README.md").write_text(card)
    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(run), *TINY_RUN, "--resume_from_checkpoint", "latest"
    )
    assert f"The pipeline of step {STEPS} is in {run} already: kept" in result.stdout + result.stderr
    assert (run / "README.md").read_text() == card


def test_a_time_budget_stops_at_a_logging_step_with_a_checkpoint_and_the_pipeline(demo_dataset, tmp_path):
    output = tmp_path / "budget"
    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN,
        "--max_train_minutes", "0.0001", "--logging_steps", "3", "--validation_steps", "100",
    )  # fmt: skip
    assert "Stopped at step 3: --max_train_minutes 0.0001 passed." in result.stdout + result.stderr
    assert list_checkpoints(output)[-1].name == "checkpoint-3"
    assert json.loads((output / "training_config.json").read_text())["trained_steps"] == 3
    assert (output / "validation" / "step-0000003.png").is_file()
    assert training_seconds(output / "checkpoint-3") > 0.0001 * 60
    # The budget spans resumes: the same command again has nothing left to train.
    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN,
        "--max_train_minutes", "0.0001", "--logging_steps", "3", "--validation_steps", "100",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "budget was spent by" in result.stdout + result.stderr
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-3"]
    assert json.loads((output / "training_config.json").read_text())["trained_steps"] == 3
    # With a little of a one-minute budget left at the checkpoint, a resume trains one logging window, not the
    # minute again (counted per launch, this run would go on to its 9 steps).
    write_training_seconds(output / "checkpoint-3", 59.99)
    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--max_train_steps", "9",
        "--max_train_minutes", "1", "--logging_steps", "3", "--validation_steps", "100",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "Stopped at step 6: --max_train_minutes 1.0 passed." in result.stdout + result.stderr
    assert training_seconds(output / "checkpoint-6") > 60


def test_a_mask_model_trains_and_saves_a_mask_pipeline(demo_dataset, tmp_path):
    output = tmp_path / "mask-model"
    launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--mask_model", "--max_train_steps", "4"
    )
    pipe = PolypMaskPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (1, 1)
    assert json.loads((output / "model_index.json").read_text())["_class_name"] == "PolypMaskPipeline"
    masks = pipe(num_masks=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").masks
    assert masks.shape == (2, 32, 32, 1) and set(np.unique(masks).tolist()) <= {0.0, 1.0}
    grid = PIL.Image.open(output / "validation" / "step-0000004.png")
    assert grid.size == (2 * 32, 2 * 32)  # rows: generated masks, real masks
    card = (output / "README.md").read_text()
    assert "pipeline_tag: unconditional-image-generation" in card and "PolypMaskPipeline.from_pretrained" in card


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_no_pipeline(demo_dataset, tmp_path):
    output = tmp_path / "diverging"
    log = launch_expecting_failure(
        "--dataset",
        str(demo_dataset),
        "--output_dir",
        str(output),
        *TINY_RUN,
        "--learning_rate",
        "1e30",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "1",
    )
    assert "error: the loss is nan at step" in log or "error: the loss is inf at step" in log
    assert "Traceback" not in log
    assert not (output / "model_index.json").exists()
    for checkpoint in list_checkpoints(output):
        assert all(torch.isfinite(tensor).all() for tensor in unet_weights(checkpoint).values()), checkpoint


def test_a_checkpoint_with_nan_weights_is_refused_by_name_and_nothing_is_saved(
    demo_dataset, finished_run, tmp_path, capsys
):
    output = tmp_path / "nan"
    copy_checkpoints(finished_run, output)
    weights = unet_weights(output / "checkpoint-16")
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(output / "checkpoint-16" / "unet" / "diffusion_pytorch_model.safetensors"))

    log = refusal(
        capsys,
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert f"checkpoint {output / 'checkpoint-16'} has NaN or inf in 1 weight tensors (first: {name})" in log
    assert f"move checkpoint-16 out of {output} and resume from latest, which is then {output / 'checkpoint-12'}" in log
    assert not (output / "model_index.json").exists()


def truncate_unet_weights(checkpoint):
    weights = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def test_latest_falls_back_from_an_unreadable_checkpoint_to_the_one_before(demo_dataset, finished_run, tmp_path):
    output = tmp_path / "truncated"
    copy_checkpoints(finished_run, output)
    truncate_unet_weights(output / "checkpoint-16")

    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest"
    )
    log = " ".join((result.stdout + result.stderr).split())
    assert f"checkpoint {output / 'checkpoint-16'} cannot be read (OSError" in log
    assert f"falling back to {output / 'checkpoint-12'}" in log
    assert "are not expected and will be ignored" not in log  # the EMA's config, read as a damaged UNet config
    resumed, uninterrupted = unet_weights(output), unet_weights(finished_run)  # 12 + 4 steps, as uninterrupted
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0, msg=name)


def test_the_checkpoint_latest_falls_back_to_is_held_to_the_run_settings_too(
    demo_dataset, finished_run, tmp_path, capsys
):
    output = tmp_path / "truncated"
    copy_checkpoints(finished_run, output)
    truncate_unet_weights(output / "checkpoint-16")
    settings_file = output / "checkpoint-12" / "training_settings.json"
    settings_file.write_text(settings_file.read_text().replace('"loss": "l1"', '"loss": "l2"'))

    line = refusal(
        capsys,
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert f"{output / 'checkpoint-12'} was trained with other settings: --loss 'l2' there, 'l1' now" in line


def test_an_unreadable_checkpoint_named_explicitly_is_an_error_that_suggests_the_one_before(
    demo_dataset, finished_run, tmp_path, capsys
):
    output = tmp_path / "truncated"
    copy_checkpoints(finished_run, output)
    truncate_unet_weights(output / "checkpoint-16")
    log = refusal(
        capsys,
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN,
        "--resume_from_checkpoint", str(output / "checkpoint-16"),
    )  # fmt: skip
    assert f"checkpoint {output / 'checkpoint-16'} cannot be read" in log
    assert f"move checkpoint-16 out of {output} and resume from latest, which is then {output / 'checkpoint-12'}" in log
    assert not (output / "model_index.json").exists()


def test_help_lists_every_knob_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_status:
        load_training_script("train").parse_args(["--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for expected in (
        "--resume_from_checkpoint",
        "--mixed_precision",
        "--push_to_hub",
        "--recipe",
        "(default: 100000)",
        "(default: 32)",
        "(default: 250)",
        "(default: l1)",
    ):
        assert expected in text, expected
    assert "(default: True)" not in text and "(default: False)" not in text  # flags say what they do instead


# Helpers -----------------------------------------------------------------------------------------------------


def test_only_complete_checkpoints_count_as_latest(tmp_path):
    for name in ("checkpoint-5", "checkpoint-30", "checkpoint-7", "checkpoint-40.partial", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-7", "checkpoint-30"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-30"
    assert resolve_checkpoint("latest", tmp_path / "empty") is None
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "other"), tmp_path)
    assert resolve_checkpoint("checkpoint-7", tmp_path) == tmp_path / "checkpoint-7"  # a bare name: in output_dir


def test_a_new_run_may_only_write_where_a_run_stopped_before_its_first_checkpoint(tmp_path):
    for name in ("logs", "validation", "checkpoint-4.partial", ".pipeline.partial", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
    (tmp_path / ".DS_Store").write_text("a file browser's")
    assert unexpected_entries(tmp_path, "logs") == [] and unexpected_entries(tmp_path / "missing", "logs") == []
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert unexpected_entries(tmp_path, "logs") == ["checkpoint-8", "notes.txt"]


def test_the_previous_checkpoint_is_the_newest_from_an_earlier_step(tmp_path):
    for name in ("checkpoint-5", "checkpoint-30", "checkpoint-7", "checkpoint-20.partial"):
        (tmp_path / name).mkdir()
    assert previous_checkpoint(tmp_path / "checkpoint-30").name == "checkpoint-7"
    assert previous_checkpoint(tmp_path / "checkpoint-7").name == "checkpoint-5"
    assert previous_checkpoint(tmp_path / "checkpoint-5") is None


def test_non_finite_weights_are_named_in_the_model_and_in_its_ema():
    unet = make_polyp_unet_from_preset("tiny")
    ema = EMAModel(unet.parameters())
    assert non_finite_weights(unet, ema.shadow_params) == []
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    ema.shadow_params[-1][0] = math.inf
    last = [name for name, _ in unet.named_parameters()][-1]
    assert non_finite_weights(unet, ema.shadow_params) == ["conv_in.weight", f"ema.{last}"]
    assert non_finite_weights(unet) == ["conv_in.weight"]


def test_publishing_a_checkpoint_keeps_the_newest_within_the_limit(tmp_path):
    for step in (10, 20, 30):
        partial_path(tmp_path, step).mkdir()
        (partial_path(tmp_path, step) / "state").write_text(str(step))
        publish_checkpoint(tmp_path, step, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    assert (tmp_path / "checkpoint-30" / "state").read_text() == "30"


def test_step_generators_depend_only_on_seed_step_and_process():
    def draws(seed, step, process):
        augment, noise = step_generators(seed, step, process, "cpu")
        return torch.rand(4, generator=augment), torch.rand(4, generator=noise)

    first = draws(0, 5, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0, 5, 0)))
    assert not torch.equal(first[0], first[1])
    for other in (draws(1, 5, 0), draws(0, 6, 0), draws(0, 5, 1)):
        assert not torch.equal(first[1], other[1])


def test_a_process_knows_how_long_it_has_run_to_a_tenth_of_a_second():
    # What train_segmentation.py reports as its start-up: counted from the process's start, not from the script's.
    code = (
        "import time; time.sleep(1.5); "
        "from polyp_diffusers.training_utils import seconds_since_process_start as age; print(age())"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    assert 1.5 <= float(result.stdout) <= wall + 0.1


def test_shuffled_batches_are_whole_disjoint_shards_that_depend_only_on_seed_and_epoch():
    shards = [shuffled_batches(50, 4, seed=3, epoch=1, process_index=rank, num_processes=2) for rank in (0, 1)]
    assert [shard.shape for shard in shards] == [(6, 4), (6, 4)]  # 12 whole batches of 50 pairs, 6 each
    drawn = torch.cat([shard.flatten() for shard in shards])
    assert len(set(drawn.tolist())) == 48
    assert torch.equal(shards[0], shuffled_batches(50, 4, seed=3, epoch=1, process_index=0, num_processes=2))
    assert not torch.equal(shards[0], shuffled_batches(50, 4, seed=3, epoch=2, process_index=0, num_processes=2))
    with pytest.raises(ValueError, match="fewer than one batch"):
        shuffled_batches(3, 4, seed=0, epoch=0)


def test_tensor_batches_index_the_pairs_from_a_given_batch_on():
    levels = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    masks = torch.ones(6, 1, 2, 2, dtype=torch.uint8)
    batches = torch.tensor([[5, 0], [2, 3], [1, 4]])
    got = list(tensor_batches(levels, masks, batches, start=1))
    assert [batch["images"][:, 0, 0, 0].tolist() for batch in got] == [
        LEVEL_VALUES[[2, 3]].tolist(),
        LEVEL_VALUES[[1, 4]].tolist(),
    ]
    assert all(batch["images"].dtype == batch["masks"].dtype == torch.float32 for batch in got)


def test_an_output_folder_inside_the_dataset_holding_other_files_or_in_use_is_refused_untouched(
    demo_dataset, finished_run, tmp_path, capsys
):
    notes = tmp_path / "other" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    finished = {path: path.stat().st_mtime_ns for path in finished_run.rglob("*")}
    refusals = {
        demo_dataset / "run": "lies inside the dataset",
        notes.parent: "already holds notes.txt: train.py starts no new run over an earlier run's files or files",
        finished_run: "already holds README.md, card.json, checkpoint-12",  # finished: resume it, or write elsewhere
    }
    for output, reason in refusals.items():  # in this process: refused before accelerate starts
        assert reason in refusal(capsys, "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN)
    assert not (demo_dataset / "run").exists() and notes.read_text() == "mine"
    assert {path: path.stat().st_mtime_ns for path in finished_run.rglob("*")} == finished
    # A folder another run is writing, its checkpoint half written (which a new run would remove).
    running = partial_path(tmp_path / "running", 4)
    running.mkdir(parents=True)
    in_use = f"is being written by another running command (process {os.getpid()} on"
    command = [sys.executable, str(TRAIN_SCRIPT), "--dataset", str(demo_dataset), "--output_dir", str(running.parent)]
    command += [*TINY_RUN, "--resume_from_checkpoint", "latest"]
    with OutputClaim(running.parent):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert in_use in result.stderr.strip().splitlines()[-1]
        # On two processes (as a multi-GPU job runs), the refusal stops both, said once.
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
        result = subprocess.run([*torchrun, *command[1:]], capture_output=True, text=True, timeout=300, env=environment)
        assert result.returncode != 0 and "[rank1]:" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.count(in_use) == 1, result.stderr[-3000:]
    assert running.is_dir()


def test_a_missing_dataset_is_one_line_of_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert refusal(capsys, "--dataset", "data/kvasir-seg", "--output_dir", str(output)).startswith(
        "error: data/kvasir-seg is not a folder under"
    )
    assert not output.exists()
    monkeypatch.setenv("POLYP_DDPM_TRACEBACK", "1")  # for a bug report, the traceback behind the line
    with pytest.raises(FileNotFoundError, match="data/kvasir-seg is not a folder under"):
        exit_code_of(
            lambda: load_training_script("train").main(["--dataset", "data/kvasir-seg", "--output_dir", str(output)])
        )


def test_a_velocity_objective_with_zero_terminal_snr_and_min_snr_weighting_is_saved_with_the_pipeline(
    demo_dataset, tmp_path
):
    output = tmp_path / "v-prediction"
    short_run = [*TINY_RUN[: TINY_RUN.index("--max_train_steps")], "--max_train_steps", "2", "--checkpointing_steps",
                 "2", "--validation_steps", "2", "--num_validation_masks", "2", "--validation_inference_steps", "2",
                 "--dataloader_num_workers", "0"]  # fmt: skip
    launch("--dataset", str(demo_dataset), "--output_dir", str(output), *short_run, "--prediction_type",
           "v_prediction", "--zero_terminal_snr", "--loss", "l2", "--snr_gamma", "5")  # fmt: skip
    scheduler = PolypDDPMPipeline.from_pretrained(output).scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert json.loads((output / "training_config.json").read_text())["snr_gamma"] == 5


def test_min_snr_weighting_outside_what_it_was_derived_for_is_refused_before_any_work(capsys):
    refusals = {
        ("--loss", "l2", "--zero_terminal_snr"): "divides by the SNR, which --zero_terminal_snr makes 0",
        (): "use --snr_gamma with --loss l2",
    }
    for flags, reason in refusals.items():
        with pytest.raises(SystemExit):
            load_training_script("train").parse_args(
                ["--dataset", "d", "--output_dir", "o", "--snr_gamma", "5", *flags]
            )
        assert reason in capsys.readouterr().err


def refusal(capsys, *argv) -> str:
    """The one line of error with which train.py, run in this process, refuses `argv` before any work."""
    assert exit_code_of(lambda: load_training_script("train").main(list(argv))) == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_resume_that_would_write_over_checkpoints_or_files_is_refused_before_any_work(
    demo_dataset, finished_run, tmp_path, capsys
):
    output = tmp_path / "rewind"
    copy_checkpoints(finished_run, output)
    run = ["--dataset", str(demo_dataset), *TINY_RUN]
    line = refusal(capsys, *run, "--output_dir", str(output), "--resume_from_checkpoint", "checkpoint-12")
    assert f"{output} holds checkpoint-16, newer than checkpoint-12: resuming from it would write over them" in line
    line = refusal(
        capsys, *run, "--output_dir", str(output), "--max_train_steps", "8", "--resume_from_checkpoint", "latest"
    )
    assert f"{output / 'checkpoint-16'} is at step 16, past --max_train_steps 8" in line
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my thesis")
    checkpoint = str(finished_run / "checkpoint-12")
    line = refusal(capsys, *run, "--output_dir", str(notes), "--resume_from_checkpoint", checkpoint)
    assert f"already holds README.md: resuming {checkpoint} there would mix two runs" in line
    assert (notes / "README.md").read_text() == "my thesis" and list_checkpoints(output)[-1].name == "checkpoint-16"
    line = refusal(capsys, *run, "--output_dir", str(notes), "--resume_from_checkpoint", "latest")
    assert "holds no checkpoint to resume from" in line


def test_a_resumed_run_is_held_to_its_settings_and_may_take_a_new_learning_rate(
    demo_dataset, finished_run, tmp_path, capsys
):
    output = tmp_path / "resumed"
    copy_checkpoints(finished_run, output)
    shutil.rmtree(output / "checkpoint-16")
    run = ["--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest"]
    line = refusal(capsys, *run, "--loss", "l2", "--seed", "3", "--cudnn_benchmark")
    assert f"{output / 'checkpoint-12'} was trained with other settings: --loss 'l1' there, 'l2' now; --seed 0 " in line
    assert "cudnn" not in line  # how fast it runs may change
    assert "was trained with other settings: EMA on there, off now." in refusal(capsys, *run, "--no_ema")
    assert list_checkpoints(output) == [output / "checkpoint-12"]
    # A checkpoint older than its settings record takes a new rate too: the rate it holds is read from its state.
    (output / "checkpoint-12" / "training_settings.json").unlink()
    result = launch(*run, "--learning_rate", "2e-3")
    assert "The learning rate goes from 0.001 to 0.002 at step 12." in result.stdout + result.stderr
    optimizer = torch.load(output / "checkpoint-16" / "optimizer.bin", weights_only=True)
    assert optimizer["param_groups"][0]["initial_lr"] == 2e-3
    config = json.loads((output / "training_config.json").read_text())
    assert config["learning_rate"] == 2e-3
    assert config["learning_rate_changes"] == [{"step": 12, "from": 1e-3, "to": 2e-3}]


def test_a_validation_sampler_that_cannot_take_its_steps_or_a_checkpoint_past_the_end_is_refused_before_training(
    demo_dataset, finished_run, tmp_path, capsys
):
    output = tmp_path / "run"
    run = ["--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN]
    # Before: refused only at the first validation grid, after training steps that were then lost.
    line = refusal(capsys, *run, "--validation_sampler", "dpmsolver", "--validation_inference_steps", "249")
    assert "num_inference_steps is 249; DPMSolverMultistepScheduler finds only" in line and "use at most 248" in line
    assert list_checkpoints(output) == []
    # Resumed from another folder's checkpoint, a run past its --max_train_steps saved a pipeline whose card said 4.
    checkpoint = finished_run / "checkpoint-16"
    line = refusal(capsys, *run, "--resume_from_checkpoint", str(checkpoint), "--max_train_steps", "4")
    assert f"{checkpoint} is at step 16, past --max_train_steps 4" in line
    assert list_checkpoints(output) == []


@pytest.mark.parametrize(
    ("record", "content", "problem"),
    [
        ("training_clock.json", "[1]", "a JSON list, not an object"),
        ("training_clock.json", '{"training_seconds": "abc"}', "training_seconds is 'abc'"),
        ("training_clock.json", "{", "Expecting property name"),
        ("training_settings.json", "[1]", "a JSON list, not an object"),
    ],
)
def test_a_damaged_checkpoint_record_is_one_line_that_names_it_and_the_checkpoint_before(
    demo_dataset, finished_run, tmp_path, capsys, record, content, problem
):
    output = tmp_path / "resumed"
    copy_checkpoints(finished_run, output)
    (output / "checkpoint-16" / record).write_text(content)
    run = ["--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest"]
    line = refusal(capsys, *run)
    assert (
        line.startswith(f"error: {output / 'checkpoint-16' / record} is damaged ({problem}") and "Traceback" not in line
    )
    assert line.endswith(
        f"move checkpoint-16 out of {output} and resume from latest, which is then {output / 'checkpoint-12'}."
    )


def test_a_resume_on_another_number_of_processes_goes_on_from_the_same_step_and_is_recorded(
    demo_dataset, finished_run, tmp_path
):
    # A checkpoint as two processes write it: accelerate steps the schedule once per process.
    output = tmp_path / "fewer-processes"
    copy_checkpoints(finished_run, output)
    shutil.rmtree(output / "checkpoint-16")
    settings_file = output / "checkpoint-12" / "training_settings.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "num_processes": 2}))
    schedule = torch.load(output / "checkpoint-12" / "scheduler.bin", weights_only=True)
    torch.save({**schedule, "last_epoch": 24, "_step_count": 25}, output / "checkpoint-12" / "scheduler.bin")
    result = launch(
        "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "latest"
    )  # fmt: skip
    assert "trained on 2 process(es) up to step 12 and goes on with 1: a step now takes 16 images instead of 32." in (
        result.stdout + result.stderr
    )
    assert torch.load(output / "checkpoint-16" / "scheduler.bin", weights_only=True)["last_epoch"] == 16
    config = json.loads((output / "training_config.json").read_text())
    assert config["num_processes_changes"] == [{"step": 12, "from": 2, "to": 1}]
    assert json.loads((output / "checkpoint-16" / "training_settings.json").read_text())["num_processes"] == 1


def test_a_resumed_schedule_keeps_its_place_across_process_counts_and_warns_of_a_jump(caplog):
    from accelerate import PartialState
    from diffusers.optimization import get_scheduler

    PartialState()  # accelerate's logger logs once the state is made
    train = load_training_script("train")

    def schedule_at(step, max_train_steps, num_processes, name="linear", learning_rate=1e-3):
        """A schedule as accelerate steps it on `num_processes` processes, `step` optimizer steps in."""
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=0, num_training_steps=max_train_steps * num_processes
        )
        for _ in range(step * num_processes):
            optimizer.step()
            scheduler.step()
        return scheduler

    def resumed(checkpoint_schedule, max_train_steps, num_processes, recorded=None, name="linear", learning_rate=1e-3):
        args = argparse.Namespace(
            learning_rate=learning_rate, learning_rate_changes=[], num_processes_changes=[], train_batch_size=4,
            gradient_accumulation_steps=1, max_train_steps=max_train_steps, lr_scheduler=name,
        )  # fmt: skip
        lr_scheduler = argparse.Namespace(scheduler=schedule_at(0, max_train_steps, num_processes, name, learning_rate))
        lr_scheduler.scheduler.load_state_dict(checkpoint_schedule.state_dict())
        train.continue_schedule(lr_scheduler, recorded or {"num_processes": 2}, args, num_processes, step=4)
        return lr_scheduler.scheduler, args

    on_two = schedule_at(4, max_train_steps=8, num_processes=2)
    assert on_two.get_last_lr() == [5e-4]
    caplog.clear()
    for num_processes in (1, 2, 4):
        scheduler, args = resumed(on_two, max_train_steps=8, num_processes=num_processes)
        assert scheduler.get_last_lr() == pytest.approx([5e-4]) and scheduler.last_epoch == 4 * num_processes
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
        assert args.num_processes_changes == (
            [] if num_processes == 2 else [{"step": 4, "from": 2, "to": num_processes}]
        )
    # A new peak rate alone is no jump, also where the schedule does not scale with it (polynomial's fixed end).
    resumed(
        schedule_at(4, 8, 2, "polynomial"), max_train_steps=8, num_processes=2, name="polynomial", learning_rate=5e-4
    )
    assert "jumps" not in caplog.text
    # A checkpoint older than the record of its processes: its schedule's place tells.
    scheduler, args = resumed(on_two, max_train_steps=8, num_processes=1, recorded={"learning_rate": 1e-3})
    assert scheduler.last_epoch == 4 and args.num_processes_changes == [{"step": 4, "from": 2, "to": 1}]
    scheduler, _ = resumed(on_two, max_train_steps=16, num_processes=1)
    assert scheduler.get_last_lr() == pytest.approx([7.5e-4])
    assert (
        "The learning rate at step 4 is 0.00075 on this run's linear schedule and was 0.0005 on the checkpoint's"
        in (caplog.text)
    )


def test_a_hub_repo_id_the_hub_would_refuse_is_refused_before_training(demo_dataset, tmp_path, capsys):
    output = tmp_path / "my run"  # the default id, the folder's name, has a space
    line = refusal(capsys, "--dataset", str(demo_dataset), "--output_dir", str(output), *TINY_RUN, "--push_to_hub")
    assert "'my run' (by default the output folder's name) cannot be a Hub repo id" in line
    assert "Name one with --hub_model_id USER/NAME." in line and not output.exists()


@pytest.mark.parametrize(
    "flag", ["--logging_steps", "--checkpointing_steps", "--validation_steps", "--train_batch_size", "--gradient_accumulation_steps",
             "--num_train_timesteps", "--checkpoints_total_limit", "--validation_inference_steps"]
)  # fmt: skip
def test_counts_below_one_are_refused_by_the_argument_parser(flag, capsys):
    with pytest.raises(SystemExit):
        load_training_script("train").parse_args(["--dataset", "d", "--output_dir", "o", flag, "0"])
    assert f"{flag}: 0 is not a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--augment_degrees", "nan"], "--augment_degrees: nan is not a finite number of at least 0"),
        (["--learning_rate", "inf"], "--learning_rate: inf is not a finite number above 0"),
        (["--learning_rate", "0"], "--learning_rate: 0 is not a finite number above 0"),
        (["--ema_max_decay", "2"], "--ema_max_decay: 2 is not a number from 0 to 1"),
        (["--max_grad_norm", "-1"], "--max_grad_norm: -1 is not a finite number of at least 0"),  # was: no clipping
        (["--augment_zoom", "1", "inf"], "--augment_zoom: inf is not a finite number above 0"),
        (["--max_preload_gb", "nan"], "--max_preload_gb: nan is not a finite number of at least 0"),
        (["--resolution", "100000"], "--resolution: 100000 pixels a side is more than images can have here (9459"),
        (["--learning_rate", "fast"], "--learning_rate: invalid float value: 'fast'"),
    ],
)
def test_numbers_that_would_train_to_nan_or_exhaust_memory_are_refused_by_the_argument_parser(flags, expected, capsys):
    # Before: a NaN augmentation trained to NaN and was reported as a divergence; 100,000 px was killed by the kernel.
    with pytest.raises(SystemExit):
        load_training_script("train").parse_args(["--dataset", "d", "--output_dir", "o", *flags])
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--save_pipeline_steps", "--lr_warmup_steps", "--dataloader_num_workers"])
def test_counts_below_zero_are_refused_by_the_argument_parser(flag, capsys):
    parse_args = load_training_script("train").parse_args
    assert getattr(parse_args(["--dataset", "d", "--output_dir", "o", flag, "0"]), flag[2:]) == 0  # 0 means none
    with pytest.raises(SystemExit):  # -1 saved the pipeline at every step
        parse_args(["--dataset", "d", "--output_dir", "o", flag, "-1"])
    assert f"{flag}: -1 is not a whole number of at least 0" in capsys.readouterr().err
