"""`polyp-ddpm reproduce`: the whole study on CPU with the smoke preset and the demo data, killed and continued."""

import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import polyp_diffusers.study as study_module
from polyp_diffusers import PolypDDPMPipeline
from polyp_diffusers.choices import STUDY_OBJECTIVES, STUDY_PRESET_NAMES
from polyp_diffusers.cli import main as polyp_ddpm
from polyp_diffusers.study import OBJECTIVES, STUDY_PRESETS, run_study


class Killed(Exception):
    """Stands for a kill: raised instead of the third script the study launches."""


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """
    A smoke study killed before its second segmenter, continued by the same command, then extended with the two
    extra training sets; the scripts each run launched, and the base report.
    """
    output = tmp_path_factory.mktemp("study") / "smoke"
    launches = []
    original_run = study_module._run
    lock = threading.Lock()  # segmenters launch from threads

    def run_until_killed(command, log, threads=None):
        with lock:
            launches.append(log.stem)
            killed = len(launches) == 3
        if killed:
            raise Killed
        original_run(command, log, threads)

    patch = pytest.MonkeyPatch()
    patch.setattr(study_module, "_run", run_until_killed)
    with pytest.raises(Killed):
        run_study("demo", output, preset="smoke")
    records_before = {path.name: path.stat().st_mtime_ns for path in (output / "steps").glob("*.json")}
    base_report = run_study("demo", output, preset="smoke")
    launches_before_extension = len(launches)
    report = run_study("demo", output, preset="smoke", new_masks=True, inserted_polyps=True)
    patch.undo()
    runs = {"first": launches[:3], "continued": launches[3:launches_before_extension]}
    runs["extended"] = launches[launches_before_extension:]
    return output, report, runs, records_before, base_report


def test_the_command_line_offers_every_preset_and_objective_of_the_study():
    assert STUDY_PRESET_NAMES == tuple(STUDY_PRESETS) and STUDY_OBJECTIVES == tuple(OBJECTIVES)


@pytest.mark.parametrize(
    "entry, command",
    [
        ("/usr/local/bin/polyp-ddpm", "polyp-ddpm reproduce --output study"),
        (str(Path(study_module.__file__).with_name("cli.py")), "polyp-ddpm reproduce --output study"),  # python -m
        ("/usr/bin/pytest", None),
    ],
)
def test_the_report_names_the_command_also_when_run_as_a_module(monkeypatch, entry, command):
    monkeypatch.setattr(sys, "argv", [entry, "reproduce", "--output", "study"])
    assert study_module._command_line() == command


def test_a_killed_study_continues_without_redoing_finished_steps(finished_study):
    output, _, runs, records_before, base_report = finished_study
    # Two segmenters train at once (the smoke preset's segmentation_jobs); the kill hit the second to start.
    assert runs["first"][0] == "denoiser" and set(runs["first"][1:]) == {"real-seed0", "real-seed1"}
    finished = ({"real-seed0", "real-seed1"} - {runs["first"][2]}).pop()
    # The second run launches only what was not finished: no second training of the denoiser, no later segmenter
    # started after the kill.
    everything = {f"{setting}-seed{seed}" for setting in ("real", "synthetic", "real-synthetic") for seed in (0, 1)}
    assert sorted(runs["continued"]) == sorted(everything - {finished})
    for name in ("data.json", "denoiser.json", "synthetic.json", f"segmentation-{finished}.json"):
        assert (output / "steps" / name).stat().st_mtime_ns == records_before[name]
    assert list(base_report["summary"]) == ["real", "synthetic", "real+synthetic"]


def test_a_finished_study_gains_the_extra_training_sets_without_redoing_its_steps(finished_study):
    _, report, runs, _, base_report = finished_study
    extra = {f"{setting}-seed{seed}" for setting in ("real-new-masks", "real-inserted") for seed in (0, 1)}
    assert sorted(runs["extended"]) == sorted(extra)
    for setting in ("real", "synthetic", "real+synthetic"):
        assert report["summary"][setting] == base_report["summary"][setting]
    assert list(report["wall_s"])[:2] == ["arguments", "data"]  # the re-recorded arguments keep their place


def test_the_report_has_every_setting_over_seeds_and_its_figures(finished_study):
    output, report, _, _, _ = finished_study
    summary = report["summary"]
    assert list(summary) == ["real", "synthetic", "real+synthetic", "real+new-masks", "real+inserted"]
    for setting in summary.values():
        scores = setting["demo:test"]
        assert scores["seeds"] == 2 and 0 <= scores["iou_mean"] <= scores["dice_mean"] <= 1
    assert report["realism"]["skipped"].startswith("FID/KID skipped: no Inception weights")
    assert set(report["figures"]) == {"samples.png", "iou.png", "loss.png", "pairs.png"}
    assert all((output / name).stat().st_size > 1000 for name in report["figures"])
    markdown = (output / "report.md").read_text()
    # The smoke preset's 30 steps of batch 8, logged at its checkpoints (10, 20, 30): two windows after the first.
    assert report["denoiser_training"]["steps"] == 30 and report["denoiser_training"]["images"] == 240
    assert report["denoiser_training"]["images_per_s_median"] > 0
    fidelity = report["mask_fidelity"]
    assert fidelity["seeds"] == 2 and 0 <= fidelity["iou_mean"] <= fidelity["dice_mean"] <= 1
    assert (
        "Mask fidelity: segmenters trained on the real pairs find the polyps of the synthetic images made" in markdown
    )
    real_run = json.loads((output / "segmentation" / "real-seed0" / "results.json").read_text())
    assert real_run["mask_fidelity"]["num_images"] >= 1  # the synthetic twins of the held-out masks
    assert "Denoiser: 30 optimizer steps, 240 training images (0.0% of the paper's 6,400,000)" in markdown
    assert "± " in markdown and "| real+synthetic |" in markdown and "denoiser |" in markdown
    # The fourth training set: real pairs plus pairs whose masks are new, relabelled from real+synthetic.
    assert (
        "| real+new-masks |" in markdown and "Adding the new-masks pairs to the real ones changed the IoU" in markdown
    )
    assert summary["real+new-masks"]["demo:test"]["train_pairs"] > summary["real"]["demo:test"]["train_pairs"]
    num_train = json.loads((output / "steps" / "data.json").read_text())["result"]["train"]
    for folder in ("synthetic-new-masks", "synthetic-inserted"):
        assert json.loads((output / "steps" / f"{folder}.json").read_text())["result"] == num_train
    assert "| real+inserted |" in markdown
    # Mask fidelity of the extra sets too: the real-trained segmenters on the pairs made from their held-out pairs.
    for setting in ("real+new-masks", "real+inserted"):
        scores = report["mask_fidelity_extra"][setting]
        assert scores["seeds"] == 2 and 0 <= scores["iou_mean"] <= scores["dice_mean"] <= 1
        assert f"- and the {setting} pairs made from the held-out pairs: IoU" in markdown
    written = json.loads((output / "report.json").read_text())
    assert written["preset"] == "smoke" and written["data"] == "demo" and written["pairs"] == {"train": 36, "test": 4}


def test_the_report_goes_into_the_model_card_and_not_into_another_models(finished_study, tmp_path, capsys):
    output, _, _, _, _ = finished_study
    assert polyp_ddpm(["card", str(output / "denoiser"), "--results", str(output / "report.json")]) == 0
    card = (output / "denoiser" / "README.md").read_text()
    assert "Downstream segmentation" in card and "trained on real+synthetic, mean of 2 seeds" in card
    other = PolypDDPMPipeline.from_pretrained(output / "denoiser")
    torch.nn.init.zeros_(next(other.unet.parameters()))
    other.save_pretrained(tmp_path / "other")
    assert polyp_ddpm(["card", str(tmp_path / "other"), "--results", str(output / "report.json")]) == 1
    denoiser = (output / "denoiser").resolve()
    assert f"generated by {denoiser}, whose weights are not those of {tmp_path / 'other'}" in capsys.readouterr().err


def test_realism_is_measured_again_with_other_inception_weights(finished_study, tmp_path, monkeypatch):
    output = tmp_path / "study"
    shutil.copytree(finished_study[0], output)
    measured = []

    def realism(dataset, synthetic, weights):  # FID's Inception on a CPU: 40 s of this test for the same check
        measured.append(Path(weights).read_text())
        scores = dict(fid=float(len(measured)), kid_mean=0.1, kid_std=0.01, features="inception-v3 pool3 (2048)")
        return {**scores, "num_real": 36, "num_generated": 36, "real": f"{dataset}:train"}

    monkeypatch.setattr(study_module, "_realism", realism)
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    first.write_text("first weights")
    second.write_text("second weights")
    monkeypatch.setattr(study_module, "load_inception_state_dict", lambda path: None)  # checked by test_evaluation
    for weights in (first, first, second):
        report = run_study("demo", output, preset="smoke", new_masks=True, inserted_polyps=True,
                           inception_weights=str(weights))  # fmt: skip
    # Before, the second weights were not used: the FID measured with the first stayed in the report.
    assert measured == ["first weights", "second weights"] and report["realism"]["fid"] == 2.0


def test_a_study_folder_is_continued_only_with_the_same_arguments(finished_study):
    output, _, _, _, _ = finished_study
    with pytest.raises(ValueError, match="holds a study with other arguments"):
        run_study("demo", output, preset="smoke", seeds=3, new_masks=True, inserted_polyps=True)
    with pytest.raises(ValueError, match="holds a study with other arguments"):  # a training set is never dropped
        run_study("demo", output, preset="smoke", new_masks=True)


def test_an_output_in_the_data_a_file_or_bad_inception_weights_are_refused_before_anything_is_written(tmp_path):
    data, afile, pickled = tmp_path / "kvasir", tmp_path / "afile.txt", tmp_path / "evil.pt"
    test_set = tmp_path / "other-test-set"
    data.mkdir()
    test_set.mkdir()
    afile.write_text("mine")
    pickled.write_bytes(pickle.dumps(Killed()))  # an object, not tensors: loading it would run code
    for output, more, error in [
        (data / "study", {}, "lies inside the data"),
        # Before: found at the first segmenter, after the data, the denoiser and the generation.
        (test_set / "study", {"tests": [f"{test_set}:test"]}, f"lies inside the test set {test_set}:test"),
        (afile, {}, "is a file"),
        (tmp_path / "study", {"inception_weights": str(tmp_path / "missing.pth")}, "do not exist"),
        (tmp_path / "study", {"inception_weights": str(pickled)}, "is refused: loading it would run code"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError, FileExistsError), match=error):
            run_study(str(data), output, preset="smoke", **more)
    assert [path.name for path in data.iterdir()] == [] == list(test_set.iterdir()) and afile.read_text() == "mine"
    assert not (tmp_path / "study").exists()


def test_a_wrong_test_set_is_refused_before_anything_is_recorded(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_study("demo", tmp_path / "study", preset="smoke", tests=[f"{tmp_path / 'no-such-set'}:test"])
    assert not (tmp_path / "study" / "steps").exists()


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "report.md").write_text("# my own report")
    with pytest.raises(FileExistsError, match=f"--output {output} already holds report.md and no study"):
        run_study("demo", output, preset="smoke")
    assert [path.name for path in output.iterdir()] == ["report.md"]
    assert (output / "report.md").read_text() == "# my own report"


def test_data_that_fails_advises_prepare_data_and_leaves_the_folder_to_the_corrected_command(tmp_path):
    no_masks, other = tmp_path / "no-masks", tmp_path / "other"
    (no_masks / "images").mkdir(parents=True)
    (other / "images").mkdir(parents=True)
    output = tmp_path / "study"
    with pytest.raises(
        FileNotFoundError, match="with its defaults; for its other flags, run `polyp-ddpm prepare-data "
    ):
        run_study(str(no_masks), output, preset="smoke")
    # The study had recorded its arguments, and nothing else: other data is taken (here, it fails in its turn).
    with pytest.raises(FileNotFoundError, match=f"{other} has no 'masks/' folder"):
        run_study(str(other), output, preset="smoke")
    assert json.loads((output / "steps" / "arguments.json").read_text())["result"]["data"] == str(other)


def test_the_denoiser_takes_more_flags_after_the_presets_and_a_wrong_one_fails_first(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="refused by train.py: .*--no_such_flag"):
        run_study("demo", tmp_path / "wrong", preset="smoke", denoiser_args="--no_such_flag 1")
    with pytest.raises(ValueError, match="cannot be split into flags: No closing quotation"):
        run_study("demo", tmp_path / "wrong", preset="smoke", denoiser_args="--augment_degrees '0")
    with pytest.raises(ValueError, match="the study sets --prediction_type, --resolution itself"):
        run_study(
            "demo", tmp_path / "wrong", preset="smoke", denoiser_args="--resolution=64 --prediction_type v_prediction"
        )
    with pytest.raises(ValueError, match="the study sets --resolution, --train_split itself"):  # abbreviated too
        run_study("demo", tmp_path / "wrong", preset="smoke", denoiser_args="--resol 64 --train_spl test")
    # Its data and folder, as the study passes them, not placeholders that a user's own could equal.
    with pytest.raises(ValueError, match="the study sets --dataset, --output_dir itself"):
        run_study("demo", tmp_path / "wrong", preset="smoke", denoiser_args="--dataset data --output_dir denoiser")
    # A denoiser trained on the test split would leak it into the synthetic pairs: refused here, not after training.
    with pytest.raises(ValueError, match="the study sets --train_split itself"):
        run_study("demo", tmp_path / "wrong", preset="smoke", denoiser_args="--train_split test")
    assert not (tmp_path / "wrong" / "steps").exists()
    launched = []

    def run_until_the_denoiser(command, log):
        launched.append(command)
        raise Killed

    monkeypatch.setattr(study_module, "_run", run_until_the_denoiser)
    with pytest.raises(Killed):
        run_study("demo", tmp_path / "study", preset="smoke", denoiser_args="--augment_degrees 0 --max_train_steps 5")
    command = launched[0]
    # One process: the script itself, with no launcher process importing torch before it.
    assert command[:4] == [sys.executable, str(study_module.TRAINING_SCRIPTS / "train.py"), "--mixed_precision", "no"]
    assert command[-6:] == ["--augment_degrees", "0", "--max_train_steps", "5", "--resume_from_checkpoint", "latest"]
    assert command[command.index("--max_train_steps") + 1] == "30"  # the preset's first: argparse keeps the last
    arguments = json.loads((tmp_path / "study" / "steps" / "arguments.json").read_text())["result"]
    assert arguments["denoiser_args"] == ["--augment_degrees", "0", "--max_train_steps", "5"]
    # Another network: its default resolution is not the study's, which the study passes explicitly.
    with pytest.raises(Killed):
        run_study("demo", tmp_path / "other-network", preset="smoke", denoiser_args="--model_preset paper-64")
    assert launched[-1][-4:] == ["--model_preset", "paper-64", "--resume_from_checkpoint", "latest"]


def test_scripts_side_by_side_get_their_share_of_threads_unless_the_user_chose(tmp_path, monkeypatch):
    print_threads = [sys.executable, "-c", "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"]
    monkeypatch.setattr(study_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    study_module._run(print_threads, tmp_path / "shared.log", threads=3)
    study_module._run(print_threads, tmp_path / "alone.log")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    study_module._run(print_threads, tmp_path / "chosen.log", threads=3)
    logs = {name: (tmp_path / f"{name}.log").read_text().split()[-1] for name in ("shared", "alone", "chosen")}
    assert logs == {"shared": "3", "alone": "None", "chosen": "5"}


def test_without_cuda_the_scripts_run_on_the_cpu_as_accelerate_launch_cpu_would(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(study_module.torch.cuda, "is_available", lambda: False)
    script = (
        "import os; from accelerate import Accelerator; print(os.environ['ACCELERATE_USE_CPU'], Accelerator().device)"
    )
    study_module._run([sys.executable, "-c", script], tmp_path / "cpu.log")
    assert (tmp_path / "cpu.log").read_text().split()[-2:] == ["true", "cpu"]  # also where MPS or XPU would be taken


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_step_script_dies_with_a_killed_study_instead_of_writing_on(tmp_path):
    """Otherwise the study run again would start a second writer on the same folder."""
    started = tmp_path / "step.pid"
    os.mkfifo(started)
    step = f"import os, signal; open({str(started)!r}, 'w').write(str(os.getpid())); signal.pause()"
    study = subprocess.Popen(
        [sys.executable, "-c", f"import sys; from pathlib import Path; from polyp_diffusers.study import _run; "
         f"_run([sys.executable, '-c', {step!r}], Path({str(tmp_path / 'step.log')!r}))"]
    )  # fmt: skip
    reader = os.open(started, os.O_RDONLY | os.O_NONBLOCK)
    assert select.select([reader], [], [], 120)[0], "the step did not start"
    step_pid = int(os.read(reader, 32))
    step_ended = os.pidfd_open(step_pid)
    study.kill()
    study.wait()
    assert select.select([step_ended], [], [], 10)[0], "the step runs on without its study"


def test_an_interrupted_study_lets_its_step_save_before_it_stops(tmp_path):
    """Ctrl-C: the denoiser's training saves a checkpoint first, which a study killed at once would cut short."""
    started, saved = tmp_path / "step.pid", tmp_path / "saved"
    os.mkfifo(started)
    step = (
        "import os, signal, time\n"
        f"def save(*_): time.sleep(1); open({str(saved)!r}, 'w').write('saved'); os._exit(130)\n"
        "signal.signal(signal.SIGINT, save)\n"
        f"open({str(started)!r}, 'w').write(str(os.getpid()))\n"
        "signal.pause()"
    )
    study = subprocess.Popen(
        [sys.executable, "-c", f"import sys; from pathlib import Path; from polyp_diffusers.study import _run; "
         f"_run([sys.executable, '-c', {step!r}], Path({str(tmp_path / 'step.log')!r}))"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader = os.open(started, os.O_RDONLY | os.O_NONBLOCK)
    assert select.select([reader], [], [], 120)[0], "the step did not start"
    study.send_signal(signal.SIGINT)  # to the study alone: it passes the request on
    assert "the step is stopping" in study.communicate(timeout=60)[0]
    assert saved.read_text() == "saved"
