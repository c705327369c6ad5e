"""Train a polyp segmenter (UNet++ as in the paper, or SegFormer) on real, synthetic or real+synthetic pairs and score it on test sets.

    accelerate launch training/train_segmentation.py --train real+synthetic \\
        --real data/kvasir-seg --synthetic data/kvasir-seg-synthetic --test data/kvasir-seg:test \\
        --output_dir runs/seg-real+synthetic

The paper's downstream test (after Machacek et al. 2023): UNet++, Dice + cross-entropy loss, Adam 1e-4,
batch 8, 256 px, best checkpoint by validation IoU. The validation pairs are a fixed, seeded part of the
real training split, held out of every training set (also the synthetic pairs made from their masks), so
the three settings select their checkpoints on the same real images. Every setting trains for the same
number of steps. The default segmenter is MONAI's BasicUNetPlusPlus (pure torch, trained from scratch);
`--architecture smp` uses segmentation_models_pytorch's UnetPlusPlus with a ResNet-34 encoder as the paper did;
`--architecture segformer` a SegFormer (transformers), to ask whether synthetic pairs help a transformer too.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from polyp_diffusers.arguments import (
    CUDNN_BENCHMARK_HELP,
    HelpFormatter,
    count_or_fraction,
    exit_code_of,
    image_side,
    non_negative_float,
    output_path,
    positive_float,
    positive_int,
)
from polyp_diffusers.choices import MIXED_PRECISIONS
from polyp_diffusers.data import load_polyp_dataset, local_path_or_id, parse_dataset_spec
from polyp_diffusers.folders import check_output_apart, visible_entries, write_text_atomically
from polyp_diffusers.modeling import describe_device
from polyp_diffusers.segmentation import (
    ARCHITECTURES,
    SEGFORMER_SIZES,
    SEGMENTER_FAMILIES,
    TRAIN_SETS,
    build_segmenter,
    check_resolution,
    check_tests_apart,
    describe_segmenter,
    evaluate,
    held_out_synthetic,
    import_extra,
    load_test_sets,
    make_training_step,
    mask_fidelity,
    name_test_sets,
    training_pairs,
)
from polyp_diffusers.training_utils import (
    GraphedStep,
    check_weights_are_finite,
    claim_output,
    seconds_since_process_start,
)
from polyp_diffusers.transforms import (
    JointAugment,
    pair_tensors,
    pair_tensors_nbytes,
    shuffled_batches,
    tensor_batches,
)

logger = get_logger(__name__)
# What a run writes in --output_dir (each through a `.partial` file renamed into place).
OUTPUT_FILES = ("best.safetensors", "results.json")
# The running run's best weights, beside a finished run it replaces only once its own results are ready.
RUNNING_WEIGHTS = ".running.safetensors"
# Where a start-up goes (the interpreter and these imports, then main's phases), for timing.start_up_phases_s.
IMPORTED_AFTER_S = seconds_since_process_start()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--train", choices=TRAIN_SETS, required=True, help="Which pairs to train on.")
    parser.add_argument("--real", required=True, help="Prepared real dataset (folder or Hub id).")
    parser.add_argument("--real_split", default="train", help="Split of --real to train (and validate) on.")
    parser.add_argument(
        "--synthetic",
        help="Generated dataset (`polyp-ddpm generate`); needed unless --train real. With --train real, its pairs "
        "made from the held-out masks are scored too (`mask_fidelity` in results.json).",
    )
    parser.add_argument("--synthetic_split", default="train", help="Split of --synthetic to train on.")
    parser.add_argument(
        "--test",
        action="append",
        required=True,
        metavar="DATASET[:SPLIT]",
        help="Test set(s), scored separately; repeat for several (split default: test).",
    )
    parser.add_argument(
        "--validation_size",
        type=count_or_fraction,
        default=0.1,
        help="Fraction (or count) of the real training pairs held out for checkpoint selection.",
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="monai",
        help="Segmenter: MONAI's UNet++, smp's ResNet-34 UNet++ (the paper's), or a SegFormer.",
    )
    parser.add_argument(
        "--encoder_weights",
        default=None,
        help="smp: 'imagenet'; segformer: a Hub id or folder such as nvidia/mit-b0 (both need a download). "
        "Default: random init.",
    )
    parser.add_argument(
        "--segformer_size", choices=sorted(SEGFORMER_SIZES), default="b0", help="MiT encoder size without weights."
    )
    parser.add_argument(
        "--resolution",
        type=image_side,
        default=256,
        help="Training and test size: at least 32 (SegFormer: 29), a multiple of 32 for smp.",
    )
    parser.add_argument("--train_batch_size", type=positive_int, default=8, help="Per device.")
    parser.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=11250,
        help="Same for every setting (100 epochs of 900 real pairs at batch 8).",
    )
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4, help="Adam learning rate.")
    parser.add_argument(
        "--validation_steps", type=positive_int, default=500, help="Validate (and keep the best) every N steps."
    )
    parser.add_argument(
        "--augment_degrees", type=non_negative_float, default=45.0, help="Joint random rotation, +-degrees."
    )
    parser.add_argument(
        "--eval_batch_size", type=positive_int, default=16, help="Batch size for validation and testing."
    )
    parser.add_argument(
        "--max_preload_gb",
        type=non_negative_float,
        default=4.0,
        help="Pairs are decoded once into memory: the training device's when they take at most this many GiB, "
        "else the CPU's (batches then move to the device at each step).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seeds the split, initialisation, data order and augmentation."
    )
    parser.add_argument(
        "--output_dir", type=output_path, required=True, help="Best weights (safetensors) and results.json go here."
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a finished run in --output_dir (never other files); it is kept whole until this run's "
        "results are ready.",
    )
    parser.add_argument("--mixed_precision", choices=MIXED_PRECISIONS, default=None, help="Default: accelerate config.")
    parser.add_argument(
        "--cuda_graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Replay each training step as one CUDA graph (a small segmenter at a small size is bound by kernel "
        "launches). Default: on one CUDA device, unless --mixed_precision fp16 (its loss scaling reads the GPU).",
    )
    parser.add_argument("--cudnn_benchmark", action="store_true", help=CUDNN_BENCHMARK_HELP)
    args = parser.parse_args(argv)
    if args.train != "real" and not args.synthetic:
        parser.error(f"--train {args.train} needs --synthetic")
    try:
        check_resolution(args.architecture, args.resolution)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_output_dir(args) -> Path:
    """
    The output folder, refused where this run would mix with, or replace, what it should not: an input's folder,
    files this script does not write, or a finished run unless `--overwrite`.
    """
    output_dir = Path(args.output_dir)
    inputs = {"real dataset": args.real, "synthetic dataset": args.synthetic}
    inputs.update({f"test set {spec}": parse_dataset_spec(spec)[0] for spec in args.test})
    check_output_apart(output_dir, inputs)
    held = set(visible_entries(output_dir))
    if foreign := sorted(held - set(OUTPUT_FILES) - {f"{name}.partial" for name in OUTPUT_FILES}):
        raise ValueError(
            f"--output_dir {output_dir} holds {', '.join(foreign[:5])}, which this script does not write: "
            "choose an empty or new folder."
        )
    if "results.json" in held and not args.overwrite:
        raise ValueError(
            f"--output_dir {output_dir} holds a finished run (results.json): choose another folder, or pass "
            "--overwrite to replace it."
        )
    return output_dir


def use_cuda_graphs(requested: bool | None, device: torch.device, mixed_precision: str, num_processes: int) -> bool:
    """Whether the training step runs as a CUDA graph: `--cuda_graphs`, or by default wherever it can."""
    possible = device.type == "cuda" and mixed_precision != "fp16" and num_processes == 1
    if requested and not possible:
        raise SystemExit(
            f"error: --cuda_graphs needs one process on a CUDA device, with --mixed_precision no or bf16; this run "
            f"has {num_processes} on {device.type} with {mixed_precision}."
        )
    return possible if requested is None else requested


def check_inputs(args) -> None:
    """
    Refuses, before any work, a segmenter whose optional extra is missing, a test set named twice, and test sets
    that hold pairs this run learns from (`compare_segmentation.check_settings` makes the extra and leakage checks
    once for all its settings, the synthetic pairs it has yet to generate included).
    """
    import_extra(args.architecture)
    name_test_sets(args.test)  # one named twice
    synthetic = args.synthetic if args.train != "real" else None  # with --train real, only scored (mask fidelity)
    check_tests_apart(args.real, args.real_split, args.test, synthetic, args.synthetic_split)


def main(argv=None):
    args = parse_args(argv)
    output_dir = check_output_dir(args)
    check_inputs(args)
    # No autocast cache of cast weights: each weight is cast once a step anyway, and the cache must not outlive
    # a captured graph's memory. On several processes, MONAI's UNet++ has weights no step uses (its deep-supervision
    # heads, built though unused), which DDP must be told of.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[
            AutocastKwargs(cache_enabled=False),
            DistributedDataParallelKwargs(find_unused_parameters=args.architecture == "monai"),
        ],
    )
    start_up_phases = {"imports": IMPORTED_AFTER_S, "accelerator": seconds_since_process_start()}
    output_claim = claim_output(accelerator, output_dir)
    cuda_graphs = use_cuda_graphs(
        args.cuda_graphs, accelerator.device, accelerator.mixed_precision, accelerator.num_processes
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True

    real = load_polyp_dataset(args.real, split=args.real_split)
    synthetic = load_polyp_dataset(args.synthetic, split=args.synthetic_split) if args.train != "real" else None
    train_set, validation_set = training_pairs(args.train, real, synthetic, args.validation_size, args.seed)
    # Trained on real pairs, with synthetic ones at hand: score the synthetic twins of the held-out masks too.
    fidelity_set = None
    if args.train == "real" and args.synthetic:
        fidelity_set = held_out_synthetic(
            real, load_polyp_dataset(args.synthetic, split=args.synthetic_split), args.validation_size, args.seed
        )
    tests = load_test_sets(args.test)
    start_up_phases["datasets"] = seconds_since_process_start()
    output_dir.mkdir(parents=True, exist_ok=True)
    running_weights = output_dir / RUNNING_WEIGHTS
    running_weights.unlink(missing_ok=True)  # a killed run's: never to be taken for this run's
    logger.info(
        f"train on {args.train}: {len(train_set)} pairs; validation: {len(validation_set)} real pairs; "
        f"tests: {', '.join(f'{n} ({len(d)})' for n, d in tests.items())}"
    )
    # Every pair decoded once; training batches are then picked by index, with no workers.
    all_sets = [train_set, validation_set, *tests.values()]
    nbytes = sum(pair_tensors_nbytes(len(dataset), args.resolution) for dataset in all_sets)
    storage = accelerator.device if nbytes <= args.max_preload_gb * 2**30 else torch.device("cpu")
    show_progress = accelerator.is_local_main_process
    train_images, train_masks = pair_tensors(train_set, args.resolution, storage, progress=show_progress)
    validation_pairs = pair_tensors(validation_set, args.resolution, storage, progress=show_progress)
    test_pairs = {
        name: pair_tensors(dataset, args.resolution, storage, progress=show_progress) for name, dataset in tests.items()
    }
    start_up_phases["pair_tensors"] = seconds_since_process_start()
    model = build_segmenter(args.architecture, args.encoder_weights, args.segformer_size).to(accelerator.device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=args.learning_rate, fused=accelerator.device.type == "cuda", capturable=cuda_graphs
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    augment = JointAugment(degrees=args.augment_degrees)
    generator = torch.Generator().manual_seed(args.seed)

    train_step = GraphedStep(make_training_step(model, optimizer, accelerator.backward), enabled=cuda_graphs)
    # From the process's start: the interpreter, imports, data decoding, the model on its device.
    start_up_seconds = seconds_since_process_start()
    training_start = time.perf_counter()

    best = {"iou": -1.0, "step": 0}
    step = 0
    progress = tqdm(
        total=args.max_train_steps,
        desc=f"{SEGMENTER_FAMILIES[args.architecture]} on {args.train}",
        disable=not accelerator.is_local_main_process,
    )
    epoch = 0
    while step < args.max_train_steps:
        batches = shuffled_batches(
            len(train_images), args.train_batch_size, args.seed, epoch, storage,
            accelerator.process_index, accelerator.num_processes,
        )  # fmt: skip
        epoch += 1
        for batch in tensor_batches(train_images, train_masks, batches, device=accelerator.device):
            loss = train_step(*augment(batch["images"], batch["masks"], generator))
            step += 1
            progress.update(1)
            validation_due = step % args.validation_steps == 0 or step == args.max_train_steps
            if validation_due:  # on every process: the same weights, so all stop at the same step
                check_weights_are_finite(
                    accelerator.unwrap_model(model), step, "Train again with a lower --learning_rate."
                )
            if accelerator.is_main_process and validation_due:
                unwrapped = accelerator.unwrap_model(model)
                validation = evaluate(unwrapped, *validation_pairs, args.eval_batch_size)
                progress.set_postfix(loss=f"{loss.item():.4f}", val_iou=f"{validation['iou']:.4f}")
                if validation["iou"] > best["iou"]:
                    best = {"iou": validation["iou"], "step": step}
                    # Written beside, then renamed: a kill mid-write never leaves truncated weights.
                    staging = output_dir / f"{RUNNING_WEIGHTS}.partial"
                    save_file(
                        {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}, str(staging)
                    )
                    os.replace(staging, running_weights)
            if step >= args.max_train_steps:
                break
    progress.close()
    training_seconds = time.perf_counter() - training_start  # the last step's validation has waited for the GPU

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        model.load_state_dict(load_file(str(running_weights)))  # copied onto the model's device
        testing_start = time.perf_counter()
        test_scores = {name: evaluate(model, *pairs, args.eval_batch_size) for name, pairs in test_pairs.items()}
        fidelity = (
            {"mask_fidelity": mask_fidelity(model, vars(args), fidelity_set, args.eval_batch_size)}
            if fidelity_set is not None and len(fidelity_set)
            else {}
        )
        testing_seconds = time.perf_counter() - testing_start
        results = {
            "train": args.train,
            "num_train_pairs": len(train_set),
            "best_step": best["step"],
            "validation_iou": best["iou"],
            "test": test_scores,
            **fidelity,
            "segmenter_family": SEGMENTER_FAMILIES[args.architecture],
            "segmenter": describe_segmenter(args.architecture, args.encoder_weights, args.segformer_size),
            # --real resolved: what read it later from another folder (mask-fidelity) finds the same pairs.
            "config": {**vars(args), "real": local_path_or_id(args.real)},
            # What rebuilds the architecture offline (load_trained_segmenter), whatever weights it started from.
            **({"segformer_config": model.segformer.config.to_dict()} if args.architecture == "segformer" else {}),
            "timing": {
                "start_up_s": round(start_up_seconds, 2),
                # Seconds since the process started when each phase ended (the model's is start_up_s).
                "start_up_phases_s": {phase: round(seconds, 2) for phase, seconds in start_up_phases.items()},
                "training_s": round(training_seconds, 2),
                "steps_per_s": round(step / training_seconds, 2),  # validations included
                "testing_s": round(testing_seconds, 2),  # the tests and the mask fidelity
                "total_s": round(seconds_since_process_start(), 2),
                "cuda_graphs": cuda_graphs,
                "cudnn_benchmark": args.cudnn_benchmark,
                "device": describe_device(accelerator.device),
            },
        }
        # A finished run being replaced is whole until here. Its results go first, so that a kill in these
        # three steps leaves no results (an unfinished run) rather than old results beside new weights.
        (output_dir / "results.json").unlink(missing_ok=True)
        os.replace(running_weights, output_dir / "best.safetensors")
        write_text_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
        logger.info(json.dumps(results["test"], indent=2))
    accelerator.end_training()
    if output_claim is not None:
        output_claim.release()


if __name__ == "__main__":
    # Bad input, damaged files or a missing optional extra: what is wrong, in one line.
    if exit_code := exit_code_of(main, (ValueError, OSError, ImportError, FloatingPointError)):
        sys.exit(exit_code)
    # All is written (results.json atomically; the logs and output streams flushed here): the interpreter's
    # teardown of torch, MONAI and diffusers is skipped, 1.5 s of a short run on 2 CPU cores.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
