"""The `polyp-ddpm` command line: prepare data, generate pairs, measure FID/KID, convert official weights."""

import argparse
import sys


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

    try:
        dataset = prepare_dataset(
            args.source, args.output, test_size=args.test_size, seed=args.seed, split_file=args.split_file,
            skip_invalid=args.skip_invalid, resolution=args.resolution, image_dir=args.image_dir,
            mask_dir=args.mask_dir, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
            demo_pairs=args.demo_pairs,
        )
    except (ValueError, OSError) as error:  # DataValidationError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
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

    try:
        pipeline, description = convert_official_checkpoint(args.checkpoint, args.weights, args.keep_rgb_mask)
    except (ValueError, OSError) as error:  # ConversionError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    write_converted_pipeline(pipeline, description, args.output, args.push_to_hub)
    config = description["config"]
    print(f"Converted {args.checkpoint} ({args.weights} weights, step {description['step']}, {config['image_size']} px, "
          f"{description['mask_channels']} mask channel(s)) to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyp-ddpm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare_data(subparsers)
    _add_convert_official(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
