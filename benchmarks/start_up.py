"""Where a short command's start-up goes: each import and initialisation timed alone, in a fresh process.

A quick-64 segmenter trained in 12.5 s on an H100 but took 21 s to start (its data loading included), and about
8 s more went to `accelerate launch` and the exit (benchmarks/results/segmentation_loop-h100.json). Each row here is one
fresh Python process that does one thing (an import, the first CUDA work, an `Accelerator`), run `--repeats`
times and timed from here, start to exit; `python` of an empty script is the floor. `accelerate launch` of an
empty script against `python` of the same script is the launcher's share (the study now runs its scripts with
`python`). Whether Python may cache compiled bytecode is recorded too: without the cache, every import compiles
its package's sources again.

    python benchmarks/start_up.py            # writes benchmarks/results/start_up-<gpu|cpu>.json
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import default_device, write_results

FIRST_CUDA_WORK = (
    "import torch; x = torch.randn(64, 3, 64, 64, device='cuda'); c = torch.nn.Conv2d(3, 8, 3).cuda();"
    " c(x).sum().backward(); torch.cuda.synchronize()"
)
# `accelerate launch` with one process, as users run the scripts of training/ (README).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no", "--quiet"]
SNIPPETS = {  # the most telling first: a run stopped by a time limit keeps the rows it finished
    "torch": "import torch",
    "polyp_diffusers.segmentation": "import polyp_diffusers.segmentation",
    "Accelerator()": "from accelerate import Accelerator; Accelerator()",
    "diffusers UNet2DModel": "from diffusers import UNet2DModel",
    "monai": "import monai",
    "datasets": "import datasets",
    # The package's names are imported on first use since session 13: this is what `import polyp_diffusers` was.
    "polyp_diffusers PolypDDPMPipeline": "from polyp_diffusers import PolypDDPMPipeline",
}


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return round(time.perf_counter() - started, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="Fresh processes per row (a first may warm caches).")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/start_up-<gpu|cpu>.json).")
    args = parser.parse_args()
    device = torch.device(default_device())
    results = []
    no_bytecode_cache = bool(sys.flags.dont_write_bytecode)
    with tempfile.TemporaryDirectory() as work:
        empty = Path(work) / "empty.py"
        empty.write_text("")
        commands = {"python empty.py": [sys.executable, str(empty)]}
        commands["accelerate launch empty.py"] = [*LAUNCH, *([] if device.type == "cuda" else ["--cpu"]), str(empty)]
        if device.type == "cuda":
            commands["first CUDA work (a conv forward and backward)"] = [sys.executable, "-c", FIRST_CUDA_WORK]
        commands.update({name: [sys.executable, "-c", code] for name, code in SNIPPETS.items()})
        commands["polyp-ddpm --help"] = [sys.executable, "-m", "polyp_diffusers.cli", "--help"]
        for name, command in commands.items():
            runs = [wall_seconds(command) for _ in range(args.repeats)]
            results.append({"what": name, "wall_s": runs})
            print(f"{name:48} " + "  ".join(f"{run:6.2f} s" for run in runs), flush=True)
            # Each row kept if time runs out.
            write_results("start_up", device, results, args.output, quiet=True, dont_write_bytecode=no_bytecode_cache)


if __name__ == "__main__":
    main()
