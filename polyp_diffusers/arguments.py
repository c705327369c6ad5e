"""
Command-line pieces shared by `polyp-ddpm` and the training scripts: help pages, number arguments (with the rule
for a test split's size, which `data` applies to calls from Python too) and how an error is reported. Imports
nothing heavy: the command line parses with it before torch is loaded.
"""

import argparse
import importlib.util
import math
import numbers
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import PIL.Image

# The accelerate scripts, beside the package in the repository (an editable install).
TRAINING_SCRIPTS = Path(__file__).resolve().parents[1] / "training"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every default that a help text does not state itself, and keeps the line breaks of examples."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        is_flag = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        unstated = action.default is None or action.default == argparse.SUPPRESS
        if is_flag or unstated or "(default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def check_test_size(test_size) -> None:
    """A test split is a whole count of pairs (at least 1) or a fraction of them (between 0 and 1)."""
    is_number = isinstance(test_size, numbers.Real) and not isinstance(test_size, bool)  # numpy's numbers too
    is_count = is_number and test_size >= 1 and float(test_size).is_integer()
    if not (is_count or (is_number and 0 < test_size < 1)):
        raise ValueError(f"test size is {test_size!r}; expected a whole count (>= 1) or a fraction in (0, 1).")


def positive_int(value: str) -> int:
    """A whole number of at least 1 (image counts, batch sizes, steps, pixels)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number of at least 1")
    return number


def non_negative_int(value: str) -> int:
    """A whole number of at least 0, where 0 means none (warm-up steps, workers, a saving interval)."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number of at least 0")
    return number


# The largest square side PIL opens without taking the image for a decompression bomb (`PIL.Image.MAX_IMAGE_PIXELS`,
# about 9,459 px): a dataset written larger could not be read back, and one image of 100,000 px takes 30 GB.
MAX_IMAGE_SIDE = math.isqrt(PIL.Image.MAX_IMAGE_PIXELS)


def image_side(value: str) -> int:
    """A square image's side in pixels: at least 1, at most `MAX_IMAGE_SIDE`."""
    number = positive_int(value)
    if number > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(
            f"{value} pixels a side is more than images can have here ({MAX_IMAGE_SIDE}, PIL's limit)"
        )
    return number


def _finite_float(condition: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a finite number that meets `condition` (a NaN or inf would train to NaN or forever)."""

    def parse(value: str) -> float:
        number = float(value)
        if not (math.isfinite(number) and condition(number)):
            raise argparse.ArgumentTypeError(f"{value} is not {expected}")
        return number

    parse.__name__ = "float"  # argparse's "invalid float value" for text float() cannot read
    return parse


positive_float = _finite_float(lambda number: number > 0, "a finite number above 0")
non_negative_float = _finite_float(lambda number: number >= 0, "a finite number of at least 0")
fraction = _finite_float(lambda number: 0 <= number <= 1, "a number from 0 to 1")


def port_number(value: str) -> int:
    """A TCP port a server may listen on: 1 to 65535."""
    number = int(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1 to 65535)")
    return number


def output_path(value: str) -> str:
    """A path to write to: not empty, which would be the current folder (a dataset replaces its whole folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; name the folder or file to write")
    return value


def count_or_fraction(value: str) -> int | float:
    """A test split: a whole count of pairs (>= 1) or a fraction of them (between 0 and 1)."""
    number = float(value)
    try:
        check_test_size(int(number) if number >= 1 and number.is_integer() else number)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{value} is neither a whole count (>= 1) nor a fraction in (0, 1)") from error
    return int(number) if number >= 1 else number


# The training scripts' --cudnn_benchmark.
CUDNN_BENCHMARK_HELP = (
    "On CUDA, cuDNN times its convolution algorithms at each new input shape and keeps the fastest "
    "(torch.backends.cudnn.benchmark): the first steps are slower, and the algorithms chosen may differ from run to "
    "run, so results are not bitwise repeatable."
)

# Set to 1 to see the traceback behind a one-line error (for a bug report).
TRACEBACK_VARIABLE = "POLYP_DDPM_TRACEBACK"


class Stopped(Exception):
    """A command that a signal stopped after it kept its work: said in one line, exit status 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _memory_errors() -> tuple[type[BaseException], ...]:
    """Running out of host memory, and of a GPU's once torch is loaded (this module does not load it)."""
    torch = sys.modules.get("torch")
    return (MemoryError, torch.OutOfMemoryError) if torch is not None else (MemoryError,)


def exit_code_of(
    command: Callable[[], object],
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError),
    interrupted: str = "interrupted: what was written whole is kept.",
) -> int:
    """
    Runs `command`; one of `errors` (bad input, damaged files, a training that diverged) or running out of memory, the host's or a GPU's (a
    resolution or batch too large), is printed as one line, `error: ...`, a Ctrl-C as `interrupted` and a `Stopped`
    as its message, without a traceback, unless the environment sets `POLYP_DDPM_TRACEBACK=1`. Returns the exit
    status: 1 for an error, 128 + the signal for a stop, as a shell says.
    """
    try:
        command()
    except (*errors, *_memory_errors(), KeyboardInterrupt, Stopped) as error:
        if os.environ.get(TRACEBACK_VARIABLE) == "1" and not isinstance(error, Stopped):  # a stop is no bug
            raise
        if isinstance(error, KeyboardInterrupt):
            error = Stopped(interrupted, signal.SIGINT)
        if isinstance(error, Stopped):
            if str(error):  # empty: one of several processes, whose stop another one says
                print(error, file=sys.stderr)
            return 128 + error.signum
        if isinstance(error, _memory_errors()):  # a GPU's says more in the lines after its first
            details = str(error).splitlines()[0] if str(error) else "no details"
            error = f"out of memory ({details}): use a smaller resolution or batch"
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def load_training_script(name: str, folder: Path = TRAINING_SCRIPTS) -> ModuleType:
    """
    A script of `training/` (or of `folder`: a script's own, wherever it runs from) as a module, without running
    it: its parser and checks, used before any work.
    """
    spec = importlib.util.spec_from_file_location(f"polyp_training_{name}", Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overridden_settings(
    parse_args: Callable[[list[str]], argparse.Namespace],
    owned: list[str],
    passed_on: list[str],
    names: tuple[str, ...],
) -> list[str]:
    """
    The flags among `names` (parser destinations) whose value the `passed_on` arguments change from what the
    `owned` ones set: compared after parsing, so that an abbreviated or `=` flag is caught too.
    """
    ours, theirs = parse_args(owned), parse_args([*owned, *passed_on])
    return sorted(f"--{name}" for name in names if getattr(theirs, name) != getattr(ours, name))
