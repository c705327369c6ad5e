"""Speed of one segmentation setting as a user (and the study) runs it: `python train_segmentation.py`.

Runs the same setting with each training-step mode (`cuda-graphs`: the step replayed as one CUDA graph, the
default on a GPU; `eager`: `--no-cuda_graphs`; `cuda-graphs-cudnn-benchmark`: the graph with `--cudnn_benchmark`)
and records the wall time of the whole command beside the times the script measured itself (start-up, training,
testing) and its scores, so that the modes' results can be compared too. Defaults are the quick-64 study's
setting (issue 10's target: 30 s in all).

    python benchmarks/segmentation_loop.py --dataset data/kvasir-seg-64
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from polyp_diffusers.study import script_command

from common import default_device, write_results

MODES = {
    "cuda-graphs": ["--cuda_graphs"],
    "eager": ["--no-cuda_graphs"],
    "cuda-graphs-cudnn-benchmark": ["--cuda_graphs", "--cudnn_benchmark"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="A prepared dataset folder (its train and test splits).")
    parser.add_argument(
        "--modes", nargs="+", choices=sorted(MODES), default=None, help="Default: cuda-graphs and eager on a GPU."
    )
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1200, help="train_segmentation.py's --max_train_steps.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-steps", type=int, default=200)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default=None, help="Default: bf16 on a GPU.")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/segmentation_loop-<gpu|cpu>.json).")
    args = parser.parse_args()
    device = torch.device(default_device())
    on_gpu = device.type == "cuda"
    modes = args.modes or (["cuda-graphs", "eager"] if on_gpu else ["eager"])
    mixed_precision = args.mixed_precision or ("bf16" if on_gpu else "no")

    settings = dict(resolution=args.resolution, steps=args.steps, batch_size=args.batch_size)
    results = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as run_dir:
            command = script_command("train_segmentation.py", mixed_precision)
            command += ["--train", "real", "--real", args.dataset, "--test", f"{args.dataset}:test"]
            command += ["--output_dir", run_dir, "--resolution", str(args.resolution), "--max_train_steps"]
            command += [str(args.steps), "--train_batch_size", str(args.batch_size), "--validation_steps"]
            command += [str(args.validation_steps), *MODES[mode]]
            print("$ " + " ".join(command), flush=True)
            started = time.perf_counter()
            exit_code = subprocess.run(command).returncode
            wall_s = time.perf_counter() - started
            row = {"mode": mode, "mixed_precision": mixed_precision, "wall_s": round(wall_s, 1)}
            if exit_code == 0:
                run = json.loads((Path(run_dir) / "results.json").read_text())
                row.update(
                    **run["timing"],
                    best_step=run["best_step"],
                    validation_iou=round(run["validation_iou"], 4),
                    test={name: round(scores["iou"], 4) for name, scores in run["test"].items()},
                )
            else:  # the other mode still runs: one failing mode is itself a result
                row["failed_with_exit_code"] = exit_code
        results.append(row)
        print(json.dumps(row), flush=True)
        # Each mode is kept as it ends: a run stopped by a time limit keeps what it measured.
        write_results("segmentation_loop", device, results, args.output, quiet=True, **settings)
    if any("failed_with_exit_code" in row for row in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
