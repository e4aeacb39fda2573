"""A successful stage prints its own lines, not TensorFlow's, Keras' or MLflow's chatter; PIPELINE_VERBOSE=1
brings the libraries' lines back (tasks/common/console.py)."""

import os
import re
import subprocess
import sys

import pytest

from tasks import convert
from tasks.common import config, console, errors
from tests.conftest import FAST, REPOSITORY, make_image_folder, write_params

# What a quiet console must not show: TensorFlow's C++ log lines, the cuInit error of a machine without a GPU,
# the oneDNN notice, tf.function's retracing warnings, a traceback.
NOISE = re.compile(r"E0000|W0000|I0000|cuInit|oneDNN|retracing|Traceback")
NATIVE_LINE = re.compile(r"^[IWEF]\d{4} ", flags=re.MULTILINE)  # a line of TensorFlow's C++ log


def _stage(stage: str, folder, **environment: str) -> subprocess.CompletedProcess:
    """`python -m tasks.<stage>` as DVC runs it: with none of the quiet settings this test process made for itself."""
    variables = {**os.environ, "PYTHONPATH": str(REPOSITORY), **environment}
    for variable in (*console.DEFAULTS, "MLFLOW_TRACKING_URI"):
        variables.pop(variable, None)
    if errors.VERBOSE_VARIABLE not in environment:
        variables.pop(errors.VERBOSE_VARIABLE, None)
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"], cwd=folder, env=variables, capture_output=True, text=True, timeout=300
    )


def test_a_stage_prints_its_own_lines_and_verbose_brings_tensorflow_back(tmp_path):
    write_params(tmp_path / "params.yaml", {**FAST, "train.histogram_freq": 0})
    params = config.load_params(tmp_path / "params.yaml")
    make_image_folder(tmp_path / "raw", classes=3, per_class=12)
    convert.convert(params.dataset, params.base.seed, tmp_path / "raw", tmp_path / params.shards_dir)

    train = _stage("train", tmp_path)
    output = train.stdout + train.stderr
    assert train.returncode == 0, output
    assert not NOISE.search(output), output
    for chatter in ("INFO mlflow", "UserWarning", "ms/step"):  # MLflow's log, Keras' warning and progress bar
        assert chatter not in output, output
    assert "train: loss " in train.stdout, output

    verbose = _stage("evaluate", tmp_path, **{errors.VERBOSE_VARIABLE: "1"})
    assert verbose.returncode == 0, verbose.stderr
    assert "evaluate: precision@1 " in verbose.stdout
    assert NATIVE_LINE.search(verbose.stderr), f"no TensorFlow log line came back:\n{verbose.stderr}"


@pytest.mark.parametrize(
    ("line", "level", "is_hidden"),
    [
        (b"I0000 00:00:1796252183.016711   23450 port.cc:153] oneDNN custom operations are on.\n", 1, True),
        (b"W0000 00:00:1796252202.447245   23915 cache_dataset_ops.cc:912] The calling iterator\n", 2, True),
        (b"W0000 00:00:1796252202.447245   23915 cache_dataset_ops.cc:912] The calling iterator\n", 1, False),
        (b"E1203 10:15:02.123456   23807 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n", 3, True),
        (b"E1203 10:15:02.123456   23807 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n", 2, False),
        (b"F0000 00:00:1796252183.016711   23450 status.cc:10] Check failed: a lost FATAL\n", 3, False),
        (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", 1, True),
        (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", 0, False),
        (b"ImportError: libcudart.so.12: cannot open shared object file\n", 3, False),
    ],
)
def test_native_log_lines_are_hidden_as_tf_cpp_min_log_level_says(line, level, is_hidden):
    assert console.hidden(line, level) is is_hidden


def test_held_back_output_is_dropped_after_success_and_shown_after_a_failure(capfd, monkeypatch):
    monkeypatch.delenv(errors.VERBOSE_VARIABLE, raising=False)
    with console.native_output_hidden():
        os.write(2, b"chatter of a library\n")  # as C++ code writes: below Python's sys.stderr
    assert capfd.readouterr().err == ""

    with pytest.raises(RuntimeError, match="the conversion failed"), console.native_output_hidden():
        os.write(2, b"why the converter gave up\n")
        raise RuntimeError("the conversion failed")
    assert capfd.readouterr().err == "why the converter gave up\n"

    monkeypatch.setenv(errors.VERBOSE_VARIABLE, "1")
    with console.native_output_hidden():
        os.write(2, b"chatter of a library\n")
    assert capfd.readouterr().err == "chatter of a library\n"
