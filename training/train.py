"""Train a Polyp-DDPM denoiser on image/mask pairs with accelerate.

examples:
    accelerate launch training/train.py --dataset data/kvasir-seg --output_dir runs/polyp-ddpm
    accelerate launch training/train.py ... --resume_from_checkpoint latest

Defaults are the paper's recipe (256 px, batch 32 with 2 accumulated micro-batches, 100k steps, 250-step cosine schedule, L1 loss on the noise,
rotation + horizontal flip applied jointly to image and mask). `--recipe cpu-demo` sets small values for a
few-minute run on a laptop CPU.
"""

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME, make_image_grid
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from polyp_diffusers import (
    PolypDDPMPipeline,
    PolypMaskPipeline,
    make_polyp_scheduler,
    make_polyp_unet_from_preset,
    make_sampler,
)
from polyp_diffusers.arguments import (
    CUDNN_BENCHMARK_HELP,
    HelpFormatter,
    Stopped,
    exit_code_of,
    fraction,
    image_side,
    non_negative_float,
    non_negative_int,
    output_path,
    positive_float,
    positive_int,
)
from polyp_diffusers.choices import COMPILE_MODES, MIXED_PRECISIONS, SAMPLERS
from polyp_diffusers.data import load_polyp_dataset, local_path_or_id, pairs_digest
from polyp_diffusers.folders import check_is_folder, check_output_apart
from polyp_diffusers.hub_card.cards import write_model_card
from polyp_diffusers.hub_card.publish import UploadError, hub_repo_id, push_folder
from polyp_diffusers.modeling import (
    PREDICTION_TYPES,
    UNET_PRESETS,
    check_snr_gamma,
    diffusion_loss,
)
from polyp_diffusers.pipelines import is_mask_model, mask_channels_of, masks_for_output
from polyp_diffusers.results import card_naming
from polyp_diffusers.training_utils import (
    StopRequest,
    check_weights_are_finite,
    checkpoint_step,
    claim_output,
    ema_weights,
    go_back_hint,
    leave_ctrl_c_to_the_training_process,
    list_checkpoints,
    non_finite_weights,
    partial_path,
    previous_checkpoint,
    publish_checkpoint,
    remove_partial_checkpoints,
    resolve_checkpoint,
    step_generators,
    training_seconds,
    training_settings,
    unexpected_entries,
    write_training_seconds,
    write_training_settings,
)
from polyp_diffusers.transforms import (
    JointAugment,
    mean_color,
    pair_tensors,
    pair_tensors_nbytes,
    shuffled_batches,
    tensor_batches,
    transformed_pairs,
)

logger = get_logger(__name__)

# Defaults that `--recipe` changes; anything given on the command line still wins.
RECIPES = {
    "paper": {},
    "cpu-demo": dict(
        model_preset="cpu-demo",
        gradient_accumulation_steps=1,
        resolution=64,
        train_batch_size=16,
        max_train_steps=400,
        learning_rate=5e-4,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=50,
        checkpointing_steps=100,
        validation_steps=100,
        num_validation_masks=6,
        validation_inference_steps=25,
        ema_max_decay=0.995,
        dataloader_num_workers=0,
    ),
}
# A saved pipeline's files, model_index.json (what makes a folder a pipeline to its loaders) last.
PIPELINE_FILES = (
    "unet",
    "scheduler",
    "pipeline_polyp_ddpm.py",
    "README.md",
    "card.json",
    "training_config.json",
    "model_index.json",
)
# What a resumed run may change: how long it goes on, how often it saves, logs and validates, where and how fast it
# runs (on how many processes, a preempted job's move; recorded), and its learning rate (the remedy for a run that
# diverged; recorded). Every other setting defines the model, its data or its training, which a resumed run
# continues: it must stay as it was.
RESUMABLE_CHANGES = {
    "recipe", "dataset", "validation_split", "max_preload_gb", "dataloader_num_workers", "max_train_steps",
    "max_train_minutes", "learning_rate", "learning_rate_changes", "num_processes_changes", "compile", "compile_mode",
    "allow_tf32", "cudnn_benchmark", "mixed_precision", "output_dir", "logging_steps", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "validation_steps", "num_validation_masks",
    "validation_sampler", "validation_inference_steps", "save_pipeline_steps", "logger", "logging_dir", "push_to_hub",
    "hub_model_id", "hub_private_repo",
}  # fmt: skip
# How a refused resume names settings that are not flags of their own.
SETTING_NAMES = {"use_ema": "EMA", "training pairs": "the training pairs"}
# What reading a damaged or truncated checkpoint raises (safetensors, torch pickles, missing files).
UNREADABLE_CHECKPOINT_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper", help="A set of defaults.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="A `polyp-ddpm prepare-data` folder or a Hub dataset id.")
    data.add_argument("--train_split", default="train", help="Split to train on.")
    data.add_argument(
        "--validation_split", default="test", help="Split whose masks (and images) fill the validation grid."
    )
    data.add_argument("--resolution", type=image_side, default=None, help="Training size; default: the model preset's.")
    data.add_argument(
        "--augment_degrees", type=non_negative_float, default=45.0, help="Random rotation range, +-degrees."
    )
    data.add_argument(
        "--augment_flip_probability", type=fraction, default=0.5, help="Chance of a joint horizontal flip."
    )
    data.add_argument(
        "--augment_zoom",
        type=positive_float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("MIN", "MAX"),
        help="Random magnification range (the reference code's crop used 0.8 1.2).",
    )
    data.add_argument(
        "--max_preload_gb",
        type=non_negative_float,
        default=4.0,
        help="Decode the training pairs once into the training device's memory when they take at most this many "
        "GiB (898 pairs at 256 px: 0.22); 0: always stream them through DataLoader workers.",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=non_negative_int,
        default=4,
        help="CPU workers that decode pairs that are not preloaded.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_preset",
        choices=sorted(UNET_PRESETS),
        default="paper",
        help="Denoiser size (polyp_diffusers.UNET_PRESETS).",
    )
    model.add_argument(
        "--num_train_timesteps", type=positive_int, default=250, help="Diffusion steps of the cosine schedule."
    )
    model.add_argument(
        "--prediction_type",
        choices=PREDICTION_TYPES,
        default="epsilon",
        help="What the UNet predicts: the noise (the paper) or the velocity (with --zero_terminal_snr, better "
        "colours at small budgets).",
    )
    model.add_argument(
        "--zero_terminal_snr", action="store_true", help="Rescale the betas so that the last step is pure noise."
    )
    model.add_argument("--dropout", type=fraction, default=0.0, help="Dropout in the residual blocks.")
    model.add_argument(
        "--mask_model",
        action="store_true",
        help="Train a model of the masks alone (saved as a PolypMaskPipeline): new masks for generate --mask-model.",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=positive_int, default=32, help="Per device.")
    optim.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=2,
        help="Micro-batches per optimizer step (the paper: 2 of 32, so 64 images per step).",
    )
    optim.add_argument("--max_train_steps", type=positive_int, default=100_000, help="Optimizer steps.")
    optim.add_argument(
        "--max_train_minutes",
        type=positive_float,
        default=None,
        help="Also stop, saving a checkpoint and the pipeline, at the first logging step after this many minutes "
        "of training in all (compilation included), counted across resumes from the checkpoints' clocks: the same "
        "command with --resume_from_checkpoint latest finishes a killed run's budget, and a larger value goes on.",
    )
    optim.add_argument("--learning_rate", type=positive_float, default=1e-4, help="Peak AdamW learning rate.")
    optim.add_argument(
        "--lr_scheduler",
        default="constant",
        help="Any diffusers get_scheduler name: constant, constant_with_warmup, cosine, linear, ...",
    )
    optim.add_argument(
        "--lr_warmup_steps", type=non_negative_int, default=0, help="Steps of linear warm-up of the learning rate."
    )
    optim.add_argument("--adam_beta1", type=fraction, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=fraction, default=0.999, help="AdamW beta2.")
    optim.add_argument("--adam_weight_decay", type=non_negative_float, default=0.0, help="AdamW weight decay.")
    optim.add_argument("--adam_epsilon", type=non_negative_float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument(
        "--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping; 0 disables it."
    )
    optim.add_argument("--loss", choices=("l1", "l2"), default="l1", help="Loss on the predicted noise.")
    optim.add_argument(
        "--snr_gamma",
        type=positive_float,
        default=None,
        help="Weight each image's loss by min-SNR with this gamma (Hang et al. 2023 use 5); needs --loss l2, for "
        "which the weights are derived. Default: unweighted, the paper's objective.",
    )
    optim.add_argument("--no_ema", dest="use_ema", action="store_false", help="Save the raw weights, not an EMA.")
    optim.add_argument(
        "--ema_max_decay",
        type=fraction,
        default=0.9995,
        help="The reference's 0.995 every 10 steps is about 0.9995 every step.",
    )
    optim.add_argument("--ema_power", type=positive_float, default=0.75, help="EMA warm-up power (diffusers EMAModel).")
    optim.add_argument("--seed", type=int, default=0, help="Seeds initialisation, data order, noise and augmentation.")
    optim.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the UNet. Default: on CUDA devices (a 256 px step ran 1.7x faster on an H200; "
        "compilation takes a minute or more, which a short run may not win back).",
    )
    optim.add_argument(
        "--compile_mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode; reduce-overhead adds CUDA graphs.",
    )
    optim.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    optim.add_argument("--cudnn_benchmark", action="store_true", help=CUDNN_BENCHMARK_HELP)

    run = parser.add_argument_group("checkpoints, validation, output")
    run.add_argument(
        "--output_dir",
        type=output_path,
        required=True,
        help="Checkpoints, logs, validation grids and the final pipeline go here.",
    )
    run.add_argument(
        "--logging_steps",
        type=positive_int,
        default=20,
        help="Log the mean loss and images/s every N steps: the training loop's only wait for the GPU.",
    )
    run.add_argument(
        "--checkpointing_steps", type=positive_int, default=1000, help="Save a resumable checkpoint every N steps."
    )
    run.add_argument(
        "--checkpoints_total_limit",
        type=positive_int,
        default=5,
        help="Keep only the newest N checkpoints (N >= 1; a large N keeps them all).",
    )
    run.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    run.add_argument(
        "--validation_steps", type=positive_int, default=1000, help="Sample the validation masks every N steps."
    )
    run.add_argument(
        "--num_validation_masks",
        type=positive_int,
        default=8,
        help="Masks (first of the validation split) in the grid.",
    )
    run.add_argument("--validation_sampler", choices=SAMPLERS, default="ddim", help="Sampler for the validation grid.")
    run.add_argument(
        "--validation_inference_steps", type=positive_int, default=50, help="Sampling steps for the validation grid."
    )
    run.add_argument(
        "--save_pipeline_steps",
        type=non_negative_int,
        default=0,
        help="Also save the (EMA) pipeline to output_dir every N steps; 0: only at the end.",
    )
    run.add_argument(
        "--logger", choices=("tensorboard", "wandb"), default="tensorboard", help="Where losses and grids are logged."
    )
    run.add_argument("--logging_dir", default="logs", help="Relative to output_dir.")
    run.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISIONS,
        default=None,
        help="Default: what `accelerate config` says.",
    )
    run.add_argument(
        "--push_to_hub", action="store_true", help="Upload the final pipeline (not checkpoints or logs) to the Hub."
    )
    run.add_argument("--hub_model_id", default=None, help="Default: the output_dir name.")
    run.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")

    recipe, _ = parser.parse_known_args(argv)
    parser.set_defaults(**RECIPES[recipe.recipe])
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = UNET_PRESETS[args.model_preset]["image_size"]
    if args.validation_inference_steps > args.num_train_timesteps:
        parser.error(
            f"--validation_inference_steps {args.validation_inference_steps} is more than the "
            f"{args.num_train_timesteps} steps of the schedule (--num_train_timesteps)."
        )
    if args.logger == "wandb" and not is_wandb_available():
        parser.error("--logger wandb needs the wandb package: pip install wandb (or use --logger tensorboard).")
    if args.logger == "tensorboard" and not is_tensorboard_available():
        parser.error("--logger tensorboard needs the [train] extra: pip install 'polyp-diffusers[train]'.")
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        parser.error(f"--max_train_minutes must be positive; got {args.max_train_minutes}.")
    try:
        check_snr_gamma(args.snr_gamma, args.prediction_type, args.zero_terminal_snr, args.loss)
    except ValueError as error:
        parser.error(str(error))
    return args


def make_ema(unet, args) -> EMAModel:
    """The EMA of the weights that the pipeline saves, updated with one `foreach` kernel per step."""
    return EMAModel(
        unet.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        power=args.ema_power,
        foreach=True,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )


def make_optimizer(unet, args) -> torch.optim.AdamW:
    """AdamW over the UNet's parameters, fused into one kernel on CUDA (where the parameters must already be)."""
    return torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=next(unet.parameters()).device.type == "cuda",
    )


def trained_pipeline(accelerator, unet, noise_scheduler, start_color) -> PolypDDPMPipeline | PolypMaskPipeline:
    """
    The pipeline around the model being trained (its current weights), with the trained DDPM schedule and the
    training images' mean colour (for sampling with `start_timestep`); a mask model's `PolypMaskPipeline`.
    """
    # Not the torch.compile wrapper: sampling in eval mode with another batch size would compile it again.
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)
    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    if is_mask_model(model.config):
        pipeline = PolypMaskPipeline(unet=model, scheduler=scheduler)
    else:
        pipeline = PolypDDPMPipeline(unet=model, scheduler=scheduler, start_color=start_color)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validation_pipeline(accelerator, unet, noise_scheduler, args) -> PolypDDPMPipeline | PolypMaskPipeline:
    """`trained_pipeline` with the validation grids' sampler (`--validation_sampler`)."""
    pipeline = trained_pipeline(accelerator, unet, noise_scheduler, args.start_color)
    pipeline.scheduler = make_sampler(args.validation_sampler, noise_scheduler.config)
    return pipeline


def validation_grid(pipeline, batch, args):
    """Generates images for the fixed validation masks; returns a grid whose rows are masks, generated, real."""
    sampling = dict(
        num_inference_steps=args.validation_inference_steps, generator=torch.Generator().manual_seed(args.seed)
    )
    if isinstance(pipeline, PolypMaskPipeline):  # rows: generated masks, real masks
        generated = pipeline(num_masks=len(batch["masks"]), **sampling).masks
        real = masks_for_output(batch["masks"], "pil")
        return make_image_grid([mask.convert("RGB") for mask in generated + real], rows=2, cols=len(real))
    out = pipeline(batch["masks"], **sampling)
    real = pipeline.image_processor.postprocess(batch["images"], output_type="pil")
    cells = [mask.convert("RGB") for mask in out.masks] + out.images + real
    return make_image_grid(cells, rows=3, cols=len(real))


def pipeline_is_saved(output_dir: Path, step: int) -> bool:
    """Whether `output_dir` holds the whole pipeline of `step` (its model_index.json is written last)."""
    try:
        saved_step = json.loads((output_dir / "training_config.json").read_text())["trained_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return saved_step == step and (output_dir / "model_index.json").is_file()


def save_pipeline(accelerator, unet, ema_model, noise_scheduler, args, step, output_dir):
    """Saves the EMA (or raw) weights as a PolypDDPMPipeline with its model card, replacing earlier files."""
    pipeline = trained_pipeline(accelerator, unet, noise_scheduler, args.start_color)
    unet = pipeline.unet
    check_denoiser_is_finite(unet, ema_model, step)
    staging = Path(output_dir) / ".pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with ema_weights(ema_model, unet):
        pipeline.save_pretrained(staging)
    config = {key: value for key, value in vars(args).items() if key not in ("push_to_hub", "hub_private_repo")}
    config.update(
        trained_steps=step,
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
        ema=args.use_ema,
    )
    write_model_card(
        pipeline,
        staging,
        repo_id=args.hub_model_id or Path(output_dir).resolve().name,
        training_config=config,
        dataset=args.dataset if not os.path.exists(args.dataset) else None,
    )
    # Also the data's resolved path (not on the card): the segmenters' leakage check reads it from any folder.
    recorded = {**config, "dataset_path": local_path_or_id(args.dataset)}
    (staging / "training_config.json").write_text(json.dumps(recorded, indent=2))
    # model_index.json goes first and comes back last: a run killed in between leaves no half pipeline that
    # loads, and its next save (a resumed run) writes it whole.
    (Path(output_dir) / "model_index.json").unlink(missing_ok=True)
    for name in PIPELINE_FILES:
        target = Path(output_dir) / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    shutil.rmtree(staging)


def check_denoiser_is_finite(unet, ema_model: EMAModel | None, step: int) -> None:
    """The weights and their EMA, before either is saved."""
    shadow_params = ema_model.shadow_params if ema_model is not None else None
    check_weights_are_finite(unet, step, "Resume from the last checkpoint with a lower --learning_rate.", shadow_params)


def register_checkpoint_hooks(accelerator, ema_model: EMAModel | None) -> None:
    """
    Checkpoints keep the weights (safetensors) outside accelerate's pickles, the EMA alongside; loading one
    reads safetensors only, and refuses weights that NaN or inf has reached before any is applied.
    """

    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            for model in models:
                model.save_pretrained(os.path.join(folder, "unet"))
                weights.pop()
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(folder, "unet_ema"))

    def load_model_hook(models, folder):
        # Safetensors only (no pickles), and no weights that NaN or inf has reached, checked before any is applied.
        loaded_unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        ema_folder = os.path.join(folder, "unet_ema")
        shadow_params = None
        if ema_model is not None:
            # Not EMAModel.from_pretrained (it cannot be held to safetensors), nor a UNet2DModel made from that
            # folder (its config also holds the EMA's decay, which diffusers would warn of as a damaged config).
            ema_tensors = load_file(os.path.join(ema_folder, SAFETENSORS_WEIGHTS_NAME))
            names = [name for name, _ in loaded_unet.named_parameters()]  # the EMA's order: the model's parameters
            if missing := [name for name in names if name not in ema_tensors]:
                raise ValueError(
                    f"{ema_folder} lacks {len(missing)} EMA weights (first: {missing[0]}); {go_back_hint(folder)}."
                )
            shadow_params = [ema_tensors[name] for name in names]
        non_finite = non_finite_weights(loaded_unet, shadow_params)
        if non_finite:
            raise ValueError(
                f"checkpoint {folder} has NaN or inf in {len(non_finite)} weight tensors (first: {non_finite[0]}): "
                f"the run had diverged or the files are damaged; {go_back_hint(folder)}."
            )
        if ema_model is not None:
            # EMAModel.save_pretrained keeps the EMA's decay and step in the model config.
            ema_model.load_state_dict({**UNet2DModel.load_config(ema_folder), "shadow_params": shadow_params})
            ema_model.to(accelerator.device)
        for _ in range(len(models)):
            model = models.pop()
            model.register_to_config(**loaded_unet.config)
            model.load_state_dict(loaded_unet.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def resume(accelerator, checkpoint, resume_from, output_dir):
    """
    Loads `checkpoint`, the one `resume_from` names, and returns it (None: start a new run). With `latest`, a newest
    checkpoint that cannot be read (a truncated or damaged file) gives way, with a warning, to the one before it;
    a checkpoint named explicitly that cannot be read is an error that suggests the one before it.
    """
    if resume_from and checkpoint is None:
        logger.info("No checkpoint found; starting a new run.")
    while checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}")
        try:
            accelerator.load_state(str(checkpoint))
            return checkpoint
        except UNREADABLE_CHECKPOINT_ERRORS as error:
            problem = f"checkpoint {checkpoint} cannot be read ({type(error).__name__}: {error})"
            if resume_from != "latest":
                raise ValueError(f"{problem}; {go_back_hint(checkpoint)}.") from error
            earlier = previous_checkpoint(checkpoint)
            if earlier is None:
                raise ValueError(
                    f"{problem}, and there is no earlier checkpoint in {output_dir}. To start a new run, move the "
                    f"checkpoint-* folders away (or choose another --output_dir), without --resume_from_checkpoint."
                ) from error
            logger.warning(f"{problem}; falling back to {earlier}.")
            checkpoint = earlier
    return None


def check_where_the_run_goes_on(output_dir: Path, checkpoint: Path | None, args) -> None:
    """
    Refuses, before any work, an output a run would write over: one holding files of another run or of nobody (a
    new run, or a run resumed from another folder's checkpoint), checkpoints newer than the one resumed (another
    continuation of the run, which its checkpoints would replace), or a checkpoint past --max_train_steps.
    """
    own = list_checkpoints(output_dir)
    elsewhere = checkpoint is not None and checkpoint.resolve().parent != output_dir.resolve()
    if checkpoint is None or elsewhere:
        if unexpected := unexpected_entries(output_dir, args.logging_dir):
            where = (
                f"resuming {checkpoint} there would mix two runs"
                if elsewhere
                else "train.py starts no new run over an earlier run's files or files it did not make"
            )
            hint = (
                f"resume with --resume_from_checkpoint latest to continue the run in {output_dir}"
                if own
                else f"{output_dir} holds no checkpoint to resume from"
            )
            raise ValueError(
                f"--output_dir {output_dir} already holds {', '.join(unexpected[:5])}: {where}; {hint}, or choose an "
                "empty or new folder."
            )
    if checkpoint is None:
        return
    step = checkpoint_step(checkpoint)
    if not elsewhere and (newer := [path.name for path in own if checkpoint_step(path) > step]):
        raise ValueError(
            f"{output_dir} holds {', '.join(newer)}, newer than {checkpoint.name}: resuming from it would write over "
            f"them. Move them out of {output_dir} first (to keep that continuation), or resume from latest."
        )
    if step > args.max_train_steps:
        raise ValueError(
            f"{checkpoint} is at step {step}, past --max_train_steps {args.max_train_steps}: resume from an earlier "
            "checkpoint, or give more steps."
        )


def run_settings(args, train_dataset) -> dict:
    """
    The settings that define a run, as a checkpoint records them: every argument but `RESUMABLE_CHANGES`, and the
    training pairs themselves (their count and content digest: a copy of the data in another place is the same
    data).
    """
    settings = {key: value for key, value in vars(args).items() if key not in RESUMABLE_CHANGES}
    settings["training pairs"] = f"{len(train_dataset)} pairs, SHA-256 {pairs_digest(train_dataset)[:16]}"
    return json.loads(json.dumps(settings, default=str))


def check_same_run(recorded: dict, settings: dict, checkpoint: Path) -> None:
    """Refuses to resume `checkpoint` with settings that define another run (see `RESUMABLE_CHANGES`)."""
    # Settings of one version only (a flag added since) are not compared: a checkpoint stays resumable after an update.
    names = [name for name in recorded if name in settings and name not in RESUMABLE_CHANGES]
    changed = [
        f"{SETTING_NAMES.get(name, '--' + name)} {_setting_value(recorded[name])} there, "
        f"{_setting_value(settings[name])} now"
        for name in names
        if recorded[name] != settings[name]
    ]
    if changed:
        raise ValueError(
            f"{checkpoint} was trained with other settings: {'; '.join(changed)}. A resumed run continues the same "
            "training, so these must stay as they were (its length, saving, logging, validation and learning rate "
            "may change); to train with them, start a new run in another --output_dir."
        )


def _setting_value(value) -> str:
    """A recorded setting as a user reads it: a switch is on or off (`EMA True` would hide that --no_ema sets it)."""
    return ("on" if value else "off") if isinstance(value, bool) else repr(value)


def place_schedule(lr_scheduler, learning_rate: float, position: int) -> None:
    """
    Puts a resumed run's learning-rate schedule at `position` (scheduler steps) with the peak `learning_rate`. The
    loaded scheduler holds the checkpoint's peak and position: a new --learning_rate scales the schedule from there
    on, and another number of processes moves the position (accelerate steps the schedule once per process).
    """
    scheduler = lr_scheduler.scheduler  # accelerate's wrapper around the `get_scheduler` LambdaLR
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    scheduler.last_epoch = position
    for group, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(position)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def continue_schedule(lr_scheduler, checkpoint_settings: dict, args, num_processes: int, step: int) -> None:
    """
    Carries a resumed run's learning-rate schedule over from its checkpoint, recording in `args` what changed
    there (a new peak rate, another number of processes) and warning of a rate that jumps (a run made longer
    or shorter on a schedule that decays).
    """
    scheduler = lr_scheduler.scheduler
    loaded_learning_rate = scheduler.base_lrs[0]  # the checkpoint's, whatever its records say
    rate_there = scheduler.get_last_lr()[0]  # the checkpoint's schedule at its step
    if loaded_learning_rate != args.learning_rate:
        change = {"step": step, "from": loaded_learning_rate, "to": args.learning_rate}
        args.learning_rate_changes = [*args.learning_rate_changes, change]
        logger.info(f"The learning rate goes from {change['from']:g} to {change['to']:g} at step {step}.")
    recorded_processes = checkpoint_settings.get("num_processes")
    if recorded_processes is None:  # a checkpoint older than the record: its schedule went on step x processes
        recorded_processes = max(1, round(scheduler.last_epoch / step)) if step else num_processes
    if recorded_processes != num_processes:
        args.num_processes_changes = [
            *args.num_processes_changes,
            {"step": step, "from": recorded_processes, "to": num_processes},
        ]
        images = args.train_batch_size * args.gradient_accumulation_steps
        logger.warning(
            f"The run trained on {recorded_processes} process(es) up to step {step} and goes on with {num_processes}: "
            f"a step now takes {images * num_processes} images instead of {images * recorded_processes}. The "
            f"learning-rate schedule goes on from step {step} of {args.max_train_steps}."
        )
    place_schedule(lr_scheduler, args.learning_rate, round(scheduler.last_epoch * num_processes / recorded_processes))
    rate_here = scheduler.get_last_lr()[0]
    # With a new peak rate, that change is said above (and the `polynomial` schedule's fixed end rate would not
    # scale with it): a jump is told only of the schedule's length.
    same_peak = loaded_learning_rate == args.learning_rate
    if same_peak and not math.isclose(rate_here, rate_there, rel_tol=1e-6, abs_tol=1e-15):
        logger.warning(
            f"The learning rate at step {step} is {rate_here:g} on this run's {args.lr_scheduler} schedule and was "
            f"{rate_there:g} on the checkpoint's: --max_train_steps {args.max_train_steps} made the schedule longer "
            "or shorter, so the rate jumps here."
        )


def make_accelerator(args, output_dir: Path) -> Accelerator:
    """The run's accelerator, with its logging, seed and the GPU's arithmetic settings."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return accelerator


class TrainingPairs:
    """
    The training pairs as the loop takes them: decoded and resized once into the device's memory when they fit in
    `--max_preload_gb`, else by CPU workers at every step; batched in an order that depends only on the seed and
    the epoch, so that a resumed run takes the batches it would have. A model of masks takes the masks alone: no
    image is decoded or held for it.
    """

    def __init__(self, dataset, args, accelerator):
        self.dataset, self.args, self.accelerator = dataset, args, accelerator
        with_images = not args.mask_model
        self.preloaded = pair_tensors_nbytes(len(dataset), args.resolution, with_images) <= args.max_preload_gb * 2**30
        if self.preloaded:
            self.images, self.masks = pair_tensors(
                dataset,
                args.resolution,
                accelerator.device,
                progress=accelerator.is_local_main_process,
                with_images=with_images,
            )
            self.batches_per_epoch = len(dataset) // args.train_batch_size // accelerator.num_processes
        else:
            self.dataloader = torch.utils.data.DataLoader(
                transformed_pairs(dataset, args.resolution, with_images),
                batch_size=args.train_batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=args.dataloader_num_workers,
                persistent_workers=args.dataloader_num_workers > 0,
                worker_init_fn=leave_ctrl_c_to_the_training_process,
            )
            self.batches_per_epoch = len(self.dataloader)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} training pairs are fewer than one batch of {args.train_batch_size} per process."
            )

    def prepare(self) -> None:
        """Shards a streaming loader among the processes (preloaded pairs are sharded by `epoch_batches`)."""
        if not self.preloaded:
            self.dataloader = self.accelerator.prepare(self.dataloader)
            self.batches_per_epoch = len(self.dataloader)

    def mean_color(self) -> list[float]:
        """The training images' mean colour (of the first 1,000 when they stream), where sampling may start."""
        if self.preloaded:
            return mean_color(self.images)
        first = self.dataset.select(range(min(len(self.dataset), 1000)))
        return mean_color(pair_tensors(first, self.args.resolution, progress=self.accelerator.is_local_main_process)[0])

    @property
    def steps_per_epoch(self) -> float:
        """
        Optimizer steps per epoch. Preloaded batches accumulate across epochs; a DataLoader prepared by accelerate
        also steps the optimizer at the end of an epoch whose last micro-batches do not fill an accumulation, and
        starts counting anew in the next epoch.
        """
        steps = self.batches_per_epoch / self.args.gradient_accumulation_steps
        return steps if self.preloaded else math.ceil(steps)

    def position(self, global_step: int) -> tuple[int, int, int]:
        """Where step `global_step` begins: its epoch, the batches of that epoch behind it, and its micro-batch."""
        accumulation = self.args.gradient_accumulation_steps
        if self.preloaded:
            micro_step = global_step * accumulation
            epoch, batches_to_skip = divmod(micro_step, self.batches_per_epoch)
            return epoch, batches_to_skip, micro_step
        epoch = global_step // self.steps_per_epoch
        batches_to_skip = (global_step % self.steps_per_epoch) * accumulation
        return epoch, batches_to_skip, epoch * self.batches_per_epoch + batches_to_skip

    def epoch_batches(self, epoch: int, skip: int):
        """The micro-batches of one epoch from the `skip`-th on."""
        accelerator = self.accelerator
        if self.preloaded:
            batches = shuffled_batches(
                len(self.dataset), self.args.train_batch_size, self.args.seed, epoch, accelerator.device,
                accelerator.process_index, accelerator.num_processes,
            )  # fmt: skip
            return tensor_batches(self.images, self.masks, batches, skip)
        loader = accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
        loader.set_epoch(epoch)  # the shuffling order of this epoch, also in a loader that skips batches
        return loader


class TrainingClock:
    """Seconds trained in all, the checkpoint's included (the time budget spans resumes), on the slowest process."""

    def __init__(self, accelerator, trained_before: float):
        self.accelerator, self.trained_before, self.start = accelerator, trained_before, time.perf_counter()

    def read(self, stop_signal: int = 0) -> tuple[float, int]:
        """
        The seconds, and the stop signal any process received (0 for none): every process must call it (a gather),
        so that all see the same and stop at the same step.
        """
        elapsed = torch.tensor(
            [[self.trained_before + time.perf_counter() - self.start, stop_signal]], device=self.accelerator.device
        )
        seconds, signum = self.accelerator.gather(elapsed).amax(0).tolist()
        return seconds, int(signum)


class LogWindow:
    """
    The loss and the speed since the last log. Losses add up on the device and are read once a window: a read
    waits for all queued GPU work.
    """

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.start, self.steps, self.micro_batches, self.images = time.perf_counter(), 0, 0, 0

    def add(self, loss: torch.Tensor, images: int, stepped: bool) -> None:
        """One micro-batch's loss, the images all processes took in it, and whether the optimizer stepped after it."""
        self.loss += loss.detach()
        self.micro_batches += 1
        self.images += images
        self.steps += stepped

    def read(self, accelerator, global_step: int) -> tuple[float, float]:
        """
        The mean loss of every process's micro-batches, and images per second, since the last read; a loss that is
        not finite stops the run before anything more is saved from it.
        """
        loss = (accelerator.reduce(self.loss, "mean") / self.micro_batches).item()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss} at step {global_step} (mean of steps {global_step - self.steps + 1} to "
                f"{global_step}): the training diverged, nothing more is saved. Resume from the last checkpoint with "
                "a lower --learning_rate."
            )
        images_per_second = self.images / (time.perf_counter() - self.start)
        self.reset()
        return loss, images_per_second


def save_checkpoint(accelerator, unet, ema_model, output_dir: Path, step: int, clock: TrainingClock, settings, args):
    """
    Saves the training state of `step` into a partial folder, published whole (a kill leaves the checkpoints before
    it), with the time trained and the settings a resume must keep. Returns it (None on processes but the main).
    """
    check_denoiser_is_finite(accelerator.unwrap_model(unet, keep_torch_compile=False), ema_model, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_path(output_dir, step)))
    seconds, _ = clock.read()  # as the time budget reads it
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    write_training_seconds(partial_path(output_dir, step), seconds)
    write_training_settings(
        partial_path(output_dir, step),
        {
            **settings,
            "learning_rate": args.learning_rate,
            "learning_rate_changes": args.learning_rate_changes,
            "num_processes": accelerator.num_processes,
            "num_processes_changes": args.num_processes_changes,
        },
    )
    saved = publish_checkpoint(output_dir, step, args.checkpoints_total_limit)
    logger.info(f"Saved {saved}")
    return saved


def finish(accelerator, unet, ema_model, noise_scheduler, args, step: int, first_step: int, output_dir, repo_id):
    """Saves the pipeline, unless a finished run resumed (it trained no step) finds its own, and pushes it if asked."""
    # The saved pipeline's card may hold results added since.
    if step == first_step and pipeline_is_saved(output_dir, step):
        logger.info(f"The pipeline of step {step} is in {output_dir} already: kept, with its card.")
    else:
        save_pipeline(accelerator, unet, ema_model, noise_scheduler, args, step, output_dir)
        logger.info(f"Saved the pipeline to {output_dir}")
    if not args.push_to_hub:
        return
    try:
        repo_id = push_folder(
            output_dir,
            repo_id,
            args.hub_private_repo,
            ignore_patterns=["checkpoint-*", f"{args.logging_dir}/*", "validation/*", ".*"],
            commit_message="Polyp-DDPM training run",
            name_repo=card_naming(trained_pipeline(accelerator, unet, noise_scheduler, args.start_color), output_dir),
        )
    except UploadError as error:
        raise UploadError(
            f"{error} Or run this command again with --resume_from_checkpoint latest: it trains no step and "
            "pushes the saved pipeline."
        ) from error
    logger.info(f"Pushed to https://huggingface.co/{repo_id}")


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # The output folder (instant), then the data (maybe a download): a wrong one is one line of error, before
    # anything is written.
    check_is_folder(output_dir)
    check_output_apart(output_dir, {"dataset": args.dataset})
    repo_id = hub_repo_id(args.hub_model_id, output_dir, "--hub_model_id") if args.push_to_hub else None
    named_checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    check_where_the_run_goes_on(output_dir, named_checkpoint, args)
    train_dataset = load_polyp_dataset(args.dataset, split=args.train_split)
    validation_dataset = load_polyp_dataset(args.dataset, split=args.validation_split)
    settings = run_settings(args, train_dataset)
    recorded = training_settings(named_checkpoint) if named_checkpoint is not None else None
    if recorded is not None:
        check_same_run(recorded, settings, named_checkpoint)
    accelerator = make_accelerator(args, output_dir)
    output_claim = claim_output(accelerator, output_dir)
    if accelerator.is_main_process:
        remove_partial_checkpoints(output_dir)

    # Data, augmented on the device; the start colour is derived from it and saved with the configuration and in
    # the pipeline config (a mask model has no colour).
    pairs = TrainingPairs(train_dataset, args, accelerator)
    args.start_color = None if args.mask_model else pairs.mean_color()
    validation_batch = validation_dataset.select(range(min(args.num_validation_masks, len(validation_dataset))))
    validation_batch = transformed_pairs(validation_batch, args.resolution, with_images=not args.mask_model)[:]
    augment = JointAugment(args.augment_degrees, tuple(args.augment_zoom), args.augment_flip_probability)

    # Model, EMA, optimizer and learning-rate schedule.
    channels = dict(image_channels=1, mask_channels=0) if args.mask_model else {}
    unet = make_polyp_unet_from_preset(args.model_preset, image_size=args.resolution, dropout=args.dropout, **channels)
    unet.to(accelerator.device)  # before the EMA copies and the fused optimizer see its parameters
    mask_channels = mask_channels_of(unet.config)
    noise_scheduler = make_polyp_scheduler(args.num_train_timesteps, args.prediction_type, args.zero_terminal_snr)
    # The validation sampler's steps, now rather than at the first grid, after training steps that would be lost.
    validation_pipeline(accelerator, unet, noise_scheduler, args).check_model_and_steps(args.validation_inference_steps)
    ema_model = make_ema(unet, args) if args.use_ema else None
    optimizer = make_optimizer(unet, args)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    register_checkpoint_hooks(accelerator, ema_model)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    pairs.prepare()
    if ema_model is not None:
        ema_model.to(accelerator.device)
    if args.compile if args.compile is not None else accelerator.device.type == "cuda":
        unet = torch.compile(unet, mode=args.compile_mode)

    checkpoint = resume(accelerator, named_checkpoint, args.resume_from_checkpoint, output_dir)
    global_step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    first_step = global_step
    # A new learning rate and another number of processes are the changes a resume makes to the training itself:
    # each is recorded with the step it took effect.
    if checkpoint != named_checkpoint:  # `latest` fell back to an earlier checkpoint: that one must match too
        recorded = training_settings(checkpoint)
        if recorded is not None:
            check_same_run(recorded, settings, checkpoint)
    checkpoint_settings = recorded or {}
    trained_before = training_seconds(checkpoint)  # the time budget spans resumes
    args.learning_rate_changes = checkpoint_settings.get("learning_rate_changes", [])
    args.num_processes_changes = checkpoint_settings.get("num_processes_changes", [])
    if checkpoint is not None:
        continue_schedule(lr_scheduler, checkpoint_settings, args, accelerator.num_processes, global_step)

    if accelerator.is_main_process:
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("polyp-ddpm", config=tracker_config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} training pairs "
        f"({'preloaded on ' + str(accelerator.device) if pairs.preloaded else 'streamed'}), "
        f"{pairs.steps_per_epoch:g} steps per epoch, batch {total_batch} in all, "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters, resolution {args.resolution}"
    )
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    epoch, batches_to_skip, micro_step = pairs.position(global_step)
    window = LogWindow(accelerator.device)
    clock = TrainingClock(accelerator, trained_before)
    out_of_time = args.max_train_minutes is not None and trained_before >= args.max_train_minutes * 60
    if out_of_time:
        logger.info(f"The --max_train_minutes {args.max_train_minutes} budget was spent by {checkpoint}.")
    # Ctrl-C or SIGTERM: a checkpoint at the next step that every process reaches, then a stop.
    stop_signal = 0
    with StopRequest() as stop_request:
        while global_step < args.max_train_steps and not out_of_time and not stop_signal:
            unet.train()
            batches = pairs.epoch_batches(epoch, batches_to_skip)
            batches_to_skip = 0
            for batch in batches:
                augment_generator, noise_generator = step_generators(
                    args.seed, micro_step, accelerator.process_index, accelerator.device
                )
                micro_step += 1
                with accelerator.accumulate(unet):
                    images, masks = augment(batch["images"], batch["masks"], augment_generator)
                    if args.mask_model:  # what is denoised is the mask itself, in [-1, 1], seeing nothing else
                        images = masks * 2 - 1
                    loss = diffusion_loss(
                        unet, noise_scheduler, images, masks, mask_channels, noise_generator, args.loss, args.snr_gamma
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window.add(loss, images.shape[0] * accelerator.num_processes, stepped=accelerator.sync_gradients)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                if ema_model is not None:
                    ema_model.step(unet.parameters())
                progress.update(1)
                last_step = global_step == args.max_train_steps
                if accelerator.num_processes == 1:
                    stop_signal = stop_request.signum or 0
                if global_step % args.logging_steps == 0 and (
                    args.max_train_minutes is not None or accelerator.num_processes > 1
                ):
                    # The slowest process's clock and any process's signal, so that all processes stop at the same step.
                    seconds, stop_signal = clock.read(stop_request.signum or 0)
                    out_of_time = args.max_train_minutes is not None and seconds > args.max_train_minutes * 60
                if global_step == args.max_train_steps:
                    stop_signal = 0  # nothing is left to train: the run finishes as it would have
                last_step = last_step or out_of_time or bool(stop_signal)
                checkpoint_due = global_step % args.checkpointing_steps == 0 or last_step
                # A stop on a signal is asked to be quick: no grid beyond those of --validation_steps.
                validation_due = global_step % args.validation_steps == 0 or (last_step and not stop_signal)
                # Also before a checkpoint or a validation grid: neither is made from a diverged run.
                if global_step % args.logging_steps == 0 or checkpoint_due or validation_due:
                    loss_value, images_per_second = window.read(accelerator, global_step)
                    logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_per_second}
                    if ema_model is not None:
                        logs["ema_decay"] = ema_model.cur_decay_value
                    if accelerator.device.type == "cuda":
                        logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                    progress.set_postfix(
                        loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.1f}"
                    )
                    accelerator.log(logs, step=global_step)

                if checkpoint_due:
                    saved = save_checkpoint(
                        accelerator, unet, ema_model, output_dir, global_step, clock, settings, args
                    )
                if accelerator.is_main_process and validation_due:
                    run_validation(
                        accelerator, unet, ema_model, noise_scheduler, validation_batch, args, global_step, output_dir
                    )
                if (
                    accelerator.is_main_process
                    and args.save_pipeline_steps
                    and global_step % args.save_pipeline_steps == 0
                    and not last_step
                ):
                    save_pipeline(accelerator, unet, ema_model, noise_scheduler, args, global_step, output_dir)
                if last_step:
                    if out_of_time:
                        logger.info(
                            f"Stopped at step {global_step}: --max_train_minutes {args.max_train_minutes} passed."
                        )
                    break
            epoch += 1

    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not stop_signal:
        finish(accelerator, unet, ema_model, noise_scheduler, args, global_step, first_step, output_dir, repo_id)
    accelerator.end_training()  # the trackers' last writes into output_dir
    if output_claim is not None:
        output_claim.release()
    if stop_signal:
        raise Stopped(
            f"Stopped by {signal.Signals(stop_signal).name} at step {global_step}, saved as {saved}. The same command "
            "with --resume_from_checkpoint latest goes on from there."
            if accelerator.is_main_process
            else "",  # said once
            stop_signal,
        )


def run_validation(accelerator, unet, ema_model, noise_scheduler, validation_batch, args, step, output_dir):
    """Samples the fixed validation masks with the EMA weights; saves and logs the grid."""
    pipeline = validation_pipeline(accelerator, unet, noise_scheduler, args)
    model = pipeline.unet
    model.eval()
    with ema_weights(ema_model, model), accelerator.autocast():
        grid = validation_grid(pipeline, validation_batch, args)
    model.train()
    folder = Path(output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb  # the optional [wandb] extra, present when --logger wandb works at all

            tracker.log({"validation": wandb.Image(grid, caption="rows: masks, generated, real")}, step=step)


if __name__ == "__main__":
    # Bad input or damaged files: what is wrong, in one line; so is a Ctrl-C before training (in it, a stop).
    sys.exit(
        exit_code_of(
            main,
            interrupted="interrupted: every checkpoint written whole is kept; the same command with "
            "--resume_from_checkpoint latest goes on from the newest.",
        )
    )
