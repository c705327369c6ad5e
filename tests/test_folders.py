"""Where outputs may go: never over, above or inside an input; and one writer on an output at a time."""

import os
import subprocess
import sys

import pytest

from polyp_diffusers.folders import OutputClaim, OutputInUseError, check_output_apart


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


@pytest.mark.parametrize("beside", [False, True])
def test_a_second_claim_on_an_output_is_refused_until_the_first_is_released(tmp_path, beside):
    output = tmp_path / "run"
    with OutputClaim(output, beside=beside) as claim:
        assert claim.path == (tmp_path / ".run.lock" if beside else output / ".lock")
        with pytest.raises(OutputInUseError, match=rf"{output} is being written by .*process {os.getpid()} on"):
            OutputClaim(output, beside=beside)
        OutputClaim(tmp_path / "other", beside=beside).release()  # other outputs are free
    OutputClaim(output, beside=beside).release()


def test_a_claim_dies_with_its_process_even_killed(tmp_path):
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_WAIT, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "claimed\n"
        with pytest.raises(OutputInUseError, match=f"process {holder.pid} on"):
            OutputClaim(output)
    finally:
        holder.kill()
        holder.wait()
    OutputClaim(output).release()


def test_a_claim_dropped_without_its_release_ends_with_it(tmp_path):
    OutputClaim(tmp_path / "run")  # as when a caller fails between claiming and releasing
    OutputClaim(tmp_path / "run").release()


CLAIM_AND_WAIT = """
import sys
from polyp_diffusers.folders import OutputClaim
claim = OutputClaim(sys.argv[1])
print("claimed", flush=True)
sys.stdin.read()
"""
