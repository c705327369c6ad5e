"""The paper's comparison in one command: UNet++ trained on real, synthetic and real+synthetic pairs.

    python training/compare_segmentation.py --model runs/polyp-ddpm --real data/kvasir-seg \\
        --test data/kvasir-seg:test --output_dir runs/comparison [train_segmentation.py flags ...]

Without `--synthetic`, the synthetic pairs are generated first from the masks of the real training split
(`polyp-ddpm generate`: resumable, and kept by a rerun with the same generation settings). Each setting is
trained anew by `accelerate launch training/train_segmentation.py` with the same flags, so all get the same
budget. Writes `comparison.md` and `comparison.json` (Markdown plus model-index entries: `polyp-ddpm card MODEL
--results comparison.json`) atomically once all settings are done; an earlier comparison in the folder is
removed as soon as the first of its runs is replaced.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from polyp_diffusers.arguments import (
    HelpFormatter,
    exit_code_of,
    load_training_script,
    output_path,
    overridden_settings,
    positive_int,
)
from polyp_diffusers.choices import SAMPLERS
from polyp_diffusers.data import parse_dataset_spec
from polyp_diffusers.folders import (
    OutputClaim,
    check_is_folder,
    check_output_apart,
    visible_entries,
    write_text_atomically,
)
from polyp_diffusers.generate import OtherRunError, generate_dataset
from polyp_diffusers.results import provenance, segmentation_results
from polyp_diffusers.segmentation import TRAIN_SETS, check_tests_apart, import_extra, name_test_sets

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--real", required=True, help="Prepared real dataset (its train split is used).")
    parser.add_argument("--test", action="append", required=True, metavar="DATASET[:SPLIT]", help="Test set(s).")
    parser.add_argument(
        "--output_dir", type=output_path, required=True, help="Runs, generated data and the comparison go here."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", help="An existing generated dataset.")
    source.add_argument("--model", help="A PolypDDPMPipeline (folder or Hub id) to generate the synthetic pairs with.")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="Sampler for generation.")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="Sampling steps (default: 250 ddpm, 50 otherwise)."
    )
    parser.add_argument("--generation_batch_size", type=positive_int, default=16, help="Images per generation batch.")
    parser.add_argument(
        "--settings", nargs="+", choices=TRAIN_SETS, default=list(TRAIN_SETS), help="Training sets to compare."
    )
    parser.add_argument("--accelerate_config", help="accelerate config file for the segmentation runs.")
    return parser.parse_known_args(argv)


# What `owned_arguments` sets, by its name in train_segmentation.py's arguments.
OWNED = ("train", "real", "synthetic", "output_dir", "test")


def run_folder(output_dir: str | Path, setting: str) -> Path:
    """Where a setting's run writes: a folder of its own inside the comparison's."""
    return Path(output_dir) / f"seg-{setting.replace('+', '-')}"


def owned_arguments(args, setting: str, synthetic: str) -> list[str]:
    """The arguments of `train_segmentation.py` that the comparison sets for a setting: its data, tests and folder."""
    arguments = ["--train", setting, "--real", args.real, "--synthetic", synthetic]
    arguments += ["--output_dir", str(run_folder(args.output_dir, setting))]
    for test in args.test:
        arguments += ["--test", test]
    return arguments


def setting_arguments(args, segmentation_flags: list[str], synthetic: str) -> dict[str, list[str]]:
    """The arguments of `train_segmentation.py` for each setting: the same flags and data for all."""
    # Each setting is trained anew by each run (--overwrite).
    return {
        setting: [*owned_arguments(args, setting, synthetic), "--overwrite", *segmentation_flags]
        for setting in args.settings
    }


def check_settings(args, arguments: dict[str, list[str]], synthetic: str) -> None:
    """
    Refuses, once and before any work (generation, or the first setting's training), what a setting would refuse:
    its flags (`train_segmentation.py`'s own parser), a missing optional extra, a test set named twice, and test
    sets holding pairs that a setting learns from (`segmentation.check_tests_apart`, as each setting checks itself).
    """
    parse_args = load_training_script("train_segmentation", HERE).parse_args  # the script it launches
    settings = [parse_args(setting_flags) for setting_flags in arguments.values()]
    # A passed-on flag (even abbreviated) that changes what the comparison sets would make its settings alike.
    changed = set()
    for setting, setting_flags in arguments.items():
        owned = owned_arguments(args, setting, synthetic)
        changed.update(overridden_settings(parse_args, owned, setting_flags[len(owned) :], OWNED))
    if changed:
        raise ValueError(
            f"compare_segmentation.py sets {', '.join(sorted(changed))} of train_segmentation.py itself (--settings, "
            "--real, --synthetic, --test and --output_dir choose them): leave them out of the flags it passes on."
        )
    first = settings[0]
    import_extra(first.architecture)
    name_test_sets(args.test)
    trains_on_synthetic = any(setting.train != "real" for setting in settings)
    learned_synthetic = args.synthetic if trains_on_synthetic else None
    # Pairs still to be generated: the model that will make them, checked now rather than after generation.
    models = {"--model": args.model} if trains_on_synthetic and args.synthetic is None else None
    check_tests_apart(args.real, first.real_split, args.test, learned_synthetic, first.synthetic_split, models)
    if trains_on_synthetic and args.synthetic is None and first.real_split != "train":
        check_tests_apart(args.real, "train", args.test)  # the masks of the pairs still to be generated


def check_output_holds_only_comparisons(output_dir: Path) -> None:
    """
    Refuses an output folder holding what no comparison writes (a thesis, another run): its runs would be mixed in
    with them. Each run replaces its setting's own folder; the rest stays.
    """
    own = {run_folder(output_dir, setting).name for setting in TRAIN_SETS} | {"synthetic"}
    foreign = [name for name in visible_entries(output_dir) if name not in own and not name.startswith("comparison.")]
    if foreign:
        raise FileExistsError(
            f"--output_dir {output_dir} holds {', '.join(foreign[:5])}, which no comparison writes; choose a folder "
            "of its own (new, empty, or an earlier comparison's)."
        )


def main(argv=None):
    args, segmentation_flags = parse_args(argv)
    output_dir = Path(args.output_dir)
    inputs = {"real dataset": args.real, "synthetic dataset": args.synthetic, "model": args.model}
    inputs.update({f"test set {spec}": parse_dataset_spec(spec)[0] for spec in args.test})
    check_output_apart(output_dir, inputs)  # before the claim below creates output_dir
    check_is_folder(output_dir)
    check_output_holds_only_comparisons(output_dir)
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise FileNotFoundError(f"--accelerate_config {args.accelerate_config} is not a file.")
    synthetic = args.synthetic or str(output_dir / "synthetic")
    arguments = setting_arguments(args, segmentation_flags, synthetic)
    check_settings(args, arguments, synthetic)
    # One comparison writes in output_dir at a time (its settings' runs hold their own folders).
    with OutputClaim(output_dir):
        if args.synthetic is None:  # continued if interrupted, kept if made with these settings, else refused by name
            try:
                generate_dataset(
                    args.model,
                    args.real,
                    synthetic,
                    split="train",
                    sampler=args.sampler,
                    num_inference_steps=args.steps,
                    batch_size=args.generation_batch_size,
                )
            except OtherRunError as error:
                raise ValueError(
                    f"{synthetic} holds synthetic pairs generated with other settings ({error}). For this command: "
                    "delete that folder to generate them again, or choose another --output_dir."
                ) from None
        comparison_files = {suffix: output_dir / f"comparison.{suffix}" for suffix in ("json", "md")}

        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if args.accelerate_config:
            launch += ["--config_file", args.accelerate_config]
        runs = {}
        for setting, setting_flags in arguments.items():
            run_dir = run_folder(output_dir, setting)
            command = [*launch, str(HERE / "train_segmentation.py"), *setting_flags]
            print(f"== {setting}: {' '.join(command)}", flush=True)
            if subprocess.run(command).returncode:
                raise RuntimeError(f"the {setting} setting failed (its error is above); nothing was compared.")
            if not runs:  # a run of the earlier comparison is replaced now: the comparison must not outlive it
                for path in comparison_files.values():
                    path.unlink(missing_ok=True)
            runs[setting] = json.loads((run_dir / "results.json").read_text())

        comparison = segmentation_results(list(runs.values()))
        comparison["runs"] = runs
        comparison.update(provenance(synthetic))  # for `polyp-ddpm card`: whose images these are
        write_text_atomically(comparison_files["json"], json.dumps(comparison, indent=2) + "\n")
        write_text_atomically(comparison_files["md"], comparison["markdown"] + "\n")
        print(comparison["markdown"])


if __name__ == "__main__":
    # Bad input, damaged files, a missing optional extra or a failed setting: what is wrong, in one line.
    sys.exit(exit_code_of(main, (ValueError, OSError, RuntimeError, ImportError)))
