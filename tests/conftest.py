import os
from pathlib import Path

import numpy as np
import pytest
import torch

from polyp_diffusers import PolypDDPMPipeline, make_polyp_scheduler, make_polyp_unet_from_preset
from polyp_diffusers.prepare_data import prepare_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pipeline():
    """An untrained 32 px pipeline: enough to exercise every code path in milliseconds."""
    torch.manual_seed(0)
    pipe = PolypDDPMPipeline(unet=make_polyp_unet_from_preset("tiny"), scheduler=make_polyp_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def saved_pipeline_dir(tiny_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_masks(tmp_path_factory):
    """A prepared demo dataset (6 train and 4 test pairs at 32 px) whose masks the generation tests use."""
    path = tmp_path_factory.mktemp("masks") / "demo"
    prepare_dataset("demo", path, test_size=4, resolution=32, demo_pairs=10)
    return path


@pytest.fixture
def square_mask():
    """A 32x32 uint8 mask with one rectangular polyp (255) on background (0)."""
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 10:24] = 255
    return mask


@pytest.fixture(scope="session")
def kvasir_dir():
    """Real Kvasir-SEG (256 px) from POLYP_DATA_DIR; tests that need it skip when it is absent."""
    data_dir = os.environ.get("POLYP_DATA_DIR")
    if not data_dir:
        pytest.skip("POLYP_DATA_DIR is not set: real Kvasir-SEG data is not available (CI sets it to ../shared/data)")
    path = Path(data_dir) / "kvasir-seg-256"
    if not (path / "images").is_dir():
        pytest.skip(f"POLYP_DATA_DIR={data_dir} has no kvasir-seg-256/images folder")
    return path
