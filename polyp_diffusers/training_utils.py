"""Pieces of the training scripts that deserve their own tests: checkpoints, per-step randomness, EMA weights,
CUDA-graphed steps, stops on a signal."""

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .folders import OutputClaim, visible_entries
from .pipelines import non_finite_names

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`) in step order; partial writes are never listed."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (m := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like checkpoint-1000).")
    return int(match.group(1))


def resolve_checkpoint(resume_from: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`latest` is the newest complete checkpoint in `output_dir` (None if there is none); else a path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    # A bare name is a checkpoint of output_dir, as in diffusers' training examples; a path is taken as it is.
    path = Path(output_dir) / resume_from if Path(resume_from).name == resume_from else Path(resume_from)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint {path} {what}; pass latest, a checkpoint-N folder of --output_dir by its name, or a path to "
            "one (./NAME for a folder here)."
        )
    checkpoint_step(path)
    return path


def unexpected_entries(output_dir: str | os.PathLike, logging_dir: str) -> list[str]:
    """
    What `output_dir` holds beyond what a run stopped before its first checkpoint leaves there (its logs, validation
    grids and partial writes): where a new run must not write, lest it mix with or replace files it did not make.
    """
    leftovers = {Path(logging_dir).parts[0], "validation"}
    return [name for name in visible_entries(output_dir) if name not in leftovers and not name.endswith(PARTIAL_SUFFIX)]


def previous_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint beside `checkpoint` from an earlier step: where to go back when it is broken."""
    step = checkpoint_step(checkpoint)
    earlier = [path for path in list_checkpoints(Path(checkpoint).parent) if checkpoint_step(path) < step]
    return earlier[-1] if earlier else None


def go_back_hint(checkpoint: str | os.PathLike) -> str:
    """What to do about a broken `checkpoint`: move it away and resume from the one before, if there is one."""
    checkpoint = Path(checkpoint)
    if (earlier := previous_checkpoint(checkpoint)) is None:
        return "there is no earlier checkpoint beside it"
    return f"move {checkpoint.name} out of {checkpoint.parent} and resume from latest, which is then {earlier}"


def partial_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place (atomically) once complete."""
    return Path(output_dir) / f"checkpoint-{step}{PARTIAL_SUFFIX}"


def publish_checkpoint(output_dir: str | os.PathLike, step: int, total_limit: int | None) -> Path:
    """
    Renames a completely written checkpoint into place and removes the oldest beyond `total_limit`. A checkpoint of
    the same step is there only where `latest` fell back past it, unreadable: it is replaced (a kill in between
    leaves the checkpoint before it, which the next resume falls back to again).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial_path(output_dir, step), final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


TRAINING_CLOCK = "training_clock.json"


def write_training_seconds(checkpoint: str | os.PathLike, seconds: float) -> None:
    """Records in a checkpoint how long the run had trained, so that a time budget spans resumes."""
    (Path(checkpoint) / TRAINING_CLOCK).write_text(json.dumps({"training_seconds": round(seconds, 3)}) + "\n")


def training_seconds(checkpoint: str | os.PathLike | None) -> float:
    """How long the run had trained when `checkpoint` was written (0 for a new run or an older checkpoint)."""
    clock = Path(checkpoint) / TRAINING_CLOCK if checkpoint is not None else None
    if clock is None or not clock.is_file():
        return 0.0
    seconds = _checkpoint_record(clock).get("training_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        raise _damaged_record(clock, f"training_seconds is {seconds!r}")
    return seconds


TRAINING_SETTINGS = "training_settings.json"


def write_training_settings(checkpoint: str | os.PathLike, settings: dict) -> None:
    """Records in a checkpoint the settings that define its run: a resumed run is held to them."""
    (Path(checkpoint) / TRAINING_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")


def training_settings(checkpoint: str | os.PathLike) -> dict | None:
    """The settings a checkpoint's run recorded (None for a checkpoint older than the record)."""
    path = Path(checkpoint) / TRAINING_SETTINGS
    return _checkpoint_record(path) if path.is_file() else None


def _checkpoint_record(path: Path) -> dict:
    """A checkpoint's JSON record, which must be an object: anything else is damage, said in one line."""
    try:
        record = json.loads(path.read_text())
    except ValueError as error:  # not JSON, not text
        raise _damaged_record(path, error) from None
    if not isinstance(record, dict):
        raise _damaged_record(path, f"a JSON {type(record).__name__}, not an object")
    return record


def _damaged_record(path: Path, problem) -> ValueError:
    return ValueError(f"{path} is damaged ({problem}); {go_back_hint(path.parent)}.")


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> None:
    """Leftovers of a run killed while writing a checkpoint."""
    for path in Path(output_dir).glob(f"checkpoint-*{PARTIAL_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)


def step_generators(
    seed: int, micro_step: int, process_index: int, device: torch.device | str
) -> tuple[torch.Generator, torch.Generator]:
    """
    Generators for one micro-batch: a CPU one for the augmentation and one on `device` for noise and
    timesteps. Deriving them from the step (not from a running RNG) makes a resumed run draw exactly what
    the uninterrupted run would have drawn.
    """
    augment_seed, noise_seed = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(2, np.uint64)
    mask = 0x7FFF_FFFF_FFFF_FFFF
    return (
        torch.Generator().manual_seed(int(augment_seed) & mask),
        torch.Generator(device=device).manual_seed(int(noise_seed) & mask),
    )


@contextmanager
def ema_weights(ema_model, model: torch.nn.Module):
    """Temporarily loads the EMA weights into `model` (for sampling or saving); a no-op without an EMA."""
    if ema_model is None:
        yield
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield
    finally:
        ema_model.restore(model.parameters())


def non_finite_weights(model: torch.nn.Module, ema_parameters: Iterable[torch.Tensor] | None = None) -> list[str]:
    """
    Names of the weight tensors of `model` and of its EMA (`ema_parameters` in `model.parameters()` order, named
    `ema.<name>`) that hold NaN or inf. A diverged run or a damaged file has them; such weights must be neither
    resumed nor saved.
    """
    named = list(model.named_parameters())
    if ema_parameters is not None:
        named += [(f"ema.{name}", tensor) for (name, _), tensor in zip(named, ema_parameters)]
    return non_finite_names(named)


def check_weights_are_finite(
    model: torch.nn.Module, step: int, remedy: str, ema_parameters: Iterable[torch.Tensor] | None = None
) -> None:
    """
    Stops a diverged run before it writes weights that NaN or inf has reached: they would be resumed, published or
    scored (a segmenter of NaN predicts nothing: IoU 0, taken for a result).
    """
    non_finite = non_finite_weights(model, ema_parameters)
    if non_finite:
        raise FloatingPointError(
            f"NaN or inf in {len(non_finite)} weight tensors at step {step} (first: {non_finite[0]}): the training "
            f"diverged, nothing was saved. {remedy}"
        )


class GraphedStep:
    """
    A training step (forward, loss, backward, optimizer step) that runs as one CUDA graph once warmed up: a small
    model at a small size waits for its hundreds of kernel launches, not for the GPU, and a replayed graph is one
    launch. With `enabled=False` (what a caller passes off CUDA) every call runs `step` eagerly.

    A graph replays the kernels, not the Python, so `step(*inputs)` must read nothing back to the host, leave the
    gradients at `None` when it ends, use an optimizer that keeps its step count on the GPU (`capturable=True`)
    and a learning rate that does not change, and get inputs of one shape every call. The first `warmup_steps`
    calls run eagerly on a side stream (which capture needs), the next one captures the step and replays it;
    from then on `inputs` are copied into the captured tensors. Each call returns what `step` returns; graphed,
    the same tensors every call, overwritten by the next one.
    """

    def __init__(self, step: Callable[..., torch.Tensor], enabled: bool, warmup_steps: int = 3):
        self.step = step
        self.enabled = enabled
        self.warmup_steps = warmup_steps
        self.calls = 0
        self.side_stream = None
        self.graph = None
        self.static_inputs = None
        self.static_output = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.enabled:
            return self.step(*inputs)
        if self.graph is not None:
            for static, value in zip(self.static_inputs, inputs):
                if value.shape != static.shape:
                    raise ValueError(
                        f"a graphed step was captured for inputs of shape {tuple(static.shape)}; got "
                        f"{tuple(value.shape)}. Give it whole batches only."
                    )
                static.copy_(value, non_blocking=True)
            self.graph.replay()
            return self.static_output
        if self.calls <= self.warmup_steps:
            self.side_stream = self.side_stream or torch.cuda.Stream()
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                output = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return output
        self.static_inputs = [value.clone() for value in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_output = self.step(*self.static_inputs)
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.static_output


def seconds_since_process_start() -> float:
    """
    How long this process has run: on Linux from /proc (to 10 ms); elsewhere from psutil, whose process start
    time rests on a boot time in whole seconds.
    """
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # Field 22 of /proc/self/stat is the start time in clock ticks after boot; the name (field 2) may hold spaces.
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil  # only off Linux

        return time.time() - psutil.Process().create_time()


def claim_output(accelerator, output_dir: str | os.PathLike) -> OutputClaim | None:
    """
    The main process's claim on a training script's `output_dir` (which it creates): one run writes there at a
    time, since a second (a job submitted twice) would prune, overwrite or resume mid-checkpoint. A claim that fails
    (in use, or a folder that cannot be written) stops every process: the others would otherwise wait for the main
    one in their first collective operation until the launcher killed them.
    """
    claim, failure = None, None
    if accelerator.is_main_process:
        try:
            claim = OutputClaim(output_dir)
        except Exception as error:  # whatever it is, the other processes must hear of it
            failure = error
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list  # here: `generate` imports this module, not accelerate

        failed = broadcast_object_list([failure is not None])[0]
        if failed and not accelerator.is_main_process:
            # Quietly, and without failing: a launcher stops every process as soon as one fails, which could
            # stop the main one before it says why.
            raise SystemExit(0)
    if failure is not None:
        raise failure
    return claim


class StopRequest:
    """
    While entered, SIGINT (Ctrl-C) and SIGTERM (a job scheduler's notice before it kills a job, a preemption)
    set `signum` instead of stopping the process, so that the training loop can save a checkpoint at its next step
    and stop, instead of losing the steps since the last checkpoint. Another of them `force_after` seconds later
    stops at once (KeyboardInterrupt); sooner, it is the same request: a terminal's Ctrl-C reaches `torchrun` and its
    workers, and `torchrun` passes it on.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM), force_after: float = 2.0):
        self.signals, self.force_after = tuple(signals), force_after
        self.signum: int | None = None
        self._received_at = 0.0
        self._previous_handlers = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for signum in self.signals:
                self._previous_handlers[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be set back
                signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _request(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._received_at = signum, time.monotonic()
        elif time.monotonic() - self._received_at > self.force_after:
            raise KeyboardInterrupt


def leave_ctrl_c_to_the_training_process(worker_id: int) -> None:
    """
    A DataLoader `worker_init_fn`: the worker ignores Ctrl-C, which a terminal sends to every process of the job.
    A worker that it ended would fail the training process (its parent) on its next batch (its DataLoader raises) before
    `StopRequest`'s checkpoint; the DataLoader ends its workers itself. SIGTERM still ends a worker: it is what
    ends workers left over when the training process exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
