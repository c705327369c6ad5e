"""What each `polyp-ddpm` subcommand does once `cli` has parsed its arguments: each `run_<subcommand>(args)` calls
the function that holds its algorithm."""

import json
import sys
from pathlib import Path

from datasets import DatasetDict

from .choices import FIDELITY_BATCH_SIZE
from .convert_official import convert_official_checkpoint, write_converted_pipeline
from .data import load_polyp_dataset, parse_dataset_spec
from .folders import check_result_file, write_text_atomically
from .generate import generate_dataset, load_pipeline, push_generated
from .hub_card.cards import check_results_file, updated_model_card_files
from .hub_card.publish import hub_repo_id
from .metrics import dinov2_extractor, fid_kid, load_extractor
from .modeling import default_device
from .prepare_data import prepare_dataset
from .results import (
    check_results_of,
    distance_names,
    few_images_note,
    fid_results,
    kid_text,
    mask_fidelity_results,
    provenance,
)


def run_prepare_data(args):
    dataset = prepare_dataset(
        args.source,
        args.output,
        test_size=args.test_size,
        seed=args.seed,
        split_file=args.split_file,
        skip_invalid=args.skip_invalid,
        resolution=args.resolution,
        image_dir=args.image_dir,
        mask_dir=args.mask_dir,
        source_terms=args.source_terms,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        hub_dataset_id=args.hub_id,
        demo_pairs=args.demo_pairs,
    )
    counts = ", ".join(f"{name}: {len(part)}" for name, part in dataset.items())
    print(f"Wrote {args.output} ({counts})")


def run_convert_official(args):
    repo_id = hub_repo_id(args.hub_id, args.output, "--hub-id") if args.push_to_hub else args.hub_id
    pipeline, description = convert_official_checkpoint(args.checkpoint, args.weights, args.keep_rgb_mask)
    write_converted_pipeline(pipeline, description, args.output, args.push_to_hub, repo_id)
    config = description["config"]
    print(
        f"Converted {args.checkpoint} ({args.weights} weights, step {description['step']}, {config['image_size']} px, "
        f"{description['mask_channels']} mask channel(s)) to {args.output}"
    )


def run_generate(args):
    repo_id = hub_repo_id(args.hub_id, args.output, "--hub-id") if args.push_to_hub else None
    segmenter = None
    if args.fidelity_segmenter:  # loaded first: a wrong folder fails before the sampling, not after it
        from .segmentation import load_trained_segmenter  # the [eval] extra (MONAI, transformers)

        segmenter = load_trained_segmenter(args.fidelity_segmenter)
    dataset = generate_dataset(
        args.model,
        args.mask_dataset,
        args.output,
        split=args.split,
        num_images_per_mask=args.num_images_per_mask,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        new_masks=args.new_masks,
        mask_augment=args.mask_augment,
        start_timestep=args.start_timestep,
        mask_model=args.mask_model,
        insert=args.insert,
        compile=args.compile or args.compile_mode is not None,
        compile_mode=args.compile_mode,
        model_flags=("--model", "--mask-model"),
    )
    # True of a new run, a continued one, and one that found nothing to do.
    print(f"{args.output} holds {len(dataset[args.split])} generated pairs ({args.split} split)")
    if segmenter is not None:
        scores = _score_mask_fidelity(
            segmenter, args.fidelity_segmenter, dataset[args.split], f"{args.output}:{args.split}",
            FIDELITY_BATCH_SIZE, args.device,
        )  # fmt: skip
        write_text_atomically(Path(args.output) / "mask_fidelity.json", json.dumps(scores, indent=2) + "\n")
    if repo_id is not None:  # last: a failed upload loses no score, and the same command uploads again
        push_generated(args.output, repo_id)


def run_fid(args):
    if args.output:
        check_result_file(args.output, "scores")
    real = load_polyp_dataset(args.real, split=args.real_split)
    generated = load_polyp_dataset(args.generated, split=args.generated_split)
    if isinstance(generated, DatasetDict):
        if len(generated) != 1:
            raise ValueError(f"{args.generated} has splits {sorted(generated)}; choose one with --generated-split.")
        generated = next(iter(generated.values()))
    if args.feature_extractor:
        extractor = load_extractor(args.feature_extractor)
    else:
        extractor = dinov2_extractor(args.dinov2_weights) if args.features == "dinov2" else None
    scores = fid_kid(
        real,
        generated,
        extractor=extractor,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
        image_size=args.image_size,
        device=args.device or default_device(),
    )
    scores.update(real=f"{args.real}:{args.real_split}", generated=args.generated)
    fid_name, kid_name = distance_names(scores)
    print(
        f"{fid_name} {scores['fid']:.2f}   {kid_name} {kid_text(scores)}   "
        f"({scores['num_generated']} generated vs {scores['num_real']} real, {scores['features']})"
    )
    if few := few_images_note(scores):
        print(f"warning: {few}", file=sys.stderr)
    if args.output:
        result = {**fid_results(scores), "scores": scores, **provenance(args.generated)}
        write_text_atomically(Path(args.output), json.dumps(result, indent=2))


def run_mask_fidelity(args):
    from .segmentation import load_trained_segmenter  # the [eval] extra (MONAI, transformers)

    if args.output:
        check_result_file(args.output, "segmenter_trained_on")
    segmenter = load_trained_segmenter(args.segmenter)
    path, split = parse_dataset_spec(args.dataset, default_split="train")
    scores = _score_mask_fidelity(
        segmenter, args.segmenter, load_polyp_dataset(path, split=split), f"{path}:{split}", args.batch_size,
        args.device,
    )  # fmt: skip
    if args.output:
        write_text_atomically(Path(args.output), json.dumps(scores, indent=2) + "\n")


def _score_mask_fidelity(segmenter, segmenter_path, dataset, name, batch_size, device) -> dict:
    """Scores `dataset` with a loaded segmenter (model, config) and prints the result."""
    from .segmentation import (  # the [eval] extra (MONAI, transformers)
        SEGMENTER_FAMILIES,
        mask_fidelity,
        pairs_from_learned_masks,
    )

    model, config = segmenter
    path = parse_dataset_spec(name)[0]
    try:  # before the scoring: a failure here loses no score
        learned, unknown = pairs_from_learned_masks(dataset, path, config), None
    except (OSError, ValueError) as error:
        learned, unknown = None, error
    scores = mask_fidelity(model.to(device or default_device()), config, dataset, batch_size)
    scores["pairs_from_learned_masks"] = learned
    scores.update(dataset=name, segmenter=str(segmenter_path), segmenter_trained_on=config["train"])
    scores.update(provenance(path))
    scores.update(mask_fidelity_results(scores, SEGMENTER_FAMILIES[config["architecture"]]))  # for `polyp-ddpm card`
    print(
        f"Mask fidelity of {name}: IoU {scores['iou']:.4f}, Dice {scores['dice']:.4f} on "
        f"{scores['num_images']} images (segmenter trained on {config['train']} pairs)"
    )
    if config["train"] != "real":
        print("Note: mask fidelity is meant with a segmenter trained on real pairs only.")
    if unknown is not None:
        print(f"Note: whether these pairs were made from masks the segmenter learned from is unknown ({unknown}).")
    if learned:
        print(
            f"Note: {learned} of these {scores['num_images']} pairs were made from masks the segmenter learned from "
            f"(its training pairs of {config['real']}), so their score is flattered. Score pairs of masks it has not "
            "seen: another split, or those of the masks it held out, which train_segmentation.py --train real "
            "--synthetic scores by itself (mask_fidelity in its results.json)."
        )
    if scores["generated_by"] is None:
        print(
            f"Note: {name} has no generation.json, the record `polyp-ddpm generate` keeps: if these are real pairs, "
            "this is the segmenter's test score, not a model's mask fidelity."
        )
    return scores


def run_card(args):
    if not Path(args.model_dir).is_dir():  # a file of the folder, a Hub id: the card is rewritten in place
        raise ValueError(
            f"{args.model_dir} is not a folder; pass the folder of the saved pipeline whose card to update."
        )
    results = {}
    for path in args.results:
        try:
            results[path] = json.loads(Path(path).read_text())
        except ValueError as error:
            raise ValueError(f"--results {path} is not valid JSON ({error}).") from error
    for path, result in results.items():  # their shape, before whose model they score (and before loading it)
        check_results_file(f"--results {path}", result)
    check_results_of(args.model_dir, results)
    # Results are for image models: a model of masks alone is refused by load_pipeline.
    for path, text in updated_model_card_files(load_pipeline(args.model_dir), args.model_dir, results).items():
        write_text_atomically(path, text)  # a kill leaves the old card or the new one
    print(f"Updated {Path(args.model_dir) / 'README.md'}")


def run_demo(args):
    try:
        from . import web_demo  # gradio is the optional [demo] extra
    except ModuleNotFoundError as error:
        raise ImportError(
            f"the web demo needs the [demo] extra ({error}): pip install 'polyp-diffusers[demo]'."
        ) from error
    if args.write_space:
        folder = web_demo.write_space(args.write_space, args.model)
        print(
            f"Wrote the Space {folder}. To publish it: hf repos create USER/SPACE --repo-type space --space-sdk gradio, "
            f"then hf upload USER/SPACE {folder} --repo-type space"
        )
        return
    web_demo.launch_demo(
        args.model, host=args.host, port=args.port, share=args.share, device=args.device, dtype=args.dtype
    )


def run_reproduce(args):
    from .study import run_study  # the study needs the [eval] extra (segmenters, FID)

    run_study(
        args.data, args.output, preset=args.preset, split_file=args.split_file, tests=args.test, seeds=args.seeds,
        objective=args.objective, inception_weights=args.inception_weights, segmentation_jobs=args.segmentation_jobs,
        new_masks=args.new_masks, inserted_polyps=args.inserted_polyps, denoiser_args=args.denoiser_args,
    )  # fmt: skip
