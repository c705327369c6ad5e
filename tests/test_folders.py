"""Where outputs may go: never over, above or inside an input."""

import pytest

from polyp_diffusers.folders import check_output_apart


def test_an_output_over_above_or_inside_an_input_is_refused_and_one_beside_it_is_not(tmp_path):
    dataset = tmp_path / "data" / "kvasir"
    dataset.mkdir(parents=True)
    inputs = {"mask dataset": str(dataset), "model": "user/polyp-ddpm"}  # a Hub id is no folder here
    for output, reason in {
        dataset: "is or contains the mask dataset",
        tmp_path / "data": "is or contains the mask dataset",
        dataset / "train" / "generated": "lies inside the mask dataset",
    }.items():
        with pytest.raises(ValueError, match=reason):
            check_output_apart(output, inputs)
    check_output_apart(tmp_path / "data" / "kvasir-generated", inputs)
    check_output_apart(tmp_path / "user" / "polyp-ddpm", inputs)
