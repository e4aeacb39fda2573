"""A successful run's console shows the pipeline's own lines, not its libraries' chatter.

Left alone, every process that imports TensorFlow prints its start-up notices (oneDNN, "Could not find cuda
drivers", on a machine without a GPU an ERROR line about cuInit), then XLA's, tf.data's and the TFLite
converter's notes; MLflow logs its database set-up and its system-metrics monitor; Keras draws a progress
bar when MLflow tries the model: some 90 of the 180 lines of a `dvc repro` of the defaults. Each is turned
down where it starts, with the library's own switch where it has one:

  TF_CPP_MIN_LOG_LEVEL=3          TensorFlow's C++ log: FATAL only. 3, not 2: the cuInit line is an ERROR; an
                                  op that fails raises a Python exception with its message anyway
  logger "tensorflow" at ERROR    TensorFlow's Python warnings (tf.function retracing, deprecations)
  MLFLOW_LOGGING_LEVEL=WARNING    MLflow's INFO lines
  MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false    its progress bar for a download of one small file
  importing tensorflow            its shared libraries log while they load, before TensorFlow has read its
                                  level: what they print then is held back and written out after the import,
                                  without the lines that level hides (all of it when the import fails)

quiet_libraries() sets these before the libraries are imported (tasks/__init__.py calls it). Calls that print
with no switch to stop them go inside native_output_hidden() (TFLite, MLflow's registration) or keras_quiet()
where they are made. A setting already in the environment wins. `--verbose` or PIPELINE_VERBOSE=1
(errors.verbose) leaves every library as it is, for a failure whose one line is not enough.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator

from tasks.common import errors

DEFAULTS = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# A line of TensorFlow's C++ log (absl): severity I, W, E or F, then MMDD, the time (in seconds since 1970
# before absl's set-up), thread, file:line].
_NATIVE_LINE = re.compile(rb"^(?P<severity>[IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
_SEVERITIES = b"IWEF"  # in TF_CPP_MIN_LOG_LEVEL's order: level n hides the first n
# What absl prints once, before the first line it logs before its set-up: a warning about itself.
_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def quiet_libraries() -> None:
    """Turns the libraries' console output down, unless the command runs verbose; call it before they are imported."""
    if errors.verbose():
        return
    for variable, value in DEFAULTS.items():
        os.environ.setdefault(variable, value)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.get_logger(): the same logger, not yet imported
    if "tensorflow" not in sys.modules and not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport("tensorflow"))


def native_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it: 0 (all) to 3 (FATAL only); 0 when unset or not a number."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip()
    return min(int(value), 3) if value.isdigit() else 0


def hidden(line: bytes, level: int) -> bool:
    """Whether TF_CPP_MIN_LOG_LEVEL `level` hides `line` of what a native library printed."""
    match = _NATIVE_LINE.match(line)
    if match:
        return _SEVERITIES.index(match["severity"]) < level
    return level > 0 and line.rstrip() == _PREAMBLE


@contextlib.contextmanager
def native_output_hidden() -> Iterator[None]:
    """Hides what is written to the standard error file inside the block, by C++ code too, unless the command
    runs verbose; when the block raises, all of it is written out, above the error. For a library call that
    prints and has no switch for it (TFLite's converter and interpreter)."""
    if errors.verbose():
        yield
        return
    with _held_back(lambda line: False):
        yield


@contextlib.contextmanager
def keras_quiet() -> Iterator[None]:
    """No Keras progress bar and no Keras warning inside the block, unless the command runs verbose: for a
    library's call of our model (MLflow trying it on the input example), which says nothing about the run."""
    if errors.verbose():
        yield
        return
    import keras

    interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()  # progress bars go to absl's log instead, below its level
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="keras")
            yield
    finally:
        if interactive:
            keras.config.enable_interactive_logging()


@contextlib.contextmanager
def _held_back(keep: Callable[[bytes], bool]) -> Iterator[None]:
    """Holds back what is written to the standard error file inside the block; then writes out the lines
    `keep` keeps, or all of them when the block raised."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error file (closed): nothing to hold back
        yield
        return
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held if failed or keep(line))
            while kept:
                kept = kept[os.write(2, kept) :]


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `module` as the other finders do; what its first import prints goes through hidden()."""

    def __init__(self, module: str):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name != self.module:  # and once it is imported, the import system asks no finder for it again
            return None
        for finder in sys.meta_path:
            spec = None if finder is self or not hasattr(finder, "find_spec") else finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    """`loader`, with what its module prints while it executes going through hidden(); the module keeps `loader`."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        level = native_log_level()
        with _held_back(lambda line: not hidden(line, level)):
            self.loader.exec_module(module)
