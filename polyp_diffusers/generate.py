"""Generate synthetic image/mask pairs from the masks of a dataset, resumably, in the project's schema."""

import json
import os
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets
from tqdm.auto import tqdm

from .data import FEATURES, load_polyp_dataset, png_cell, write_dataset
from .modeling import SAMPLERS, make_sampler
from .pipelines import PolypDDPMPipeline

GENERATED_FEATURES = Features(
    {**FEATURES, "seed": Value("int64"), "model": Value("string"), "source_id": Value("string")}
)
PARTS_DIR = ".parts"
SETTINGS_FILE = "generation.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_pipeline(model: str, sampler: str, device: str, dtype: str) -> PolypDDPMPipeline:
    pipeline = PolypDDPMPipeline.from_pretrained(model)
    pipeline.scheduler = make_sampler(sampler, pipeline.scheduler.config)
    pipeline.to(device, DTYPES[dtype])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_dataset(
    model: str,
    masks: str,
    output: str | os.PathLike,
    split: str = "train",
    num_images_per_mask: int = 1,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "fp32",
    push_to_hub: str | None = None,
) -> DatasetDict:
    """
    Generates `num_images_per_mask` images for every mask of `masks[split]` and writes the pairs as a
    `DatasetDict` (one split, named like the source split) with `GENERATED_FEATURES`.

    Image `i` is generated with seed `seed + i`, so results do not depend on `batch_size` or interruptions.
    Each batch is written to `output/.parts/` as one file, atomically; a rerun with the same settings skips the
    batches already there and continues. The dataset is assembled once every batch is done.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler is {sampler!r}; expected one of {SAMPLERS}.")
    num_inference_steps = num_inference_steps or (250 if sampler == "ddpm" else 50)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = Path(output)
    source = load_polyp_dataset(masks, split=split)
    settings = {
        "model": model, "masks": masks, "split": split, "num_images_per_mask": num_images_per_mask,
        "sampler": sampler, "num_inference_steps": num_inference_steps, "seed": seed, "batch_size": batch_size,
        "dtype": dtype, "num_masks": len(source),
    }
    parts = output / PARTS_DIR
    if (output / "dataset_dict.json").exists():
        raise FileExistsError(f"{output} already holds a finished dataset; choose another --output.")
    if (parts / SETTINGS_FILE).exists():
        previous = json.loads((parts / SETTINGS_FILE).read_text())
        if previous != settings:
            changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
            raise ValueError(f"{output} holds an unfinished run with other settings {changed}; use another --output.")
    parts.mkdir(parents=True, exist_ok=True)
    (parts / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    pipeline = _load_pipeline(model, sampler, device, dtype)
    requests = [(row, k) for row in range(len(source)) for k in range(num_images_per_mask)]
    batches = range(0, len(requests), batch_size)
    progress = tqdm(batches, desc="Generating", unit="batch")
    for start in progress:
        part = parts / f"part-{start // batch_size:06d}.parquet"
        if part.exists():
            continue
        batch = requests[start : start + batch_size]
        indices = sorted({row for row, _ in batch})
        by_index = dict(zip(indices, source.select(indices)))
        seeds = [seed + start + offset for offset in range(len(batch))]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipeline(
            [by_index[row]["mask"] for row, _ in batch], num_inference_steps=num_inference_steps,
            generator=generators, batch_size=batch_size, output_type="pil",
        )
        records = []
        for (row, k), image, mask, image_seed in zip(batch, out.images, out.masks, seeds):
            source_id = by_index[row]["id"]
            records.append({
                "image": png_cell(image), "mask": png_cell(mask), "id": f"{source_id}-syn{k}", "width": image.width,
                "height": image.height, "seed": image_seed, "model": model, "source_id": source_id,
            })
        staging = part.with_suffix(".partial")
        Dataset.from_list(records, features=GENERATED_FEATURES).to_parquet(str(staging))
        os.replace(staging, part)

    part_files = sorted(parts.glob("part-*.parquet"))
    generated = concatenate_datasets([Dataset.from_parquet(str(p), features=GENERATED_FEATURES) for p in part_files])
    dataset = DatasetDict({split: generated})
    card = _card(settings, len(generated))
    # Replaces the folder (and the finished parts in it) only once the whole dataset is written.
    write_dataset(dataset, output, card, overwrite=True)
    if push_to_hub:
        from .hub_card.cards import push_dataset

        push_dataset(dataset, card, push_to_hub)
    return dataset


def _card(settings: dict, count: int) -> str:
    from .hub_card.cards import GENERATED_NOTE, render_dataset_card

    return render_dataset_card(
        {settings["split"]: count},
        source_description=(
            f"Generated by `polyp-ddpm generate` with the model `{settings['model']}` from the masks of "
            f"`{settings['masks']}` (split `{settings['split']}`, {settings['num_masks']} masks, "
            f"{settings['num_images_per_mask']} image(s) each), {settings['sampler']} sampler with "
            f"{settings['num_inference_steps']} steps, {settings['dtype']}. Image `i` used seed "
            f"{settings['seed']} + i (column `seed`); `source_id` names the mask's pair in the source."
        ),
        split_description=f"one split, `{settings['split']}`, named after the source split of the masks.",
        synthetic_note=GENERATED_NOTE,
        title="Synthetic polyp image/mask pairs",
        license_note="Generated images inherit the terms of the model and of the data it was trained on.",
    )
