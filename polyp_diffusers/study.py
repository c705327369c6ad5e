"""The `reproduce` command: the paper's study in one command, from image/mask pairs to a report.

Steps, each recorded in `OUTPUT/steps/<step>.json` once done, so that rerunning the same command after a kill
continues where it stopped (training and generation also resume inside their own step):
1. `data`: the pairs prepared at the preset's size (the paper's split with `split_file`);
2. `denoiser`: `training/train.py` (one process; accelerate picks the device);
3. `synthetic`: one synthetic pair per training mask (`generate`);
4. `realism`: FID/KID of the synthetic against the real training images, when Inception weights are at hand;
5. `segmentation-<setting>-seed<k>`: a segmenter trained on real, synthetic or real+synthetic pairs;
6. the report: `report.md`, `report.json` (also a results file for `polyp-ddpm card`) and figures.
"""

import contextlib
import io
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import diffusers
import numpy as np
import torch

from .arguments import TRAINING_SCRIPTS, load_training_script, overridden_settings
from .choices import DEMO_SOURCE
from .data import load_polyp_dataset, parse_dataset_spec, split_file_path
from .folders import (
    OutputClaim,
    check_is_folder,
    check_output_apart,
    file_sha256,
    is_empty,
    visible_entries,
    write_text_atomically,
)
from .generate import generate_dataset
from .metrics import fid_kid, inception_cache_path, load_inception_state_dict
from .modeling import default_device, describe_device
from .prepare_data import prepare_dataset
from .results import fid_results, provenance, segmentation_results, summarize_scores
from .segmentation import (
    TRAIN_SETS,
    held_out_synthetic,
    load_test_sets,
    load_trained_segmenter,
    mask_fidelity,
    name_test_sets,
)

logger = logging.getLogger(__name__)


class ExtraSetting(NamedTuple):
    folder: str  # of its generated pairs, in the study folder
    insert: bool  # new polyps inserted into real frames, or whole pairs made from new masks
    argument: str  # the argument of `run_study` (and the recorded one) that asks for it


# Training sets beyond the paper's, on request: the real pairs plus one generated pair per training mask that the
# training set does not contain, with a new mask (the mask augmenter), or a new polyp inserted into a real frame.
EXTRA_SETTINGS = {
    "real+new-masks": ExtraSetting("synthetic-new-masks", insert=False, argument="new_masks"),
    "real+inserted": ExtraSetting("synthetic-inserted", insert=True, argument="inserted_polyps"),
}
REALISM_SKIPPED = (
    "FID/KID skipped: no Inception weights (pass --inception-weights PATH, or have them in the torch hub cache)"
)
# The paper's training: 100k optimizer steps of 2 accumulated batches of 32 images.
PAPER_TRAINING_IMAGES = 100_000 * 2 * 32
# The objective of the denoiser: the paper's noise prediction, or the velocity on a zero-terminal-SNR schedule.
OBJECTIVES = {"paper": {}, "velocity": {"prediction_type": "v_prediction", "zero_terminal_snr": True}}

# Presets are data: the flags of each step. `train_images_per_s` is the measured speed of a compiled bf16 training
# step on an H200 for that preset (benchmarks/results/; None where none was measured at its size), used only
# for the time estimate printed at start;
# `segmentation_jobs` segmenters train at once (small segmenters leave a GPU mostly idle).
STUDY_PRESETS = {
    # The whole path in about two minutes on two CPU cores, on the built-in demo data: proves it runs, nothing more.
    "smoke": dict(
        resolution=32,
        denoiser=dict(
            model_preset="tiny", train_batch_size=8, gradient_accumulation_steps=1, max_train_steps=30,
            learning_rate=1e-3, checkpointing_steps=10, validation_steps=30, num_validation_masks=4,
            validation_inference_steps=4,
        ),
        generation=dict(sampler="ddim", num_inference_steps=4, batch_size=32),
        segmentation=dict(
            max_train_steps=4, train_batch_size=4, validation_steps=4, validation_size=0.1,
        ),
        seeds=2,
        segmentation_jobs=2,
        mixed_precision="no",
        train_images_per_s=None,
    ),
    # One GPU, 7.6 minutes on an H100 (measured with --objective velocity, wheel installation included): the paper's
    # 64 px denoiser trained for 3 minutes (as many images as the loop's speed allows, at most 3.2 M), the paper's 250 DDPM steps, 3 segmenter seeds, 5 segmenters at once.
    "quick-64": dict(
        resolution=64,
        denoiser=dict(
            model_preset="paper-64", train_batch_size=128, gradient_accumulation_steps=1, max_train_steps=25_000,
            max_train_minutes=3.0, checkpointing_steps=1000, validation_steps=25_000, compile=True, allow_tf32=True,
        ),
        generation=dict(sampler="ddpm", num_inference_steps=250, batch_size=512),
        segmentation=dict(max_train_steps=1200, train_batch_size=32, validation_steps=200),
        seeds=3,
        segmentation_jobs=5,
        mixed_precision="bf16",
        train_images_per_s=None,
    ),
    # The paper's scale: 256 px, 100k steps of 2 x 32 images, 250 DDPM steps, UNet++ for 100 epochs.
    "paper": dict(
        resolution=256,
        denoiser=dict(
            model_preset="paper", train_batch_size=32, gradient_accumulation_steps=2, max_train_steps=100_000,
            checkpointing_steps=1000, validation_steps=5000, compile=True, allow_tf32=True,
        ),
        generation=dict(sampler="ddpm", num_inference_steps=250, batch_size=64),
        segmentation=dict(max_train_steps=11_250, train_batch_size=8, validation_steps=500),
        seeds=3,
        segmentation_jobs=3,
        mixed_precision="bf16",
        train_images_per_s=338,
    ),
}  # fmt: skip


def _flags(options: dict) -> list[str]:
    """`{"max_train_steps": 4, "compile": True}` as `["--max_train_steps", "4", "--compile"]`."""
    flags = []
    for name, value in options.items():
        if value is True:
            flags.append(f"--{name}")
        elif value is not False:
            flags += [f"--{name}", str(value)]
    return flags


def script_command(script: str, mixed_precision: str) -> list[str]:
    """
    How the study runs a script of training/ on one device: with `python` itself, as Accelerate allows for one
    process. `accelerate launch` would first import torch and accelerate in a process of its own (1.4 s on 2 CPU
    cores, several on a GPU machine's slower cores), for nothing the script does not set itself.
    """
    return [sys.executable, str(TRAINING_SCRIPTS / script), "--mixed_precision", mixed_precision]


def _say(line: str) -> None:
    """One line of progress, written at once: segmenters running side by side print between each other's lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# Run before a step's script, on Linux: asks the kernel to stop it (SIGTERM) when the study's process dies, even by
# SIGKILL, then becomes the script (the request survives exec). Otherwise the script would run on, and the study run
# again would start a second writer on its folder. A process of its own, not a `preexec_fn`: the study starts steps
# from several threads, where code run between fork and exec can deadlock.
DIE_WITH_PARENT = (
    "import ctypes, os, sys; "
    "ctypes.CDLL(None).prctl(1, 15); "  # PR_SET_PDEATHSIG, SIGTERM
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "  # the study died before the request took effect
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def _dying_with_this_process(command: list[str]) -> list[str]:
    """`command`, stopped when this process dies (Linux; elsewhere as it is)."""
    if sys.platform != "linux":
        return command
    return [sys.executable, "-S", "-c", DIE_WITH_PARENT, str(os.getpid()), *command]


def _run(command: list[str], log: Path, threads: int | None = None) -> None:
    """
    Runs one step's script, its output kept in `log`; a failure shows the end of the log. `threads`: its CPU
    threads (`OMP_NUM_THREADS`, unless the user set it), so that scripts side by side share the cores.
    """
    _say("$ " + " ".join(command) + f"\n  (its output: {log})")
    environment = os.environ.copy()
    if threads is not None:
        environment.setdefault("OMP_NUM_THREADS", str(threads))
    if not torch.cuda.is_available():  # as `accelerate launch --cpu`: the study's own steps run on the CPU there
        environment.setdefault("ACCELERATE_USE_CPU", "true")
    with log.open("a") as file:
        process = subprocess.Popen(
            _dying_with_this_process(command), stdout=file, stderr=subprocess.STDOUT, env=environment
        )
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            # Passed on (a terminal's Ctrl-C reaches the step too, as the same request) and waited for: the denoiser's
            # training saves a checkpoint before it stops, which the study run again resumes from.
            _say("Interrupted: the step is stopping (the denoiser's training saves a checkpoint first) ...")
            process.send_signal(signal.SIGINT)
            process.wait()
            raise
    if returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"the step logged in {log} failed (exit code {returncode}):\n{tail}")


class Study:
    """One study folder: its steps, their records, and what they produced."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.steps = self.output / "steps"
        self.logs = self.output / "logs"
        self.steps.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)

    def record(self, name: str) -> dict | None:
        path = self.steps / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def step(self, name: str, work) -> dict:
        """Runs `work()` unless the step is recorded as done; records its result and wall time."""
        done = self.record(name)
        if done is not None:
            _say(f"== {name}: done earlier ({done['wall_s']:.0f} s), skipped")
            return done
        _say(f"== {name}")
        started = time.perf_counter()
        result = work()
        record = {"wall_s": round(time.perf_counter() - started, 1), "result": result}
        write_text_atomically(self.steps / f"{name}.json", json.dumps(record, indent=2))
        return record

    def forget(self, name: str) -> None:
        """Drops a step's record, so that the step runs again."""
        (self.steps / f"{name}.json").unlink(missing_ok=True)

    def has_begun(self) -> bool:
        """Whether any step beyond recording the arguments is done."""
        return any(path.name != "arguments.json" for path in self.steps.glob("*.json"))

    def rerecord(self, name: str, result) -> None:
        """Replaces the result of a recorded step, keeping its wall time and its place in the steps' order (mtime)."""
        path = self.steps / f"{name}.json"
        written = path.stat()
        write_text_atomically(path, json.dumps({**self.record(name), "result": result}, indent=2))
        os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns))


def _inception_weights(path: str | None) -> str | None:
    """The Inception weights to use: the given file, or the official file if it is already in the hub cache."""
    if path is not None:
        return path
    return str(inception_cache_path()) if inception_cache_path().is_file() else None


def run_study(
    data: str,
    output: str | Path,
    preset: str = "quick-64",
    split_file: str | None = None,
    tests: list[str] | None = None,
    seeds: int | None = None,
    objective: str = "paper",
    inception_weights: str | None = None,
    segmentation_jobs: int | None = None,
    new_masks: bool = False,
    inserted_polyps: bool = False,
    denoiser_args: str | None = None,
) -> dict:
    """
    Runs (or continues) the study in `output` and returns the report (also written as `report.json`).

    `data` is a Kvasir-SEG-style source for `prepare-data` (or `"demo"`); `tests` are extra test sets
    `DATASET[:SPLIT]` scored beside the data's own test split; `seeds` overrides the preset's number of
    segmentation seeds and `segmentation_jobs` how many segmenters train at once; `objective` is the denoiser's
    (`OBJECTIVES`). `new_masks` adds a training set: the real pairs plus one generated pair per training mask
    whose mask is new (`generate --new-masks N --mask-augment`), to ask whether new polyp shapes help;
    `inserted_polyps` another: the real pairs plus as many real frames with a new polyp inserted (`--insert`).
    `denoiser_args` are more `train.py` flags, after the preset's (so they win), such as `"--augment_degrees 0"`.
    """
    if preset not in STUDY_PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {sorted(STUDY_PRESETS)}.")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; expected one of {sorted(OBJECTIVES)}.")
    if not (TRAINING_SCRIPTS / "train.py").is_file():
        raise FileNotFoundError(
            f"`reproduce` runs the scripts in training/ of a polyp-diffusers checkout, installed editable (pip install "
            f"-e .); {TRAINING_SCRIPTS} has none."
        )
    if data != DEMO_SOURCE and not Path(data).exists():
        raise FileNotFoundError(f"the data {data} does not exist.")
    if split_file is not None and not split_file_path(split_file).is_file():
        raise FileNotFoundError(f"the split file {split_file} does not exist.")
    check_is_folder(output)
    test_sets = {f"test set {spec}": parse_dataset_spec(spec)[0] for spec in tests or []}
    check_output_apart(output, {"data": data if data != DEMO_SOURCE else None, **test_sets})
    _check_output_holds_no_other_files(Path(output))
    if inception_weights is not None:  # damaged, or pickled code: refused now, not after hours of training
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"the Inception weights {inception_weights} do not exist.")
        load_inception_state_dict(inception_weights)
    # Where the study prepares its data; its test split is scored beside each --test.
    dataset = Path(output) / "data" / (Path(data).resolve().stem if data != DEMO_SOURCE else "demo")
    test_specs = [f"{dataset}:test", *(tests or [])]
    load_test_sets(tests or [])  # a wrong --test fails now, not after hours of training
    name_test_sets(test_specs)  # and a set named twice
    settings = STUDY_PRESETS[preset]
    try:
        extra_train_flags = shlex.split(denoiser_args or "")
    except ValueError as error:  # unbalanced quotes
        raise ValueError(f"--denoiser-args {denoiser_args!r} cannot be split into flags: {error}") from None
    denoiser = Path(output) / "denoiser"
    denoiser_command = _denoiser_command(dataset, denoiser, settings, objective)
    _check_train_flags(denoiser_command, extra_train_flags)
    seeds = settings["seeds"] if seeds is None else seeds
    # One study writes in `output` at a time: a second would run the same steps beside the first.
    with OutputClaim(output):
        study = Study(output)
        arguments = {"data": data, "preset": preset, "split_file": split_file, "tests": tests or [], "seeds": seeds,
                     "objective": objective}  # fmt: skip
        # Only when asked for, so that studies made before these options still continue.
        if new_masks:
            arguments["new_masks"] = True
        if inserted_polyps:
            arguments["inserted_polyps"] = True
        if extra_train_flags:
            arguments["denoiser_args"] = extra_train_flags
        previous = study.record("arguments")
        if previous is not None and previous["result"] != arguments and not study.has_begun():
            _say("== arguments: the study had done nothing with its earlier ones (its data failed): replaced")
            study.rerecord("arguments", arguments)
        elif previous is not None and previous["result"] != arguments:
            if not _adds_settings(previous["result"], arguments):
                raise ValueError(
                    f"{output} holds a study with other arguments {previous['result']}; run the same command to "
                    "continue it (adding --new-masks or --inserted-polyps keeps what it has done), or choose another "
                    "--output."
                )
            added = sorted(set(study_settings(arguments)) - set(study_settings(previous["result"])))
            _say(f"== arguments: the study gains the training sets {', '.join(added)}; what it has done is kept")
            study.rerecord("arguments", arguments)
        study.step("arguments", lambda: arguments)
        _print_estimate(settings, seeds, len(study_settings(arguments)))
        started = time.perf_counter()

        prepared = study.step("data", lambda: _prepare(data, dataset, settings["resolution"], split_file))
        num_masks = prepared["result"]["train"]
        train_command = [*denoiser_command, *extra_train_flags, "--resume_from_checkpoint", "latest"]
        study.step("denoiser", lambda: _run(train_command, study.logs / "denoiser.log") or {"command": train_command})
        synthetic = study.output / "synthetic"
        generation = settings["generation"]
        sampling = dict(
            split="train", sampler=generation["sampler"], num_inference_steps=generation["num_inference_steps"],
            batch_size=generation["batch_size"], dtype="bf16" if settings["mixed_precision"] == "bf16" else "fp32",
        )  # fmt: skip
        study.step(
            "synthetic", lambda: len(generate_dataset(str(denoiser), str(dataset), synthetic, **sampling)["train"])
        )
        extra_pairs = {}  # setting: folder of its generated pairs
        # Each extra set's seeds follow those of the sets before it in EXTRA_SETTINGS, asked for or not, so that a set
        # continued in a study that has since gained another is drawn from the same seeds.
        for rank, (setting, extra) in enumerate(EXTRA_SETTINGS.items(), start=1):
            if setting not in study_settings(arguments):
                continue
            extra_pairs[setting] = study.output / extra.folder
            study.step(
                extra.folder,
                lambda pairs=extra_pairs[setting], insert=extra.insert, rank=rank: len(
                    generate_dataset(
                        str(denoiser), str(dataset), pairs, new_masks=num_masks, mask_augment=True, insert=insert,
                        seed=rank * num_masks, **sampling,
                    )["train"]
                ),
            )  # fmt: skip
        weights = _inception_weights(inception_weights)
        if weights is None:  # not recorded: a later run with the weights computes it
            print(f"== realism: {REALISM_SKIPPED}", flush=True)
        else:
            digest = file_sha256(weights)
            measured = study.record("realism")
            measured_with = measured["result"].get("inception_weights_sha256") if measured is not None else digest
            if measured_with != digest:
                earlier = "other Inception weights" if measured_with else "Inception weights it has no record of"
                _say(f"== realism: measured earlier with {earlier}; measured again with {weights}")
                study.forget("realism")
            study.step("realism", lambda: {**_realism(dataset, synthetic, weights), "inception_weights_sha256": digest})

        jobs = segmentation_jobs or settings["segmentation_jobs"]
        # Each segmenter's share of the cores this process may use (a scheduler's allocation, not the machine's).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // min(jobs, len(study_settings(arguments)) * seeds))
        failed = threading.Event()

        def segmentation_step(name, work):
            """One segmenter; none starts once one has failed (those running finish and are recorded)."""
            if failed.is_set():
                return None
            try:
                return study.step(name, work)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            runs = []
            for setting in study_settings(arguments):
                # The extra sets train as train_segmentation.py's real+synthetic, with their own --synthetic.
                train_set, pairs = (
                    ("real+synthetic", extra_pairs[setting]) if setting in extra_pairs else (setting, synthetic)
                )
                for seed in range(seeds):
                    run_dir = study.output / "segmentation" / segmentation_run_name(setting, seed)
                    command = [
                        *script_command("train_segmentation.py", settings["mixed_precision"]),
                        *_flags({"train": train_set, "real": dataset, "synthetic": pairs, "output_dir": run_dir,
                                 "resolution": settings["resolution"], "seed": seed, **settings["segmentation"]}),
                        *[flag for spec in test_specs for flag in ("--test", spec)],
                        "--overwrite",  # a run the study has not recorded as done is the study's own stale one
                    ]  # fmt: skip
                    work = lambda command=command, run_dir=run_dir, setting=setting: {  # noqa: E731
                        **(
                            _run(command, study.logs / f"{run_dir.name}.log", threads)
                            or json.loads((run_dir / "results.json").read_text())
                        ),
                        "train": setting,
                    }
                    runs.append(pool.submit(segmentation_step, f"segmentation-{run_dir.name}", work))
        for run in runs:
            run.result()  # the first failure
        for pairs in extra_pairs.values():
            study.step(f"fidelity-{pairs.name}", lambda pairs=pairs: _held_out_fidelity(study, dataset, pairs, seeds))
        report = write_report(study, arguments, wall_s=time.perf_counter() - started)
        print((study.output / "report.md").read_text())
        return report


def study_settings(arguments: dict) -> list[str]:
    """The training sets of a study's segmenters: the paper's three, and the `EXTRA_SETTINGS` asked for."""
    return [*TRAIN_SETS, *(setting for setting, extra in EXTRA_SETTINGS.items() if arguments.get(extra.argument))]


# train.py settings that the study sets itself: its data, folders and resumption, and the objective it records.
STUDY_TRAIN_SETTINGS = (
    "dataset", "output_dir", "resolution", "resume_from_checkpoint", "prediction_type", "zero_terminal_snr",
    "mixed_precision", "train_split",
)  # fmt: skip


def _denoiser_command(dataset: Path, denoiser: Path, settings: dict, objective: str) -> list[str]:
    """The study's train.py command, but for the user's --denoiser-args and the resumption it adds."""
    return [
        *script_command("train.py", settings["mixed_precision"]),
        *_flags({"dataset": dataset, "output_dir": denoiser, "resolution": settings["resolution"]}),
        *_flags({**settings["denoiser"], **OBJECTIVES[objective]}),
    ]


def _check_train_flags(command: list[str], extra: list[str]) -> None:
    """
    Parses the denoiser's `command` (`_denoiser_command`) and the user's `extra` flags with train.py's own parser,
    so that a wrong one fails before the data step, and refuses `extra` flags that change a setting the study
    sets itself.
    """
    parse_args = load_training_script("train").parse_args
    flags = command[2:]  # after python and the script
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            owned = overridden_settings(parse_args, flags, extra, STUDY_TRAIN_SETTINGS)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "rejected"
        raise ValueError(f"the denoiser's flags {extra} are refused by train.py: {message}") from None
    if owned:
        raise ValueError(
            f"the study sets {', '.join(owned)} itself (use --objective, --output, and the preset's resolution; "
            "the denoiser learns from the training split only); "
            "leave them out of --denoiser-args."
        )


def _adds_settings(previous: dict, arguments: dict) -> bool:
    """Whether `arguments` are a study's `previous` ones with more of the extra training sets asked for."""
    extras = {extra.argument for extra in EXTRA_SETTINGS.values()}
    same = {k: v for k, v in previous.items() if k not in extras} == {
        k: v for k, v in arguments.items() if k not in extras
    }
    return same and set(study_settings(previous)) <= set(study_settings(arguments))


def _command_line() -> str | None:
    """The `polyp-ddpm` command that runs this study, also when run as `python -m polyp_diffusers.cli`."""
    entry = Path(sys.argv[0])
    if entry.name != "polyp-ddpm" and entry.resolve() != Path(__file__).with_name("cli.py").resolve():
        return None
    return " ".join(["polyp-ddpm", *sys.argv[1:]])


def _print_estimate(settings: dict, seeds: int, num_settings: int) -> None:
    images = settings["denoiser"]["train_batch_size"] * settings["denoiser"]["gradient_accumulation_steps"]
    images *= settings["denoiser"]["max_train_steps"]
    minutes = settings["denoiser"].get("max_train_minutes")
    line = f"The denoiser trains on {images:,} images" + (
        f" or for {minutes} min, whichever ends first" if minutes else ""
    )
    line += f"; segmenters: {num_settings} settings x {seeds} seeds."
    if settings["train_images_per_s"] and torch.cuda.is_available():
        minutes = images / settings["train_images_per_s"] / 60
        line += f" Training alone takes about {minutes:.0f} min at the speed measured on an H200."
    elif not torch.cuda.is_available() and (settings["train_images_per_s"] or minutes):
        line += " This preset is meant for a GPU; on a CPU its generation and segmenters alone take hours."
    print(line, flush=True)


def _prepare(data: str, dataset: Path, resolution: int, split_file: str | None) -> dict:
    demo = {"demo_pairs": 40} if data == DEMO_SOURCE else {}
    try:
        prepared = prepare_dataset(data, dataset, split_file=split_file, resolution=resolution, overwrite=True, **demo)
    except (ValueError, FileNotFoundError) as error:  # its advice may name prepare-data's flags, not reproduce's
        raise (ValueError if isinstance(error, ValueError) else FileNotFoundError)(
            f"{error} (`reproduce` prepares the data as `polyp-ddpm prepare-data` does with its defaults; for its "
            f"other flags, run `polyp-ddpm prepare-data {shlex.quote(str(data))} --output FOLDER ...` and pass "
            "FOLDER as --data.)"
        ) from error
    return {name: len(part) for name, part in prepared.items()}


def _check_output_holds_no_other_files(output: Path) -> None:
    """
    A study writes into a new or empty folder, or continues its own: it replaces `report.md`, `report.json`, its
    figures and `data/` as it goes, which must not be someone else's files.
    """
    if (output / "steps" / "arguments.json").is_file():
        return
    others = [name for name in visible_entries(output) if name not in ("steps", "logs") or not is_empty(output / name)]
    if others:
        raise FileExistsError(
            f"--output {output} already holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''} and no "
            "study: `reproduce` writes its report, figures and data there. Choose a new or empty folder."
        )


def _realism(dataset: Path, synthetic: Path, inception_weights: str) -> dict:
    real = load_polyp_dataset(str(dataset), split="train")
    generated = load_polyp_dataset(str(synthetic), split="train")
    scores = fid_kid(real, generated, inception_weights=inception_weights, device=default_device())
    scores.update(real=f"{dataset}:train", generated=str(synthetic))
    return scores


def _held_out_fidelity(study: Study, dataset: Path, pairs: Path, seeds: int) -> list[dict]:
    """
    Mask fidelity of an extra generated set, as train_segmentation.py scores the synthetic one: each real-trained
    segmenter on the pairs made from the real pairs it held out (their frames, for inserted polyps).
    """
    real = load_polyp_dataset(str(dataset), split="train")  # the study's segmenters train on the train split
    generated = load_polyp_dataset(str(pairs), split="train")
    scores = []
    for seed in range(seeds):
        model, config = load_trained_segmenter(study.output / "segmentation" / f"real-seed{seed}")
        held_out = held_out_synthetic(real, generated, config["validation_size"], config["seed"])
        if len(held_out):
            scores.append(mask_fidelity(model.to(default_device()), config, held_out))
    return scores


def _denoiser_scalars(study: Study, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps and values the denoiser logged under `tag` (None without them or the tensorboard package)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # [train] extra
    except ImportError:
        return None
    for folder in sorted((study.output / "denoiser" / "logs").glob("*")):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        if tag in events.Tags().get("scalars", []):
            scalars = events.Scalars(tag)
            return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])
    return None


def _denoiser_training(study: Study) -> dict:
    """How much the denoiser trained (a time budget may have stopped it early) and how fast its loop ran."""
    config = json.loads((study.output / "denoiser" / "training_config.json").read_text())
    images = config["trained_steps"] * config["train_batch_size"] * config["gradient_accumulation_steps"]
    images *= config["num_processes"]
    training = {"steps": config["trained_steps"], "images": images, "paper_share": images / PAPER_TRAINING_IMAGES}
    speed = _denoiser_scalars(study, "images_per_s")
    if speed is not None and len(speed[1]) > 1:  # the first window holds start-up and compilation
        training["images_per_s_median"] = float(np.median(speed[1][1:]))
    return training


def _figures(study: Study, summary: dict) -> list[str]:
    """Writes the figures a person looks at first; returns their file names."""
    import matplotlib  # the [eval] extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    grids = sorted((study.output / "denoiser" / "validation").glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], study.output / "samples.png")
        written.append("samples.png")
    test_name = next(iter(next(iter(summary.values()))))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    means = [summary[setting][test_name]["iou_mean"] for setting in summary]
    spreads = [summary[setting][test_name]["iou_std"] for setting in summary]
    axis.bar(
        list(summary),
        means,
        yerr=spreads,
        capsize=6,
        color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][: len(summary)],
    )
    axis.set_ylabel(f"IoU on {test_name}")
    axis.set_title("Segmenters trained on each set (mean ± std over seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(study.output / "iou.png", dpi=120)
    plt.close(figure)
    written.append("iou.png")
    curve = _denoiser_scalars(study, "loss")
    if curve is not None:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot(*curve, linewidth=0.8)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        figure.tight_layout()
        figure.savefig(study.output / "loss.png", dpi=120)
        plt.close(figure)
        written.append("loss.png")
    generated = [
        name
        for name in ("synthetic", *(extra.folder for extra in EXTRA_SETTINGS.values()))
        if (study.output / name).is_dir()
    ]
    if generated:
        _pairs_figure([study.output / name for name in generated], study.output / "pairs.png", plt)
        written.append("pairs.png")
    return written


def _pairs_figure(folders: list[Path], path: Path, plt, columns: int = 8) -> None:
    """The first generated pairs of each set, each image with its mask's outline: do the polyps obey the masks?"""
    figure, axes = plt.subplots(len(folders), columns, figsize=(1.3 * columns, 1.45 * len(folders)), squeeze=False)
    for row, folder in zip(axes, folders):
        pairs = load_polyp_dataset(str(folder), split="train")
        for index, axis in enumerate(row):
            axis.set_axis_off()
            if index < len(pairs):
                axis.imshow(pairs[index]["image"])
                axis.contour(np.asarray(pairs[index]["mask"].convert("L")) > 127, levels=[0.5], colors="lime",
                             linewidths=0.6)  # fmt: skip
        row[0].set_title(folder.name, fontsize=8, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _describe_fidelity(fidelity: dict, real: dict) -> str:
    test_name, on_real = next(iter(real.items()))
    return (
        f"Mask fidelity: segmenters trained on the real pairs find the polyps of the synthetic images made from "
        f"the masks they held out with IoU {fidelity['iou_mean']:.4f} ± {fidelity['iou_std']:.4f} (Dice "
        f"{fidelity['dice_mean']:.4f}) against those masks, against IoU {on_real['iou_mean']:.4f} on the real images "
        f"of {test_name}: the closer, the better the images obey their masks."
    )


def _describe_training(training: dict) -> str:
    line = (
        f"Denoiser: {training['steps']:,} optimizer steps, {training['images']:,} training images "
        f"({training['paper_share']:.1%} of the paper's {PAPER_TRAINING_IMAGES:,})"
    )
    if "images_per_s_median" in training:
        line += f", {training['images_per_s_median']:,.0f} images/s (median of the logging windows after the first)"
    return line + "."


def segmentation_run_name(setting: str, seed: int) -> str:
    """A segmentation run's folder, and (as `segmentation-NAME`) its step record: `real-synthetic-seed0`."""
    return f"{setting.replace('+', '-')}-seed{seed}"


def write_report(study: Study, arguments: dict, wall_s: float) -> dict:
    """Gathers the step records into `report.json`, `report.md` and the figures."""
    in_order = sorted(study.steps.glob("*.json"), key=lambda path: path.stat().st_mtime_ns)
    records = {path.stem: json.loads(path.read_text()) for path in in_order}
    runs = [
        records[f"segmentation-{segmentation_run_name(setting, seed)}"]["result"]
        for setting in study_settings(arguments)
        for seed in range(arguments["seeds"])
    ]
    realism = records["realism"]["result"] if "realism" in records else {"skipped": REALISM_SKIPPED}
    # Mask fidelity: real-trained segmenters on the synthetic twins of the masks they held out.
    fidelity = [run["mask_fidelity"] for run in runs if run["train"] == "real" and "mask_fidelity" in run]
    # And on each extra set's pairs made from the held-out real pairs (studies made before this have none).
    extra_fidelity = {
        setting: summarize_scores(records[f"fidelity-{EXTRA_SETTINGS[setting].folder}"]["result"])
        for setting in study_settings(arguments)[len(TRAIN_SETS) :]
        if records.get(f"fidelity-{EXTRA_SETTINGS[setting].folder}", {}).get("result")
    }
    results = segmentation_results(runs)
    if "fid" in realism:
        image_realism = fid_results(realism)
        results["markdown"] = image_realism["markdown"] + "\n\n" + results["markdown"]
        results["eval_results"] = image_realism["eval_results"] + results["eval_results"]
    figures = _figures(study, results["summary"])
    report = {
        **arguments,
        "device": describe_device(default_device()),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "command": _command_line(),
        "wall_s": {name: record["wall_s"] for name, record in records.items()},
        "this_run_s": round(wall_s, 1),
        "pairs": records["data"]["result"],  # per split of the prepared data; "data" is the source, as given
        "denoiser_training": _denoiser_training(study),
        "realism": realism,
        "mask_fidelity": summarize_scores(fidelity) if fidelity else None,
        "mask_fidelity_extra": extra_fidelity,
        "figures": figures,
        **results,
        **provenance(study.output / "synthetic"),  # for `polyp-ddpm card`: the denoiser whose results these are
    }  # fmt: skip
    lines = [
        f"# Polyp-DDPM study: preset `{arguments['preset']}`, objective `{arguments['objective']}`"
        + (f", denoiser flags `{' '.join(arguments['denoiser_args'])}`" if arguments.get("denoiser_args") else ""),
        "",
        f"Device: {report['device']}; torch {torch.__version__}, diffusers {diffusers.__version__}.",
        f"Data: `{arguments['data']}` ({', '.join(f'{k}: {v}' for k, v in report['pairs'].items())} pairs).",
        _describe_training(report["denoiser_training"]),
        "",
        results["markdown"],
        "",
        f"{realism['skipped']}." if "skipped" in realism else "",
        "",
        _describe_fidelity(report["mask_fidelity"], results["summary"]["real"]) if fidelity else "",
        *[
            f"- and the {setting} pairs made from the held-out pairs: IoU {scores['iou_mean']:.4f} ± "
            f"{scores['iou_std']:.4f} (Dice {scores['dice_mean']:.4f})."
            for setting, scores in extra_fidelity.items()
        ],
        "",
        "## Figures",
        *[f"![{name}]({name})" for name in figures],
        "",
        "## Wall time of each step (seconds)",
        "| step | s |",
        "| --- | --- |",
        *[f"| {name} | {seconds} |" for name, seconds in report["wall_s"].items()],
        "",
        "## Commands",
        *[f"- `{' '.join(record['result']['command'])}`" for name, record in records.items() if name == "denoiser"],
        "- segmenters: `training/train_segmentation.py`, flags in each `segmentation/*/results.json` (`config`).",
    ]
    write_text_atomically(study.output / "report.md", "\n".join(lines) + "\n")
    write_text_atomically(study.output / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report
