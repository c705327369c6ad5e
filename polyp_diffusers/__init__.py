"""polyp-diffusers: colonoscopy polyp images from binary masks (Polyp-DDPM) as a diffusers pipeline.

The names below, and the submodules, are imported on first use (PEP 562), as diffusers does with its own:
`import polyp_diffusers.cli` must not pay for torch and diffusers (seconds) before it knows what it will do.
"""

from importlib import import_module as _import_module
from importlib.util import find_spec as _find_spec
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the submodule that defines it.
_EXPORTS = {
    "PolypDDPMPipeline": "pipelines",
    "PolypDDPMPipelineOutput": "pipelines",
    "PolypInpaintPipeline": "pipelines",
    "PolypMaskPipeline": "pipelines",
    "PolypMaskPipelineOutput": "pipelines",
    "prepare_masks": "pipelines",
    "UNET_PRESETS": "modeling",
    "make_polyp_scheduler": "modeling",
    "make_polyp_unet": "modeling",
    "make_polyp_unet_from_preset": "modeling",
    "make_sampler": "modeling",
}

__all__ = sorted(_EXPORTS)

if _TYPE_CHECKING:
    from .modeling import UNET_PRESETS, make_polyp_scheduler, make_polyp_unet, make_polyp_unet_from_preset, make_sampler
    from .pipelines import (
        PolypDDPMPipeline,
        PolypDDPMPipelineOutput,
        PolypInpaintPipeline,
        PolypMaskPipeline,
        PolypMaskPipelineOutput,
        prepare_masks,
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and _find_spec(f"{__name__}.{name}") is not None:
        value = _import_module(f".{name}", __name__)  # `polyp_diffusers.modeling` after `import polyp_diffusers`
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
