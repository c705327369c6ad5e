"""Convert the authors' released Polyp-DDPM checkpoint (a pickled `model.pt`) into a `PolypDDPMPipeline`.

Their checkpoint is `{"step": int, "model": state_dict, "ema": state_dict}` of their `GaussianDiffusion`, whose
`denoise_fn.*` entries are a guided-diffusion UNet. Every tensor is mapped onto the equivalent
`UNet2DModel` configuration built by `make_polyp_unet`; anything unmapped, left over or of the wrong shape is
an error. The file is read with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

import math
import os
import re
import shutil
from pathlib import Path

import torch

from .folders import check_is_folder, check_output_apart, is_empty, replace_folder, staging_folder
from .hub_card.cards import write_model_card
from .hub_card.publish import hub_repo_id, push_folder
from .modeling import make_polyp_scheduler, make_polyp_unet
from .pipelines import PolypDDPMPipeline, non_finite_names
from .results import card_naming
from .safe_loading import torch_load_safely

AUTHORS_REPOSITORY = "https://github.com/mobaidoctor/polyp-ddpm"
DENOISER_PREFIX = "denoise_fn."
# The reference puts self-attention at feature maps of 16x16 (its `attention_resolutions="16"`).
ATTENTION_SIDE = 16

RESBLOCK_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


class ConversionError(ValueError):
    """The checkpoint is not what the converter expects; the message says what was expected."""


def load_official_checkpoint(path: str | os.PathLike, weights: str = "ema") -> tuple[dict, int | None]:
    """Reads the denoiser's state dict (`weights` is "ema" or "model") and the training step, safely."""
    if weights not in ("ema", "model"):
        raise ConversionError(f"weights is {weights!r}; expected 'ema' or 'model'.")
    checkpoint = torch_load_safely(path, "the authors' checkpoint (.pt) of state dicts", ConversionError)
    if not isinstance(checkpoint, dict) or weights not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"{path} holds {found}; expected the official format, a dict with 'step', 'model' and 'ema' "
            "(state dicts of their GaussianDiffusion)."
        )
    state = checkpoint[weights]
    if not isinstance(state, dict) or not any(str(k).startswith(DENOISER_PREFIX) for k in state):
        raise ConversionError(
            f"{path}['{weights}'] has no '{DENOISER_PREFIX}*' entries; expected the state dict of their GaussianDiffusion."
        )
    not_tensors = [
        name
        for name, value in state.items()
        if str(name).startswith(DENOISER_PREFIX) and not isinstance(value, torch.Tensor)
    ]
    if "betas" in state and not (isinstance(state["betas"], torch.Tensor) and state["betas"].dim() == 1):
        not_tensors.append("betas")
    if not_tensors:
        raise ConversionError(
            f"{path}['{weights}'] holds {len(not_tensors)} entries that are not tensors (first: {not_tensors[0]!r}; "
            "betas must be one per timestep); expected the state dict of their GaussianDiffusion."
        )
    step = checkpoint.get("step")  # recorded in the card; a step that is no finite number is not recorded
    is_number = isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
    return state, int(step) if is_number else None


def _blocks(state: dict, prefix: str) -> dict[int, set[str]]:
    """Index -> names of the entries of `prefix.<index>.*`."""
    found: dict[int, set[str]] = {}
    for key in state:
        match = re.match(rf"{re.escape(prefix)}\.(\d+)\.(.+)$", key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return found


def infer_config(denoiser: dict) -> dict:
    """Reads the network's shape (levels, widths, blocks, attention, channels) from its tensors."""
    try:
        base_channels, in_channels = denoiser["input_blocks.0.0.weight"].shape[:2]
        out_channels = denoiser["out.2.weight"].shape[0]
    except KeyError as error:
        raise ConversionError(f"the denoiser has no {error}; expected a guided-diffusion UNet.") from error
    levels: list[dict] = [{"blocks": 0, "attention": False, "width": None}]
    for index, names in sorted(_blocks(denoiser, "input_blocks").items())[1:]:
        if "0.op.weight" in names:
            levels.append({"blocks": 0, "attention": False, "width": None})
            continue
        level = levels[-1]
        level["blocks"] += 1
        level["width"] = denoiser[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0]
        level["attention"] |= "1.qkv.weight" in names
    if len({level["blocks"] for level in levels}) != 1 or any(level["width"] is None for level in levels):
        raise ConversionError(f"levels with different numbers of residual blocks: {levels}; expected a regular UNet.")
    widths = [level["width"] for level in levels]
    if any(width % base_channels for width in widths):
        raise ConversionError(f"level widths {widths} are not multiples of the base width {base_channels}.")
    attention_levels = [i for i, level in enumerate(levels) if level["attention"]]
    if not attention_levels:
        raise ConversionError("no attention block found; expected attention at the 16x16 level.")
    return {
        "image_size": ATTENTION_SIDE * 2 ** attention_levels[0],
        "base_channels": int(base_channels),
        "channel_mult": tuple(width // base_channels for width in widths),
        "layers_per_block": levels[0]["blocks"],
        "attention_levels": attention_levels,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
    }


def _map_resblock(source: str, target: str, names: set[str]) -> dict[str, str]:
    mapping = {}
    for name in names:
        part, _, leaf = name.rpartition(".")
        if part not in RESBLOCK_PARTS:
            raise ConversionError(f"unexpected residual-block entry {source}.{name}")
        mapping[f"{source}.{name}"] = f"{target}.{RESBLOCK_PARTS[part]}.{leaf}"
    return mapping


def _split_attention(denoiser: dict, source: str, target: str) -> dict[str, torch.Tensor]:
    """guided-diffusion's fused 1-D-conv qkv and proj_out to diffusers' Linear to_q/to_k/to_v/to_out (one head)."""
    qkv_weight = denoiser[f"{source}.qkv.weight"][..., 0]
    qkv_bias = denoiser[f"{source}.qkv.bias"]
    channels = qkv_weight.shape[1]
    tensors = {
        f"{target}.group_norm.weight": denoiser[f"{source}.norm.weight"],
        f"{target}.group_norm.bias": denoiser[f"{source}.norm.bias"],
        f"{target}.to_out.0.weight": denoiser[f"{source}.proj_out.weight"][..., 0],
        f"{target}.to_out.0.bias": denoiser[f"{source}.proj_out.bias"],
    }
    for index, name in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(index * channels, (index + 1) * channels)
        tensors[f"{target}.{name}.weight"] = qkv_weight[rows]
        tensors[f"{target}.{name}.bias"] = qkv_bias[rows]
    return tensors


def convert_denoiser(denoiser: dict, config: dict) -> dict[str, torch.Tensor]:
    """Their tensors renamed (and attention split) to diffusers' `UNet2DModel` names; every entry used once."""
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(mapping: dict[str, str]):
        for source, target in mapping.items():
            converted[target] = denoiser[source]
            used.add(source)

    def take_attention(source: str, target: str):
        converted.update(_split_attention(denoiser, source, target))
        used.update(k for k in denoiser if k.startswith(f"{source}."))

    def take_conv(source: str, target: str):
        take({f"{source}.{leaf}": f"{target}.{leaf}" for leaf in ("weight", "bias")})

    def take_block(source: str, names: set[str], target: str, block: int):
        """A residual block (`source.0`) and, where it has one, its attention (`source.1`)."""
        resnet = {n[2:] for n in names if n.startswith("0.")}
        take(_map_resblock(f"{source}.0", f"{target}.resnets.{block}", resnet))
        if "1.qkv.weight" in names:
            take_attention(f"{source}.1", f"{target}.attentions.{block}")

    for source, target in TOP_LEVEL.items():
        take_conv(source, target)

    input_blocks = _blocks(denoiser, "input_blocks")
    output_blocks = _blocks(denoiser, "output_blocks")
    num_levels, layers = len(config["channel_mult"]), config["layers_per_block"]
    index = 1
    for level in range(num_levels):
        for block in range(layers):
            take_block(f"input_blocks.{index}", input_blocks[index], f"down_blocks.{level}", block)
            index += 1
        if level < num_levels - 1:
            take_conv(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            index += 1

    middle = _blocks(denoiser, "middle_block")
    take(_map_resblock("middle_block.0", "mid_block.resnets.0", middle[0]))
    take_attention("middle_block.1", "mid_block.attentions.0")
    take(_map_resblock("middle_block.2", "mid_block.resnets.1", middle[2]))

    index = 0
    for up_level in range(num_levels):
        for block in range(layers + 1):
            names = output_blocks[index]
            take_block(f"output_blocks.{index}", names, f"up_blocks.{up_level}", block)
            if upsample := [n for n in names if re.match(r"\d+\.conv\.", n)]:
                position = upsample[0].split(".")[0]
                take_conv(f"output_blocks.{index}.{position}.conv", f"up_blocks.{up_level}.upsamplers.0.conv")
            index += 1

    leftover = sorted(set(denoiser) - used)
    if leftover:
        raise ConversionError(f"{len(leftover)} tensor(s) of the checkpoint were not mapped: {leftover[:10]}")
    return converted


def fold_mask_channels(conv_in_weight: torch.Tensor) -> torch.Tensor:
    """
    Their first convolution reads the mask as 3 identical RGB channels; summing those 3 kernels gives the
    1-channel kernel that computes exactly the same function for a mask replicated to RGB.
    """
    return torch.cat([conv_in_weight[:, :3], conv_in_weight[:, 3:].sum(dim=1, keepdim=True)], dim=1)


def convert_official_checkpoint(
    path: str | os.PathLike, weights: str = "ema", keep_rgb_mask: bool = False
) -> tuple[PolypDDPMPipeline, dict]:
    """The authors' checkpoint as a `PolypDDPMPipeline`, and a description of what was converted."""
    state, step = load_official_checkpoint(path, weights)
    denoiser = {k[len(DENOISER_PREFIX) :]: v for k, v in state.items() if k.startswith(DENOISER_PREFIX)}
    config = infer_config(denoiser)
    if config["out_channels"] != 3 or config["in_channels"] not in (4, 6):
        raise ConversionError(
            f"the denoiser has {config['in_channels']} input and {config['out_channels']} output channels; "
            "expected 6 (or 4) in and 3 out."
        )
    tensors = convert_denoiser(denoiser, config)
    mask_channels = config["in_channels"] - 3
    if mask_channels == 3 and not keep_rgb_mask:
        tensors["conv_in.weight"] = fold_mask_channels(tensors["conv_in.weight"])
        mask_channels = 1

    unet = make_polyp_unet(
        image_size=config["image_size"],
        base_channels=config["base_channels"],
        channel_mult=config["channel_mult"],
        layers_per_block=config["layers_per_block"],
        attention_resolutions=(ATTENTION_SIDE,),
        mask_channels=mask_channels,
    )
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or extra or wrong_shape:
        raise ConversionError(
            f"the checkpoint does not fit the inferred configuration {config}: missing {missing[:10]}, "
            f"unexpected {extra[:10]}, wrong shapes {wrong_shape[:10]}"
        )
    unet.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    if non_finite := non_finite_names(unet.named_parameters()):  # a diverged run: every loader would refuse it
        raise ConversionError(
            f"the checkpoint's {weights} weights hold NaN or inf in {len(non_finite)} tensors (first: {non_finite[0]}); "
            "convert an earlier checkpoint of the run."
        )

    scheduler = make_polyp_scheduler(len(state["betas"]) if "betas" in state else 250)
    if "betas" in state:
        # Stored in half precision, betas are rounded to a relative 2**-11: that is their precision, not another schedule.
        betas = state["betas"]
        relative_precision = torch.finfo(betas.dtype).eps if betas.is_floating_point() else 0.0
        difference = (scheduler.betas.double() - betas.double()).abs()
        if not torch.all(difference <= 1e-5 + relative_precision * scheduler.betas.double().abs()):
            raise ConversionError(
                f"the checkpoint's betas differ from the cosine schedule by {difference.max().item():.2e}."
            )
    description = {
        "source": str(path),
        "weights": weights,
        "step": step,
        "config": config,
        "mask_channels": mask_channels,
        "num_train_timesteps": scheduler.config.num_train_timesteps,
    }
    return PolypDDPMPipeline(unet=unet, scheduler=scheduler), description


def write_converted_pipeline(
    pipeline: PolypDDPMPipeline,
    description: dict,
    output: str | os.PathLike,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
) -> Path:
    """
    Saves the converted pipeline, with a model card that credits the authors and says what was done, into a
    new or empty folder; optionally uploads it (`hub_model_id`, default: the folder's name).
    """
    output = Path(output)
    check_is_folder(output)
    check_output_apart(output, {"checkpoint": description["source"]})
    if not is_empty(output):
        raise FileExistsError(f"{output} is not empty; choose a new folder for the converted pipeline.")
    repo_id = hub_repo_id(hub_model_id, output, "--hub-id") if push_to_hub else hub_model_id or output.resolve().name
    staging = staging_folder(output)
    try:
        pipeline.save_pretrained(staging)
        step = f" (training step {description['step']})" if description["step"] is not None else ""
        mask_note = (
            "the three mask input kernels of the first convolution were summed into one (exactly the same function "
            "for a binary mask replicated to RGB), so the model takes the mask as one channel"
            if description["mask_channels"] == 1 and description["config"]["in_channels"] == 6
            else f"the model keeps its {description['mask_channels']}-channel mask input"
        )
        provenance = (
            f"These weights were **converted, not trained here**: the {description['weights'].upper()} weights of the "
            f"checkpoint `{Path(description['source']).name}`{step}, a model of "
            f"{pipeline.unet.config.sample_size} px images trained with the authors' code ({AUTHORS_REPOSITORY}, MIT "
            "License; their released weights: Kvasir-SEG at 256 px), mapped tensor by tensor onto a "
            f"`UNet2DModel` by `polyp-ddpm convert-official`; {mask_note}. The scheduler reproduces their sampler "
            f"({description['num_train_timesteps']} steps, cosine schedule, x0 clipped to [-1, 1], their posterior "
            "variance). Credit for the model belongs to Dorjsembe, Pao and Xiao; check the license terms of their "
            "release before redistributing."
        )
        write_model_card(
            pipeline, staging, repo_id=repo_id, model_name="Polyp-DDPM (official weights, converted)",
            provenance=provenance,
        )  # fmt: skip
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        push_folder(
            output,
            repo_id,
            commit_message="Polyp-DDPM official weights, converted",
            name_repo=card_naming(pipeline, output),
        )
    return output
