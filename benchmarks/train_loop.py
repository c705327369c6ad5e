"""Speed of the training loop as a user (and the study) runs it: `python training/train.py` on a prepared dataset.

Runs train.py for a time budget (`--minutes`, train.py's `--max_train_minutes`) and reads what it logged every
`--logging_steps`: images/s per window (the first window, which holds start-up and compilation, is reported
apart), the loss and peak GPU memory. Extra arguments go to train.py unchanged.

    python benchmarks/train_loop.py --dataset data/kvasir-seg --mixed-precision bf16 --minutes 2 -- \\
        --model_preset paper-64 --resolution 64 --train_batch_size 128 --gradient_accumulation_steps 1
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from polyp_diffusers.choices import MIXED_PRECISIONS
from polyp_diffusers.study import script_command

from common import default_device, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="A prepared dataset folder.")
    parser.add_argument("--minutes", type=float, default=2.0, help="How long train.py's loop runs.")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="bf16")
    parser.add_argument("--logging-steps", type=int, default=20, help="train.py's --logging_steps.")
    parser.add_argument("--name", default="train_loop", help="Results file name (results/<name>-<device>.json).")
    parser.add_argument("--output", help="JSON path instead of the default.")
    args, train_args = parser.parse_known_args()
    train_args = [arg for arg in train_args if arg != "--"]
    device = torch.device(default_device())

    with tempfile.TemporaryDirectory() as run_dir:
        command = script_command("train.py", args.mixed_precision)
        command += ["--dataset", args.dataset, "--output_dir", run_dir, "--validation_steps"]
        command += ["10000000", "--checkpointing_steps", "10000000", "--max_train_minutes", str(args.minutes)]
        command += ["--logging_steps", str(args.logging_steps), *train_args]
        print("$ " + " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall_s = time.perf_counter() - started
        events = EventAccumulator(str(Path(run_dir) / "logs" / "polyp-ddpm"), size_guidance={"scalars": 0}).Reload()
        scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}

    speeds = [event.value for event in scalars["images_per_s"]]
    if len(speeds) < 3:
        raise SystemExit(
            f"train.py logged {len(speeds)} windows: too few to leave out the first (start-up, compilation) and the "
            "last (cut short by the time budget). Give it more --minutes."
        )
    steady = speeds[1:-1]
    result = {
        "train_args": train_args,
        "mixed_precision": args.mixed_precision,
        "steps": scalars["loss"][-1].step,
        "launch_wall_s": round(wall_s, 1),
        "first_window_images_per_s": round(speeds[0], 1),
        "images_per_s_median": round(statistics.median(steady), 1),
        "images_per_s_windows": [round(speed, 1) for speed in speeds],
        "final_loss": round(scalars["loss"][-1].value, 4),
        "peak_memory_gib": round(scalars["peak_memory_gib"][-1].value, 2) if "peak_memory_gib" in scalars else None,
    }
    write_results(args.name, device, [result], args.output, minutes=args.minutes)


if __name__ == "__main__":
    main()
