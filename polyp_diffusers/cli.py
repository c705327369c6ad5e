"""The `polyp-ddpm` command line: prepare data, generate pairs, measure FID/KID, convert official weights, cards,
and a web demo.
"""

# This module only parses, and imports neither torch nor diffusers (seconds), so that `--help` and a wrong argument
# answer at once. Each subcommand names its work in `commands` (set_defaults(run=...)), imported once the arguments
# are known.

import argparse
import sys

from .arguments import (
    HelpFormatter,
    count_or_fraction,
    exit_code_of,
    image_side,
    output_path,
    port_number,
    positive_int,
)
from .choices import (
    COMPILE_MODES,
    DEMO_SOURCE,
    DINOV2_WEIGHTS,
    DTYPE_NAMES,
    FIDELITY_BATCH_SIZE,
    SAMPLERS,
    STUDY_OBJECTIVES,
    STUDY_PRESET_NAMES,
)
from .hub_card.terms import SOURCE_TERMS

FEATURES = ("inception", "dinov2")


def _add_hub_options(parser, what: str, default_name: str):
    parser.add_argument("--push-to-hub", action="store_true", help=f"Also upload the {what} to the Hub.")
    parser.add_argument("--hub-id", help=f"Hub repo id for --push-to-hub (default: {default_name}).")


def _add_prepare_data(subparsers):
    parser = subparsers.add_parser(
        "prepare-data",
        formatter_class=HelpFormatter,
        help="Validate image/mask pairs and write them as a datasets DatasetDict (train/test) with a card.",
        description=(
            "SOURCE: a folder with images/ and masks/ (Kvasir-SEG layout, matched by file stem; or train/, test/ "
            "and val/ folders that each hold them, read as splits), its zip, a save_to_disk folder, a Hub dataset "
            f"id, or '{DEMO_SOURCE}' for the built-in synthetic smoke-test set."
        ),
    )
    parser.add_argument("source")
    parser.add_argument(
        "--output", type=output_path, required=True, help="Folder to write (save_to_disk format, README.md card)."
    )
    parser.add_argument(
        "--test-size",
        type=count_or_fraction,
        default=None,
        help="Test pairs: a count or a fraction (default: 100, as in the paper, or 0.1 of a source under 1000 pairs "
        "and of the demo set). A source with splits of its own keeps them.",
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the random train/test split.")
    parser.add_argument(
        "--split-file",
        help="JSON {split: [ids]} to use instead of a random split, or kvasir-seg-paper: the paper's 900/100 split "
        "of Kvasir-SEG, shipped with the package.",
    )
    parser.add_argument(
        "--skip-invalid", action="store_true", help="Write the valid pairs and a report instead of failing."
    )
    parser.add_argument(
        "--resolution",
        type=image_side,
        help="Resize to RESxRES (images bicubic, masks nearest). Default: keep sizes; demo: 64.",
    )
    parser.add_argument("--image-dir", default="images", help="Name of the image folder inside SOURCE.")
    parser.add_argument("--mask-dir", default="masks", help="Name of the mask folder inside SOURCE.")
    parser.add_argument(
        "--source-terms", help=f"Terms of use of the source data for the card: {', '.join(SOURCE_TERMS)} or free text."
    )
    parser.add_argument("--demo-pairs", type=positive_int, default=200, help="Number of pairs of the demo set.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists (never the source).")
    _add_hub_options(parser, "dataset and its card", "the output folder's name")
    parser.set_defaults(run="run_prepare_data")


def _add_convert_official(subparsers):
    parser = subparsers.add_parser(
        "convert-official",
        formatter_class=HelpFormatter,
        help="Convert the authors' released model.pt into a PolypDDPMPipeline (safetensors, configs, card).",
        description="Reads the checkpoint with torch.load(weights_only=True) and maps every tensor; fails on any mismatch.",
    )
    parser.add_argument("checkpoint", help="The official model.pt ({'step', 'model', 'ema'}).")
    parser.add_argument(
        "--output", type=output_path, required=True, help="New (or empty) folder for the saved pipeline."
    )
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="Which weights (their inference uses ema)."
    )
    parser.add_argument(
        "--keep-rgb-mask",
        action="store_true",
        help="Keep their 6 input channels (mask as 3 identical channels) instead of folding to 4.",
    )
    _add_hub_options(parser, "pipeline and its card", "the output folder's name")
    parser.set_defaults(run="run_convert_official")


def _add_generate(subparsers):
    parser = subparsers.add_parser(
        "generate",
        formatter_class=HelpFormatter,
        help="Generate synthetic pairs from the masks of a dataset (resumable) as a datasets DatasetDict.",
        description=(
            "Image i uses seed SEED+i; an interrupted run continues where it stopped when the same command is run "
            "again. OUTPUT must be new or empty, an unfinished run of the same settings, or (with --overwrite) a "
            "folder this command wrote."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="A saved PolypDDPMPipeline: train.py's --output_dir, a convert-official folder or a Hub id.",
    )
    parser.add_argument(
        "--mask-dataset", required=True, help="A prepared dataset (folder or Hub id) whose masks to use."
    )
    parser.add_argument("--split", default="train", help="Split of --mask-dataset.")
    parser.add_argument("--output", type=output_path, required=True, help="Folder to write.")
    parser.add_argument("--num-images-per-mask", type=positive_int, default=1, help="Images generated per mask.")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="Sampling scheduler.")
    parser.add_argument("--steps", type=positive_int, help="Sampling steps (default: 250 for ddpm, 50 otherwise).")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="Images per batch (and per written part).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first image.")
    parser.add_argument(
        "--new-masks",
        type=positive_int,
        metavar="N",
        help="Make N new masks (with --mask-augment or --mask-model) instead of reusing those of --split; mask j "
        "comes from SEED and j. Writes mask_statistics.json/.png: the new masks against the real ones.",
    )
    parser.add_argument(
        "--mask-augment",
        action="store_true",
        help="New masks by elastic and affine deformation of real polyps (sizes and positions drawn from the real "
        "masks), sometimes two real polyps together.",
    )
    parser.add_argument(
        "--mask-model",
        help="New masks drawn by a model of masks (a PolypMaskPipeline folder or Hub id, trained with "
        "training/train.py --mask_model) instead of --mask-augment.",
    )
    parser.add_argument(
        "--insert",
        action="store_true",
        help="Insert each new mask's polyp into a real frame of --split (RePaint inpainting; mask j into frame j "
        "modulo the split's size) instead of generating whole images; the pair's mask holds both polyps.",
    )
    parser.add_argument(
        "--start-timestep",
        type=positive_int,
        help="Start the chain at this timestep from the training images' mean colour, noised (a fix without "
        "retraining for briefly trained noise-predicting models; e.g. 235 of 250). Default: the model's config.",
    )
    parser.add_argument("--device", help="Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32", help="Model precision.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Discard an unfinished run with other settings, or replace a finished one.",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Compile the UNet (torch.compile) before sampling: pays off when sampling outlasts the compilation.",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode; reduce-overhead adds CUDA graphs (implies --compile).",
    )
    parser.add_argument(
        "--fidelity-segmenter",
        metavar="FOLDER",
        help="A train_segmentation.py output folder (trained on real pairs): scores how well the generated images "
        "obey their masks and writes mask_fidelity.json beside the pairs (as `polyp-ddpm mask-fidelity`).",
    )
    _add_hub_options(parser, "generated dataset", "the output folder's name")
    parser.set_defaults(run="run_generate")


def _add_fid(subparsers):
    parser = subparsers.add_parser(
        "fid",
        formatter_class=HelpFormatter,
        help="FID and KID (mean and std) between the images of two datasets.",
        description="Standard 2048-d Inception features (torchmetrics / torch-fidelity), or a pluggable extractor.",
    )
    parser.add_argument("--real", required=True, help="Real dataset (folder or Hub id).")
    parser.add_argument("--real-split", default="test", help="Split of --real.")
    parser.add_argument("--generated", required=True, help="Generated dataset (folder or Hub id).")
    parser.add_argument("--generated-split", default=None, help="Split of --generated (default: its only split).")
    parser.add_argument(
        "--inception-weights",
        help="Local weights-inception-2015-12-05-6726825d.pth or a .safetensors copy (for offline use); read as "
        "tensors only, never unpickled.",
    )
    parser.add_argument(
        "--features",
        choices=FEATURES,
        default="inception",
        help="Inception (the standard FID) or DINOv2 (closer to human judgement of realism).",
    )
    parser.add_argument("--dinov2-weights", default=DINOV2_WEIGHTS, help="Hub id or local folder of the DINOv2 model.")
    parser.add_argument(
        "--feature-extractor",
        help="'module:factory' instead: the factory, called with no arguments, returns an nn.Module mapping uint8 "
        "images (N, 3, H, W) to features (N, D).",
    )
    parser.add_argument("--image-size", type=image_side, help="Resize every image to this square size first (bicubic).")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="Images per feature batch.")
    parser.add_argument(
        "--kid-subset-size", type=positive_int, default=1000, help="KID subset size (capped at the set sizes)."
    )
    parser.add_argument("--kid-subsets", type=positive_int, default=100, help="Number of KID subsets.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument(
        "--output", type=output_path, help="Write the result as JSON (with a Markdown table for the model card) here."
    )
    parser.set_defaults(run="run_fid")


def _add_mask_fidelity(subparsers):
    parser = subparsers.add_parser(
        "mask-fidelity",
        formatter_class=HelpFormatter,
        help="How well generated images obey their masks: a segmenter trained on real pairs, scored on them.",
        description="IoU and Dice of a segmenter's predictions on generated images against the masks the images "
        "were generated from. With a segmenter trained on real pairs (train_segmentation.py --train real), a "
        "low score means the polyps are not where, or not what, the masks say.",
    )
    parser.add_argument("--segmenter", required=True, help="A train_segmentation.py output folder.")
    parser.add_argument(
        "--dataset", required=True, metavar="DATASET[:SPLIT]", help="Generated pairs (split default: train)."
    )
    parser.add_argument("--batch-size", type=positive_int, default=FIDELITY_BATCH_SIZE, help="Images per batch.")
    parser.add_argument("--device", help="Default: cuda if available, else cpu.")
    parser.add_argument("--output", type=output_path, help="Write the scores as JSON here.")
    parser.set_defaults(run="run_mask_fidelity")


def _add_card(subparsers):
    parser = subparsers.add_parser(
        "card",
        formatter_class=HelpFormatter,
        help="Re-render a saved pipeline's model card with measured results (FID/KID, segmentation benchmark).",
    )
    parser.add_argument("model_dir", help="A saved PolypDDPMPipeline folder (from train.py or convert-official).")
    parser.add_argument(
        "--results",
        action="append",
        required=True,
        help="JSON from `polyp-ddpm fid --output`, `polyp-ddpm mask-fidelity --output` (or the mask_fidelity.json "
        "of `generate --fidelity-segmenter`) or training/compare_segmentation.py; repeatable.",
    )
    parser.set_defaults(run="run_card")


def _add_demo(subparsers):
    parser = subparsers.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="Serve a web demo: draw or upload a mask in a browser, get polyp images (needs the [demo] extra).",
        description=(
            "Opens http://HOST:PORT: draw a mask, upload one or pick an example; choose the number of images, sampler, "
            "steps and seed; download each image with its mask. With --write-space DIR, writes a Hugging Face Space "
            "that serves --model (a Hub id) instead."
        ),
    )
    parser.add_argument("--model", required=True, help="A saved PolypDDPMPipeline: a folder or a Hub id.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every network interface).")
    parser.add_argument("--port", type=port_number, default=7860, help="Port to serve on.")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link to the demo.")
    parser.add_argument("--device", help="Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32", help="Model precision.")
    parser.add_argument(
        "--write-space",
        type=output_path,
        metavar="DIR",
        help="Write a Hub Space folder (app.py, requirements.txt, README.md) and exit.",
    )
    parser.set_defaults(run="run_demo")


def _add_reproduce(subparsers):
    parser = subparsers.add_parser(
        "reproduce",
        formatter_class=HelpFormatter,
        help="The paper's study in one command: data, denoiser, synthetic pairs, FID/KID, segmenters, report.",
        description=(
            "Runs (or, after a kill, continues) every step of the study in OUTPUT and writes report.md, "
            "report.json (a results file for `polyp-ddpm card`) and figures. Needs the [eval] and [train] extras "
            "and a checkout (it runs the scripts in training/). Presets: smoke (CPU, demo data), quick-64 (one "
            "GPU, minutes), paper (the paper's scale)."
        ),
    )
    parser.add_argument("--data", required=True, help="Image/mask pairs for prepare-data (e.g. Kvasir-SEG), or 'demo'.")
    parser.add_argument("--output", type=output_path, required=True, help="The study folder.")
    parser.add_argument("--preset", choices=STUDY_PRESET_NAMES, default="quick-64", help="Sizes and budgets.")
    parser.add_argument(
        "--split-file", help="JSON {split: [ids]}, or kvasir-seg-paper: the paper's split of Kvasir-SEG (shipped)."
    )
    parser.add_argument(
        "--test", action="append", metavar="DATASET[:SPLIT]", help="Extra prepared test sets to score (repeatable)."
    )
    parser.add_argument("--seeds", type=positive_int, help="Segmenter seeds per training set (default: the preset's).")
    parser.add_argument(
        "--objective",
        choices=STUDY_OBJECTIVES,
        default="paper",
        help="The denoiser's: noise prediction (the paper) or velocity with zero terminal SNR.",
    )
    parser.add_argument("--inception-weights", help="For FID/KID (default: the torch hub cache; skipped if absent).")
    parser.add_argument(
        "--segmentation-jobs", type=positive_int, help="Segmenters trained at once (default: the preset's)."
    )
    parser.add_argument(
        "--new-masks",
        action="store_true",
        help="Also train segmenters on the real pairs plus one generated pair per training mask whose mask is new "
        "(real masks deformed and combined): do new polyp shapes help?",
    )
    parser.add_argument(
        "--inserted-polyps",
        action="store_true",
        help="Also train segmenters on the real pairs plus as many real frames with a new polyp inserted "
        "(inpainting): do new polyps in real surroundings help?",
    )
    parser.add_argument(
        "--denoiser-args",
        metavar="FLAGS",
        help="More train.py flags for the denoiser, after the preset's, e.g. --denoiser-args='--augment_degrees 0'.",
    )
    parser.set_defaults(run="run_reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyp-ddpm", description=__doc__, formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare_data(subparsers)
    _add_convert_official(subparsers)
    _add_generate(subparsers)
    _add_fid(subparsers)
    _add_mask_fidelity(subparsers)
    _add_card(subparsers)
    _add_reproduce(subparsers)
    _add_demo(subparsers)
    return parser


def _run(args) -> None:
    from . import commands  # torch, diffusers and datasets: seconds, and a Ctrl-C meanwhile is one line too

    getattr(commands, args.run)(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Bad input or environment, and Ctrl-C: said in one line.
    return exit_code_of(
        lambda: _run(args),
        (ValueError, OSError, RuntimeError, ImportError),
        interrupted="polyp-ddpm: interrupted. What was written whole is kept; the same command again goes on "
        "(generate and reproduce from where they stopped).",
    )


if __name__ == "__main__":
    sys.exit(main())
