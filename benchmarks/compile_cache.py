"""What compiling the denoiser costs the first time on a machine, and every time after: torch's on-disk cache.

`torch.compile` keeps what it compiled (FX graphs, autograd graphs, kernels) on disk, by default under
`/tmp/torchinductor_$USER`, keyed by the model's code, shapes and the torch version. Runs `train_throughput.py`
(the whole training step, compiled) twice in fresh processes that share new, empty cache folders (inductor's and
Triton's): the first call's time is a cold compilation, the second's a warm one, which is what a second training
or `generate --compile` run on the same machine pays.

    python benchmarks/compile_cache.py                    # 64 px; CUDA in bf16 if present, else CPU in fp32
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import compile_cache_environment, default_device, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="train_throughput.py's default if not given.")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/compile_cache-<gpu|cpu>.json).")
    args = parser.parse_args()
    device = torch.device(default_device())
    mode = "bf16-compile" if device.type == "cuda" else "fp32-compile"
    results = []
    with tempfile.TemporaryDirectory() as work:
        environment = compile_cache_environment(Path(work))
        for cache in ("cold", "warm"):
            output = Path(work) / f"{cache}.json"
            command = [sys.executable, str(Path(__file__).with_name("train_throughput.py")), "--sizes", str(args.size)]
            command += ["--modes", mode, "--output", str(output)]
            command += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
            row = json.loads(output.read_text())["results"][0]
            results.append({"cache": cache, **row})
            print(f"{cache}: first step {row['first_step_s']} s, then {row['images_per_s']} images/s", flush=True)
            write_results("compile_cache", device, results, args.output, quiet=True)


if __name__ == "__main__":
    main()
