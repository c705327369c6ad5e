"""The `generate` command: synthetic pairs from the masks of a dataset (or new masks made from them), resumably,
in the project's schema."""

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow
import pyarrow.parquet
import torch
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_from_disk
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm

from .choices import DTYPE_NAMES, SAMPLERS
from .data import (
    FEATURES,
    GENERATION_SETTINGS_FILE,
    check_hub_repo,
    check_only_written_by,
    load_polyp_dataset,
    local_path_or_id,
    pair_ids,
    pairs_digest,
    png_cell,
    write_dataset,
)
from .folders import (
    OutputClaim,
    check_is_folder,
    check_output_apart,
    is_empty,
    recover_interrupted_write,
    write_text_atomically,
)
from .hub_card.cards import GENERATED_NOTE, render_dataset_card
from .hub_card.publish import UploadError, push_dataset
from .masks import MaskAugmenter, mask_statistics, plot_mask_statistics, summarize_statistics
from .modeling import default_device, make_sampler, pipeline_config_digest, unet_weights_digest
from .pipelines import ModelKindError, PolypDDPMPipeline, PolypInpaintPipeline, PolypMaskPipeline, prepare_masks
from .pipelines.pipeline_polyp_ddpm import check_positive_int, dilate
from .training_utils import CHECKPOINT_PATTERN

GENERATED_FEATURES = Features(
    {**FEATURES, "seed": Value("int64"), "model": Value("string"), "source_id": Value("string")}
)
PARTS_DIR = ".parts"
# The settings of a run: in PARTS_DIR while it is unfinished, at the top of the output once it is done. Its
# presence is what marks a folder as written by this command (and so as one that --overwrite may replace).
SETTINGS_FILE = GENERATION_SETTINGS_FILE
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}
# The largest seed a pair can record (GENERATED_FEATURES: int64).
MAX_SEED = 2**63 - 1
# Written beside a dataset of new masks: their statistics against the real masks they came from.
MASK_STATISTICS_FILE = "mask_statistics.json"
MASK_STATISTICS_PLOT = "mask_statistics.png"
# What a generated dataset's folder holds besides `data.write_dataset`'s files (`mask_fidelity.json`: the CLI's),
# and an unfinished run's parts.
OWN_ENTRIES = (SETTINGS_FILE, MASK_STATISTICS_FILE, MASK_STATISTICS_PLOT, "mask_fidelity.json", PARTS_DIR)

logger = logging.getLogger(__name__)

# Inserting polyps: the inpainting blend margin (model pixels), and how many new masks to try per frame before
# leaving it as it is when each would touch the frame's own polyp.
INSERT_BLEND_RADIUS = 4
INSERT_TRIES = 10


def load_pipeline(
    model: str,
    dtype: torch.dtype = torch.float32,
    pipeline_class=PolypDDPMPipeline,
    other_kind_flag: str | None = None,
):
    """
    `PolypDDPMPipeline.from_pretrained` (or `PolypMaskPipeline`'s) with errors that say what is wrong with a
    `--model` (or `--mask-model`) argument; a model of the other kind is pointed to `other_kind_flag` if the
    command has one.
    """
    path = Path(model)
    if path.is_dir() and not (path / "model_index.json").is_file():
        if CHECKPOINT_PATTERN.match(path.name):
            raise ValueError(
                f"{model} is a training checkpoint, not a saved pipeline: pass the training run's --output_dir "
                "(train.py saves the pipeline there at the end, and every --save_pipeline_steps)."
            )
        if any(CHECKPOINT_PATTERN.match(entry.name) for entry in path.iterdir()):
            raise ValueError(
                f"{model} is a training run without a whole saved pipeline (no model_index.json): it is running, or "
                "was stopped before its end or while saving it. Once it no longer runs, continue it with "
                "training/train.py ... --resume_from_checkpoint latest."
            )
        raise ValueError(f"{model} is not a saved {pipeline_class.__name__}: it has no model_index.json.")
    if not path.exists():
        check_hub_repo(model, "model")
    try:
        return pipeline_class.from_pretrained(model, dtype=dtype)
    except ModelKindError:
        what = "an image model" if pipeline_class is PolypMaskPipeline else "a model of masks alone"
        where = f"pass it as {other_kind_flag}" if other_kind_flag else f"{pipeline_class.__name__} cannot run it"
        raise ValueError(f"{model} is {what}: {where}.") from None
    except OSError as error:
        raise OSError(f"could not load the pipeline {model}: {error}") from error
    except (TypeError, KeyError, AttributeError) as error:  # a config edited by hand: a value of the wrong type
        raise ValueError(
            f"could not load the pipeline {model}: its configuration is damaged ({type(error).__name__}: {error})."
        ) from error


def _check_steps_fit_the_schedule(model: str | None, num_inference_steps: int) -> None:
    """
    Refuses, before anything is loaded, more steps than a local model's schedule has; the loaded pipeline checks
    the steps again with the sampler (`check_model_and_steps`), also for a Hub id.
    """
    try:
        config = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
        trained_steps = config["num_train_timesteps"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a Hub id, no model, or no readable config: loading says what is wrong
    if isinstance(trained_steps, int) and num_inference_steps > trained_steps:
        raise ValueError(
            f"--steps (num_inference_steps) is {num_inference_steps}; the schedule of {model} has {trained_steps} "
            "steps, no more."
        )


# The settings that name a model or dataset, recorded as `local_path_or_id` gives them.
PATH_SETTINGS = ("model", "mask_dataset", "mask_model")


# Digests that records of earlier versions lack.
DIGESTS_RECORDED_SINCE = (
    "model_weights_sha256", "model_config_sha256", "mask_pairs_sha256", "mask_model_weights_sha256",
    "mask_model_config_sha256",
)  # fmt: skip


def _read_settings(path: Path, settings: dict) -> dict | None:
    """
    The settings a run recorded, to compare with this run's `settings`, or None when the file is missing or damaged
    (a run killed while writing it). Paths recorded as typed (before they were resolved) are read from this folder,
    as the run that wrote them was; a record older than a digest (`DIGESTS_RECORDED_SINCE`) is taken to be of
    these weights, configuration and masks.
    """
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    recorded = {key: local_path_or_id(value) if key in PATH_SETTINGS and isinstance(value, str) else value
                for key, value in recorded.items()}  # fmt: skip
    return {**{key: settings[key] for key in DIGESTS_RECORDED_SINCE if key in settings}, **recorded}


# Recorded, but how the work is split rather than what it makes (image i depends on its seed alone): a run killed
# for memory continues with a smaller batch.
WORK_SETTINGS = ("batch_size",)


def _defining(record: dict) -> dict:
    """The settings that define what a generation makes (all but `WORK_SETTINGS`)."""
    return {key: value for key, value in record.items() if key not in WORK_SETTINGS}


def _same_generation(previous: dict | None, settings: dict) -> bool:
    return previous is not None and _defining(previous) == _defining(settings)


class OtherRunError(ValueError):
    """The output folder holds a run of `generate` with other (or unreadable) settings."""


def _check_output(output: Path, settings: dict, overwrite: bool) -> str:
    """
    A run may write to an empty or new folder, continue an unfinished run with the same settings, or (with
    `overwrite`) replace a folder this command wrote. Anything else is refused before any work. Returns what the
    run does there: "finished" (the folder holds the finished run of these settings: nothing to do), "continue"
    (its unfinished run) or "new".
    """
    parts = output / PARTS_DIR
    if parts.is_dir() and not any(parts.glob("part-*.parquet")):
        shutil.rmtree(parts)  # a run killed before its first batch was written: nothing to continue or to lose
    if parts.is_dir():
        check_only_written_by(output, "generate", OWN_ENTRIES)  # put there since the run was killed
        previous = _read_settings(parts / SETTINGS_FILE, settings)
        if _same_generation(previous, settings):
            return "continue"
        if not overwrite:
            if previous is None:
                raise OtherRunError(
                    f"{output} holds an unfinished run whose {parts / SETTINGS_FILE} is missing or damaged; pass "
                    "--overwrite to discard it, or choose another --output."
                )
            before, now = _defining(previous), _defining(settings)
            changed = {k: (before.get(k), now.get(k)) for k in {*before, *now} if before.get(k) != now.get(k)}
            raise OtherRunError(
                f"{output} holds an unfinished run with other settings {changed}; run the same command "
                "again to continue it, pass --overwrite to discard it, or choose another --output."
            )
        shutil.rmtree(parts)
    elif (output / SETTINGS_FILE).is_file() and not overwrite:
        if _same_generation(_read_settings(output / SETTINGS_FILE, settings), settings):
            return "finished"
        raise OtherRunError(
            f"{output} already holds a dataset generated with other settings; pass --overwrite to replace "
            "it, or choose another --output."
        )
    elif (output / SETTINGS_FILE).is_file():  # replaced with --overwrite, unless it holds files of others
        check_only_written_by(output, "generate", OWN_ENTRIES)
    elif not is_empty(output):  # the branches above took every folder holding SETTINGS_FILE
        raise FileExistsError(
            f"{output} is not empty and was not written by `polyp-ddpm generate`; it is left "
            "alone. Choose another --output."
        )
    return "new"


def _record_settings(parts: Path, settings: dict) -> None:
    """Writes the run's settings into `parts` atomically: a kill leaves the old file or the new one, never half."""
    parts.mkdir(parents=True, exist_ok=True)
    write_text_atomically(parts / SETTINGS_FILE, json.dumps(settings, indent=2))


def generate_dataset(
    model: str,
    mask_dataset: str,
    output: str | os.PathLike,
    split: str = "train",
    num_images_per_mask: int = 1,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    new_masks: int | None = None,
    mask_augment: bool = False,
    start_timestep: int | None = None,
    mask_model: str | None = None,
    insert: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    model_flags: tuple[str, str] | None = None,
) -> DatasetDict:
    """
    Generates `num_images_per_mask` images for every mask of `mask_dataset[split]` and writes the pairs as a
    `DatasetDict` (one split, named like the source split) with `GENERATED_FEATURES`.

    With `new_masks=N` and `mask_augment=True`, the masks are instead N new ones made from the masks of
    `mask_dataset[split]` by `masks.MaskAugmenter` (mask `j` from `seed` and `j`); their ids are
    `newmask-J-synK` and `source_id` names the real masks each came from (`a+b` for two). The statistics of the
    new masks against the real ones are written beside the dataset (`mask_statistics.json`, and
    `mask_statistics.png` when matplotlib is installed).

    Image `i` is generated with seed `seed + i` by a generator of its own on the sampling device (no noise is
    drawn on the CPU and copied for a GPU), so results do not depend on `batch_size` or interruptions; the same
    seed gives other images on a CPU than on a GPU. `compile` compiles the UNet (`torch.compile`, `compile_mode`)
    before sampling: worth it when sampling takes longer than the compilation; it changes images only by
    floating-point rounding, so it is not part of the settings a rerun must match. The requests go in as few
    batches of at most `batch_size` as there can be, of one size but a shorter last one (`even_batches`);
    compiled, a batch smaller than the largest (the last one, or one between the parts of a continued run) is
    padded to its size (the padding is dropped), so the UNet is compiled once; not with `insert`, whose batches
    are as many as the frames that take a polyp.
    Each batch is written to `output/.parts/` as one file named by the requests it holds, atomically; a rerun
    with the same settings skips the batches already there and continues, and the dataset is made of exactly
    those files (any other file there is ignored). The dataset replaces the folder once every batch is done.
    `num_inference_steps` defaults to 250 for DDPM (the trained chain) and 50 for the other samplers.
    `start_timestep` starts every chain there from the model's `start_color` (see `PolypDDPMPipeline`).

    With `insert=True` (and new masks), each new mask's polyp is inserted into a real frame of the split
    instead (`PolypInpaintPipeline`): into frame `j` modulo the split's size goes new mask `j`, or, if its edit
    region would touch the frame's own polyp, the first of masks `j + N`, `j + 2N`, ... that does not (up to
    `INSERT_TRIES`; none: the frame is left as it is). The pair's mask holds both polyps, and `source_id` names
    the frame. With a mask model, mask seeds follow the image seeds, and the masks are sampled with the images'
    sampler and steps. `model_flags`: the calling command's names
    for `model` and `mask_model`, for the error that a model was given as the other kind.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler is {sampler!r}; expected one of {SAMPLERS}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; expected one of {sorted(DTYPES)}.")
    if num_inference_steps is None:
        num_inference_steps = 250 if sampler == "ddpm" else 50
    for name, value in (
        ("num_images_per_mask", num_images_per_mask),
        ("batch_size", batch_size),
        ("num_inference_steps", num_inference_steps),
    ):
        check_positive_int(value, name)
    if new_masks is not None:
        check_positive_int(new_masks, "new_masks")
        if mask_augment == (mask_model is not None):
            raise ValueError(
                f"new_masks needs {'one way' if mask_augment else 'a way'} to make the masks, not "
                f"{'both' if mask_augment else 'none'}: mask_augment=True (--mask-augment: real masks "
                "deformed, moved, resized and combined) or mask_model=PATH (--mask-model: a PolypMaskPipeline that "
                "training/train.py --mask_model trained)."
            )
    elif mask_augment or mask_model is not None:
        raise ValueError("mask_augment and mask_model make new masks: say how many with new_masks=N (--new-masks N).")
    if insert and (new_masks is None or sampler == "dpmsolver" or start_timestep is not None):
        raise ValueError(
            "insert puts the polyps of new masks into real frames: it needs new_masks (--new-masks N with "
            "--mask-augment or --mask-model), the ddpm or ddim sampler (inpainting resamples, which multistep "
            "solvers cannot), and no start_timestep."
        )
    output = Path(output)
    check_is_folder(output)
    inputs = {"model": model, "mask dataset": mask_dataset, "mask model": mask_model}
    check_output_apart(output, {name: path for name, path in inputs.items() if path is not None})
    for path in (model, mask_model):
        _check_steps_fit_the_schedule(path, num_inference_steps)
    source = load_polyp_dataset(mask_dataset, split=split)
    num_masks = len(source) if new_masks is None else new_masks
    # Each image's seed (and a mask model's, after them; compiled, padding's) is kept as an int64 with its pair.
    seeds_used = _first_mask_seed(0, num_masks, num_images_per_mask) + num_masks + batch_size
    if not -(MAX_SEED + 1) <= seed <= MAX_SEED - seeds_used:
        raise ValueError(
            f"seed is {seed}; this generation draws {seeds_used} seeds from it on, so it must lie between "
            f"{-(MAX_SEED + 1)} and {MAX_SEED - seeds_used}."
        )
    # One run writes in `output` at a time: a second would restart or replace the parts the first is writing.
    # The claim lies beside the output, which is replaced whole at the end.
    with OutputClaim(output, beside=True):
        recover_interrupted_write(output)
        source_ids = pair_ids(source, split)
        # Paths resolved: what reads them later (the card's model check, the segmenter's leakage check) runs
        # from other folders.
        settings = {
            "model": local_path_or_id(model),
            # The weights themselves: a model trained again in its folder makes another generation.
            "model_weights_sha256": unet_weights_digest(model),
            # And how it samples (its start colour and timestep, its schedule): edited, the images change too.
            "model_config_sha256": pipeline_config_digest(model),
            "mask_dataset": local_path_or_id(mask_dataset),
            # The masks themselves: the dataset prepared again in its folder makes another generation.
            "mask_pairs_sha256": pairs_digest(source),
            "split": split,
            "num_images_per_mask": num_images_per_mask,
            "sampler": sampler,
            "num_inference_steps": num_inference_steps,
            "seed": seed,
            "batch_size": batch_size,
            "dtype": dtype,
            "num_masks": len(source),
            "noise_device": torch.device(device or default_device()).type,
            "start_timestep": start_timestep,
        }
        if new_masks is not None and mask_model is None:
            settings.update(new_masks=new_masks, mask_augment=MaskAugmenter.default_config())
        elif new_masks is not None:
            settings.update(
                new_masks=new_masks,
                mask_model=local_path_or_id(mask_model),
                mask_model_weights_sha256=unet_weights_digest(mask_model),
                mask_model_config_sha256=pipeline_config_digest(mask_model),
            )
        if insert:
            settings.update(insert=True)
        if (state := _check_output(output, settings, overwrite)) == "finished":
            print(f"{output} already holds this generation (same settings): nothing to do.")
            return load_from_disk(str(output))
        pipeline = load_pipeline(model, DTYPES[dtype], other_kind_flag=model_flags and model_flags[1])
        pipeline.scheduler = make_sampler(sampler, pipeline.scheduler.config)
        pipeline.check_model_and_steps(num_inference_steps)  # now, not at the first batch in mid-progress-bar
        pipeline.to(device or default_device())
        pipeline.set_progress_bar_config(disable=True)
        if compile:  # in place, so the inpainting pipeline made from it below shares the compiled UNet
            pipeline.unet.compile(mode=compile_mode)
        mask_statistics_of = None  # new masks: (real masks' statistics, how the new ones were made)
        if new_masks is not None:
            real_masks = (row["mask"] for row in source.select_columns(["mask"]))
            if mask_model is None:
                augmenter = MaskAugmenter(real_masks, pipeline.sample_size, seed=seed, ids=source_ids)
                masks_of = _new_masks(augmenter)
                mask_statistics_of = (augmenter.statistics, {"mask_augment": augmenter.config})
            else:
                mask_pipeline = _load_mask_model(
                    mask_model, pipeline, model, dtype, sampler, num_inference_steps, model_flags and model_flags[0]
                )
                first_seed = _first_mask_seed(seed, num_masks, num_images_per_mask)
                masks_of = _model_masks(mask_pipeline, first_seed, batch_size, num_inference_steps)
                real = prepare_masks(list(real_masks), pipeline.sample_size)[:, 0].numpy()
                mask_statistics_of = (mask_statistics(real), {"mask_model": mask_model})
        else:
            masks_of = _real_masks(source, source_ids)
        inpaint = None
        if insert:
            inpaint = PolypInpaintPipeline.from_pipe(pipeline)
            inpaint.set_progress_bar_config(disable=True)
            # The mask statistics at the end take every new mask as drawn: the ones the batches drew are kept.
            masks_of = _drawn_once(masks_of)

        parts = output / PARTS_DIR
        requests = [(row, k) for row in range(num_masks) for k in range(num_images_per_mask)]
        plan = _plan_batches(parts, len(requests), batch_size, resuming=state == "continue")
        part_files = [part for _, part, _ in plan]
        to_make = [len(span) for span, _, is_whole in plan if not is_whole]
        # Compiled, every batch is padded to the largest: another shape would compile the UNet again (and, with
        # reduce-overhead, capture another CUDA graph), for as long as the first time.
        compiled_batch_size = max(to_make) if compile and to_make else None
        # A continued run's settings are recorded again: a record of an earlier version lacks some digests.
        recorded = False
        if done := sum(len(span) for span, _, is_whole in plan if is_whole):
            print(f"Resuming the generation in {output}: {done} of {len(requests)} images are there already.")
        for span, part, is_whole in tqdm(plan, desc="Generating", unit="batch"):
            if is_whole:
                continue
            if part.exists():
                logger.warning(
                    f"{part} is damaged (unreadable, or not its {len(span)} pairs): its batch is generated again."
                )
            start, batch = span.start, requests[span.start : span.stop]
            seeds = [seed + start + offset for offset in range(len(batch))]
            generators = seeded_generators(pipeline.device, seeds)
            if inpaint is not None:
                frames = source.select([row % len(source) for row, _ in batch])
                rows = [row for row, _ in batch]
                images, masks = _insert_polyps(
                    inpaint, frames, rows, masks_of, num_masks, generators, num_inference_steps
                )
                names = {row: (source_ids[row % len(source)], f"inserted-{row:05d}") for row, _ in batch}
            else:
                by_index = masks_of(sorted({row for row, _ in batch}))
                batch_masks = [by_index[row][0] for row, _ in batch]
                if compiled_batch_size is not None and len(batch) < compiled_batch_size:
                    # The padding repeats a mask, with the seeds that follow the batch's, and is dropped.
                    padding = range(len(batch), compiled_batch_size)
                    batch_masks += batch_masks[-1:] * len(padding)
                    generators += seeded_generators(pipeline.device, [seed + start + i for i in padding])
                out = pipeline(
                    batch_masks,
                    num_inference_steps=num_inference_steps,
                    generator=generators,
                    batch_size=batch_size,
                    output_type="pil",
                    start_timestep=start_timestep,
                )
                images, masks = out.images[: len(batch)], out.masks[: len(batch)]
                names = {row: by_index[row][1:] for row, _ in batch}
            records = [
                _pair_record(image, mask, image_seed, names[row], k, model)
                for (row, k), image, mask, image_seed in zip(batch, images, masks, seeds)
            ]
            # The run is recorded only once it produces, so a command that failed before its first image leaves
            # nothing behind that a corrected command would trip over.
            if not recorded:
                _record_settings(parts, settings)
                recorded = True
            staging = part.with_suffix(".partial")
            Dataset.from_list(records, features=GENERATED_FEATURES).to_parquet(str(staging))
            os.replace(staging, part)

        generated = _assemble(part_files)
        dataset = DatasetDict({split: generated})
        card = _card(settings, len(generated))
        extra_files = {SETTINGS_FILE: json.dumps(settings, indent=2)}
        if mask_statistics_of is not None:
            if insert:  # the saved masks also hold the frames' polyps: the new ones as drawn, before redraws
                new = [mask for mask, _, _ in masks_of(list(range(num_masks))).values()]
            else:
                new = generated.select(range(0, len(generated), num_images_per_mask))["mask"]
            extra_files.update(_mask_statistics_files(*mask_statistics_of, new))
        # Replaces the folder (and the finished parts in it) only once the whole dataset is written, and not over
        # files put there while it ran: refused, the same command then finds its parts and continues.
        write_dataset(
            dataset,
            output,
            card,
            overwrite=True,
            extra_files=extra_files,
            before_replacing=lambda: check_only_written_by(output, "generate", OWN_ENTRIES),
        )
        return dataset


def push_generated(output: str | os.PathLike, repo_id: str) -> None:
    """Uploads a generated dataset as `generate` saved it, with its card, to a Hub dataset repo."""
    try:
        push_dataset(load_from_disk(str(output)), (Path(output) / "README.md").read_text(), repo_id, output)
    except UploadError as error:
        raise UploadError(
            f"{error} Or run the same generate command again: it finds the pairs made and uploads them."
        ) from error


def _load_mask_model(
    mask_model: str, pipeline, model: str, dtype: str, sampler: str, num_inference_steps: int, other_kind_flag
) -> PolypMaskPipeline:
    """
    The mask model on the image model's device, sampling like it (the same sampler and steps: `--sampler`,
    `--steps`); refused unless it makes masks of the images' size.
    """
    mask_pipeline = load_pipeline(mask_model, DTYPES[dtype], PolypMaskPipeline, other_kind_flag).to(pipeline.device)
    mask_pipeline.set_progress_bar_config(disable=True)
    if mask_pipeline.sample_size != pipeline.sample_size:
        raise ValueError(
            f"the mask model {mask_model} makes {mask_pipeline.sample_size} masks and the model {model} "
            f"{pipeline.sample_size} images: train the mask model at the image model's size (--resolution)."
        )
    mask_pipeline.scheduler = make_sampler(sampler, mask_pipeline.scheduler.config)
    mask_pipeline.check_model_and_steps(num_inference_steps)
    return mask_pipeline


def _pair_record(image, mask, seed: int, names: tuple[str, str], k: int, model: str) -> dict:
    """One generated pair in `GENERATED_FEATURES`: image `k` of the mask named by `names` (source id, id stem)."""
    source_id, name = names
    return {
        "image": png_cell(image),
        "mask": png_cell(mask),
        "id": f"{name}-syn{k}",
        "width": image.width,
        "height": image.height,
        "seed": seed,
        "model": model,
        "source_id": source_id,
    }


def _assemble(part_files: list[Path]) -> Dataset:
    """
    The parts as one dataset. A part whose footer is whole but whose pairs cannot be read (damaged on disk) is
    found only here: it is set aside (`.damaged`), so that the same command generates its batch again.
    """
    try:
        return concatenate_datasets([Dataset.from_parquet(str(p), features=GENERATED_FEATURES) for p in part_files])
    except (DatasetGenerationError, OSError, pyarrow.ArrowException) as error:
        # Read apart from the datasets cache: a cache that cannot be written (a full disk) fails every part alike.
        damaged = [part for part in part_files if _is_damaged(part)]
        if not damaged:
            raise OSError(f"the generated parts could not be assembled: {error.__cause__ or error}") from error
        for part in damaged:
            os.replace(part, part.with_suffix(".damaged"))
        raise ValueError(
            f"{len(damaged)} generated part(s) could not be read, damaged on disk ({', '.join(map(str, damaged))}), "
            "and were set aside as .damaged: run the same command again to generate their batches again."
        ) from error


def _is_damaged(part: Path) -> bool:
    """
    Whether a page of a part file does not decode (read by pyarrow alone: no copy into the datasets cache). An
    error of the system (an `OSError` with an errno: permissions, a full disk) is not damage.
    """
    try:
        pyarrow.parquet.read_table(part)
    except pyarrow.ArrowInvalid:
        return True
    except OSError as error:  # pyarrow's own (a page header that does not parse) have no errno
        return error.errno is None
    return False


def _is_whole_part(part: Path, num_pairs: int) -> bool:
    """
    Whether a part file's parquet footer is readable and counts its batch's pairs. Parts are written atomically, but a
    disk problem can still truncate one, and the dataset cannot be assembled until its batch is generated again.
    """
    try:
        return pyarrow.parquet.read_metadata(part).num_rows == num_pairs
    except (OSError, pyarrow.ArrowException):
        return False


PART_NAME = re.compile(r"part-(\d+)-(\d+)\.parquet")  # zero-padded to 6 digits, longer from a million on


def _plan_batches(parts: Path, num_requests: int, batch_size: int, resuming: bool) -> list[tuple[range, Path, bool]]:
    """
    The batches of a run, each `(requests, part file, whole)`: when `resuming` an unfinished run of the same
    generation, the whole parts it wrote in `parts` (whatever batch size it had), and `even_batches` of
    `batch_size` for the requests between them.
    """
    written = []  # (requests, part) of the whole parts, in order, none overlapping another
    named = [(part, PART_NAME.fullmatch(part.name)) for part in parts.glob("part-*.parquet")] if resuming else []
    spans = sorted(
        ((range(int(match[1]), int(match[2])), part) for part, match in named if match is not None),
        key=lambda span_and_part: span_and_part[0].start,
    )
    for span, part in spans:
        follows = not written or span.start >= written[-1][0].stop
        if 0 < len(span) and span.stop <= num_requests and follows and _is_whole_part(part, len(span)):
            written.append((span, part))
    plan, position = [], 0
    for span, part in [*written, (range(num_requests, num_requests), None)]:
        for batch in even_batches(span.start - position, batch_size):
            to_make = range(position + batch.start, position + batch.stop)
            plan.append((to_make, parts / f"part-{to_make.start:06d}-{to_make.stop:06d}.parquet", False))
        if part is not None:
            plan.append((span, part, True))
        position = span.stop
    return plan


def even_batches(num_requests: int, batch_size: int) -> list[range]:
    """
    The requests in as few batches of at most `batch_size` as there can be, all of one size but a shorter last
    one (898 in batches of up to 512: 449 and 449, not 512 and 386): a compiled UNet pads a short last batch to
    the others' size.
    """
    count = math.ceil(num_requests / batch_size)
    size = math.ceil(num_requests / count) if count else batch_size
    return [range(start, min(start + size, num_requests)) for start in range(0, num_requests, size)]


def blend_margin(frame_size: tuple[int, int], sample_size: tuple[int, int]) -> int:
    """
    How far, in frame pixels, inpainting's blend may reach beyond a new polyp: the model's blend radius scaled along
    the frame's more squeezed side (a frame of another aspect is resized to the model's size, unevenly).
    """
    scale = max(frame / model for frame, model in zip(frame_size, sample_size))
    return math.ceil((INSERT_BLEND_RADIUS + 1) * scale)


def _insert_polyps(
    inpaint, frames: Dataset, rows: list[int], masks_of, stride: int, generators: list, num_inference_steps: int
):
    """
    New polyps inserted into frames, frames of one size at once: the images, and masks that hold both polyps.
    Frame `i` gets new mask `rows[i]` or, when its edit region would touch the frame's own polyp (inpainting
    would paint that polyp away while the pair's mask still marked it), the first clear one of `rows[i] + stride`,
    `rows[i] + 2 * stride`, ... (`INSERT_TRIES` in all); when none is clear, the frame stays as it is.
    """
    drawn = masks_of(sorted(set(rows)))  # the first candidates, drawn together; redraws one by one
    images, masks = [], []
    for pair, row in zip(frames, rows):
        frame = pair["image"].convert("RGB")
        size = (frame.height, frame.width)
        own = prepare_masks([pair["mask"]], size)
        margin = blend_margin((frame.height, frame.width), inpaint.sample_size)
        keep_clear = dilate(own, margin)[0, 0].numpy() > 0.5
        new = np.zeros(size, dtype=bool)
        for attempt in range(INSERT_TRIES):
            index = row + attempt * stride
            candidate = drawn[row][0] if attempt == 0 else masks_of([index])[index][0]
            candidate = prepare_masks([candidate], size)[0, 0].numpy() > 0.5
            if candidate.any() and not (candidate & keep_clear).any():
                new = candidate
                break
        images.append(frame)
        masks.append((new, own[0, 0].numpy() > 0.5))
    if kept := sum(not new.any() for new, _ in masks):
        logger.warning(
            f"{kept} of {len(masks)} frames had no place for a new polyp clear of their own ({INSERT_TRIES} masks "
            "tried each): they are kept as they are, pairs of a real frame and its own mask."
        )
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, (image, (new, _)) in enumerate(zip(images, masks)):
        if new.any():
            by_size.setdefault(image.size, []).append(index)
    for indices in by_size.values():
        out = inpaint(
            image=[images[i] for i in indices],
            mask_image=[masks[i][0].astype(np.uint8) * 255 for i in indices],
            generator=[generators[i] for i in indices],
            num_inference_steps=num_inference_steps,
            blend_radius=INSERT_BLEND_RADIUS,
            batch_size=len(indices),
            output_type="pil",
        )
        for i, image in zip(indices, out.images):
            images[i] = image
    both = [PIL.Image.fromarray((new | own).astype(np.uint8) * 255, mode="L") for new, own in masks]
    return images, both


def _real_masks(source: Dataset, source_ids: list[str]):
    """For rows of the source: `{row: (mask, source_id, id stem)}`, the masks of the source itself."""

    def masks_of(rows: list[int]) -> dict:
        return {row: (pair["mask"], source_ids[row], source_ids[row]) for row, pair in zip(rows, source.select(rows))}

    return masks_of


def _new_masks(augmenter: MaskAugmenter):
    """For indices of new masks: `{index: (mask, source_id, id stem)}`, each mask made from the seed and its index."""

    def masks_of(indices: list[int]) -> dict:
        made = {index: augmenter(index) for index in indices}
        return {
            index: (mask, augmenter.source_id(sources), f"newmask-{index:05d}")
            for index, (mask, sources) in made.items()
        }

    return masks_of


def _drawn_once(masks_of):
    """`masks_of` that draws each index once and keeps it: a new mask is made from its index alone."""
    drawn = {}

    def remembered(indices: list[int]) -> dict:
        missing = [index for index in indices if index not in drawn]
        if missing:
            drawn.update(masks_of(missing))
        return {index: drawn[index] for index in indices}

    return remembered


def _first_mask_seed(seed: int, num_masks: int, num_images_per_mask: int) -> int:
    """A mask model's mask `j` uses this + `j`: after the images' seeds (seed + i), so none shares its noise."""
    return seed + num_masks * num_images_per_mask


def seeded_generators(device: torch.device, seeds: list[int]) -> list[torch.Generator]:
    """
    One generator per image, on `device`, so each image depends on its seed alone. `device` is read once by the
    caller: a pipeline's `device` looks through all its modules each time (0.8 ms on 2 CPU cores, per image).
    """
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def _model_masks(mask_pipeline: PolypMaskPipeline, seed: int, batch_size: int, num_inference_steps: int):
    """
    For indices of new masks: `{index: (mask, source_id, id stem)}`, mask `j` drawn by the mask model with seed
    `seed + j`, `batch_size` at once, in `num_inference_steps` of its scheduler.
    """

    def masks_of(indices: list[int]) -> dict:
        generators = seeded_generators(mask_pipeline.device, [seed + index for index in indices])
        masks = mask_pipeline(
            num_masks=len(indices),
            generator=generators,
            batch_size=batch_size,
            num_inference_steps=num_inference_steps,
        ).masks
        return {index: (mask, "mask-model", f"newmask-{index:05d}") for index, mask in zip(indices, masks)}

    return masks_of


def _mask_statistics_files(real: dict, method: dict, new_masks: list) -> dict[str, str | bytes]:
    """Area fraction and components of the new masks against the real ones: JSON, and a PNG when matplotlib is here."""
    new = mask_statistics([np.asarray(mask) for mask in new_masks])
    summary = {"real": summarize_statistics(real), "new": summarize_statistics(new), **method}
    files = {MASK_STATISTICS_FILE: json.dumps(summary, indent=2)}
    try:
        files[MASK_STATISTICS_PLOT] = plot_mask_statistics(real, new, labels=("real training masks", "new masks"))
    except ImportError as error:
        logger.warning(f"{MASK_STATISTICS_PLOT} is left out: {error}")
    return files


def _card(settings: dict, count: int) -> str:
    if "new_masks" in settings:
        if "mask_model" in settings:
            masks = (
                f"{settings['new_masks']} new masks drawn by the mask model `{settings['mask_model']}` (a "
                f"`PolypMaskPipeline`), {settings['num_images_per_mask']} image(s) each; mask `j` used seed "
                f"{_first_mask_seed(settings['seed'], settings['new_masks'], settings['num_images_per_mask'])} + `j` "
                f"(after the images' seeds). Their statistics against the real masks of `{settings['mask_dataset']}` "
                f"(split `{settings['split']}`): `{MASK_STATISTICS_FILE}`"
            )
        else:
            masks = (
                f"{settings['new_masks']} new masks made by `--mask-augment` (elastic and affine deformation and "
                f"composition of real polyps, sizes and positions drawn from the real masks) from the masks of "
                f"`{settings['mask_dataset']}` (split `{settings['split']}`, {settings['num_masks']} masks), "
                f"{settings['num_images_per_mask']} image(s) each; mask `j` is made from seed {settings['seed']} and "
                "`j`, and `source_id` names the real masks each came from (`a+b` for two). Their statistics against "
                f"the real masks: `{MASK_STATISTICS_FILE}`"
            )
        if settings.get("insert"):
            masks += (
                "; each new mask's polyp inserted into a real frame of the split (RePaint), the pair's mask holding "
                "the frame's own polyp and the new one, `source_id` naming the frame"
            )
        description = (
            f"Generated by `polyp-ddpm generate` with the model `{settings['model']}` from {masks}. "
            f"{settings['sampler']} sampler with {settings['num_inference_steps']} steps, {settings['dtype']}. Image "
            f"`i` used seed {settings['seed']} + i (column `seed`)."
        )
    else:
        description = (
            f"Generated by `polyp-ddpm generate` with the model `{settings['model']}` from the masks of "
            f"`{settings['mask_dataset']}` (split `{settings['split']}`, {settings['num_masks']} masks, "
            f"{settings['num_images_per_mask']} image(s) each), {settings['sampler']} sampler with "
            f"{settings['num_inference_steps']} steps, {settings['dtype']}. Image `i` used seed "
            f"{settings['seed']} + i (column `seed`); `source_id` names the mask's pair in the source."
        )
    return render_dataset_card(
        {settings["split"]: count},
        source_description=description,
        split_description=f"one split, `{settings['split']}`, named after the source split of the masks.",
        synthetic_note=GENERATED_NOTE,
        title="Synthetic polyp image/mask pairs",
        license_note="Generated images inherit the terms of the model and of the data it was trained on.",
    )
