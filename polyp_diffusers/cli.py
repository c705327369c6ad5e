"""The `polyp-ddpm` command line: prepare data, generate pairs, measure FID/KID, convert official weights."""

import argparse
import sys

from .modeling import SAMPLERS


def _test_size(value: str) -> int | float:
    number = float(value)
    return int(number) if number >= 1 else number


def _add_prepare_data(subparsers):
    parser = subparsers.add_parser(
        "prepare-data",
        help="Validate image/mask pairs and write them as a datasets DatasetDict (train/test) with a card.",
        description=(
            "SOURCE: a folder with images/ and masks/ (Kvasir-SEG layout, matched by file stem), its zip, a "
            "save_to_disk folder, a Hub dataset id, or 'demo' for the built-in synthetic smoke-test set."
        ),
    )
    parser.add_argument("source")
    parser.add_argument("--output", required=True, help="Folder to write (save_to_disk format, README.md card).")
    parser.add_argument("--test-size", type=_test_size, default=None, help="Test pairs: a count or a fraction (default: 100, as in the paper; demo: 0.1).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the random train/test split.")
    parser.add_argument("--split-file", help="JSON {split: [ids]} to use instead of a random split (e.g. the official 880/120).")
    parser.add_argument("--skip-invalid", action="store_true", help="Write the valid pairs and a report instead of failing.")
    parser.add_argument("--resolution", type=int, help="Resize to RESxRES (images bicubic, masks nearest). Default: keep sizes; demo: 64.")
    parser.add_argument("--image-dir", default="images", help="Name of the image folder inside SOURCE.")
    parser.add_argument("--mask-dir", default="masks", help="Name of the mask folder inside SOURCE.")
    parser.add_argument("--demo-pairs", type=int, default=200, help="Number of pairs of the demo set.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    parser.add_argument("--push-to-hub", metavar="REPO", help="Also push the dataset and its card to this Hub repo.")
    parser.set_defaults(run=_run_prepare_data)


def _run_prepare_data(args):
    from .data import prepare_dataset

    dataset = prepare_dataset(
        args.source, args.output, test_size=args.test_size, seed=args.seed, split_file=args.split_file,
        skip_invalid=args.skip_invalid, resolution=args.resolution, image_dir=args.image_dir,
        mask_dir=args.mask_dir, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
        demo_pairs=args.demo_pairs,
    )
    counts = ", ".join(f"{name}: {len(part)}" for name, part in dataset.items())
    print(f"Wrote {args.output} ({counts})")
    return 0


def _add_convert_official(subparsers):
    parser = subparsers.add_parser(
        "convert-official",
        help="Convert the authors' released model.pt into a PolypDDPMPipeline (safetensors, configs, card).",
        description="Reads the checkpoint with torch.load(weights_only=True) and maps every tensor; fails on any mismatch.",
    )
    parser.add_argument("checkpoint", help="The official model.pt ({'step', 'model', 'ema'}).")
    parser.add_argument("--output", required=True, help="Folder for the saved pipeline.")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="Which weights (their inference uses ema).")
    parser.add_argument("--keep-rgb-mask", action="store_true",
                        help="Keep their 6 input channels (mask as 3 identical channels) instead of folding to 4.")
    parser.add_argument("--push-to-hub", metavar="REPO", help="Also upload the pipeline and its card to this Hub repo.")
    parser.set_defaults(run=_run_convert_official)


def _run_convert_official(args):
    from .convert_official import convert_official_checkpoint, write_converted_pipeline

    pipeline, description = convert_official_checkpoint(args.checkpoint, args.weights, args.keep_rgb_mask)
    write_converted_pipeline(pipeline, description, args.output, args.push_to_hub)
    config = description["config"]
    print(f"Converted {args.checkpoint} ({args.weights} weights, step {description['step']}, {config['image_size']} px, "
          f"{description['mask_channels']} mask channel(s)) to {args.output}")
    return 0


def _add_generate(subparsers):
    parser = subparsers.add_parser(
        "generate",
        help="Generate synthetic pairs from the masks of a dataset (resumable) as a datasets DatasetDict.",
        description="Image i uses seed SEED+i; an interrupted run continues where it stopped when run again.",
    )
    parser.add_argument("--model", required=True, help="A saved PolypDDPMPipeline folder or Hub id.")
    parser.add_argument("--masks", required=True, help="A prepared dataset (folder or Hub id) whose masks to use.")
    parser.add_argument("--split", default="train", help="Split of --masks.")
    parser.add_argument("--output", required=True, help="Folder to write.")
    parser.add_argument("--num-images-per-mask", type=int, default=1, help="Images generated per mask.")
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm", help="Sampler.")
    parser.add_argument("--steps", type=int, help="Sampling steps (default: 250 for ddpm, 50 otherwise).")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per batch (and per written part).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first image.")
    parser.add_argument("--device", help="Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="Model precision.")
    parser.add_argument("--push-to-hub", metavar="REPO", help="Also push the generated dataset to this Hub repo.")
    parser.set_defaults(run=_run_generate)


def _run_generate(args):
    from .generate import generate_dataset

    dataset = generate_dataset(
        args.model, args.masks, args.output, split=args.split, num_images_per_mask=args.num_images_per_mask,
        sampler=args.scheduler, num_inference_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        device=args.device, dtype=args.dtype, push_to_hub=args.push_to_hub,
    )
    print(f"Wrote {args.output} ({args.split}: {len(dataset[args.split])} generated pairs)")
    return 0


def _add_fid(subparsers):
    parser = subparsers.add_parser(
        "fid",
        help="FID and KID (mean and std) between the images of two datasets.",
        description="Standard 2048-d Inception features (torchmetrics / torch-fidelity), or a pluggable extractor.",
    )
    parser.add_argument("--real", required=True, help="Real dataset (folder or Hub id).")
    parser.add_argument("--real-split", default="test", help="Split of --real.")
    parser.add_argument("--generated", required=True, help="Generated dataset (folder or Hub id).")
    parser.add_argument("--generated-split", default=None, help="Split of --generated (default: its only split).")
    parser.add_argument("--inception-weights", help="Local weights-inception-2015-12-05-6726825d.pth (for offline use).")
    parser.add_argument("--feature-extractor", help="'module:factory' returning an nn.Module instead of Inception.")
    parser.add_argument("--image-size", type=int, help="Resize every image to this square size first (bicubic).")
    parser.add_argument("--batch-size", type=int, default=50, help="Images per feature batch.")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the set sizes).")
    parser.add_argument("--kid-subsets", type=int, default=100, help="Number of KID subsets.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--output", help="Write the result as JSON (with a Markdown table for the model card) here.")
    parser.set_defaults(run=_run_fid)


def _run_fid(args):
    import json

    import torch

    from .data import load_polyp_dataset
    from .metrics import fid_kid, load_extractor

    real = load_polyp_dataset(args.real, split=args.real_split)
    generated = load_polyp_dataset(args.generated, split=args.generated_split)
    if args.generated_split is None:
        if len(generated) != 1:
            raise ValueError(f"{args.generated} has splits {sorted(generated)}; choose one with --generated-split.")
        generated = next(iter(generated.values()))
    extractor = load_extractor(args.feature_extractor) if args.feature_extractor else None
    scores = fid_kid(real, generated, extractor=extractor, inception_weights=args.inception_weights,
                     batch_size=args.batch_size, kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                     image_size=args.image_size, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scores.update(real=f"{args.real}:{args.real_split}", generated=args.generated)
    print(f"FID {scores['fid']:.2f}   KID {scores['kid_mean']:.4f} ± {scores['kid_std']:.4f}   "
          f"({scores['num_generated']} generated vs {scores['num_real']} real, {scores['features']})")
    if args.output:
        from .hub_card.cards import fid_results

        with open(args.output, "w") as file:
            json.dump({**fid_results(scores), "scores": scores}, file, indent=2)
    return 0


def _add_card(subparsers):
    parser = subparsers.add_parser(
        "card",
        help="Re-render a saved pipeline's model card with measured results (FID/KID, segmentation benchmark).",
    )
    parser.add_argument("model_dir", help="A saved PolypDDPMPipeline folder (from train.py or convert-official).")
    parser.add_argument("--results", action="append", required=True,
                        help="JSON from `polyp-ddpm fid --output` or training/compare_segmentation.py; repeatable.")
    parser.set_defaults(run=_run_card)


def _run_card(args):
    from .hub_card.cards import update_model_card

    print(f"Updated {update_model_card(args.model_dir, args.results)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyp-ddpm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare_data(subparsers)
    _add_convert_official(subparsers)
    _add_generate(subparsers)
    _add_fid(subparsers)
    _add_card(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:  # bad input or environment: say what, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
