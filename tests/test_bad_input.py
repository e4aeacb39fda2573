"""Bad input at every command line: one line on stderr naming the thing at fault and the fix, exit code 2.

Most cases call a command's main() in-process through errors.run_main, exactly what `python -m` runs;
two spawn Python to check the real command line (exit status, no traceback, --verbose).
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

# Imported with the module, not inside a test: Prefect configures logging on first import, which
# closes every logging handler there is, including those pytest gives a running test.
from flows import deploy, pipeline
from tasks.common import errors
from tests.conftest import FAST, REPOSITORY, make_image_folder, write_params


def _run(main, capsys, *arguments: str) -> tuple[int, str]:
    """(exit code, stderr) of a command line run in this process."""
    code = errors.run_main(main, list(arguments))
    return code, capsys.readouterr().err


def _one_line(stderr: str, program: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{program}: error: "), stderr
    return lines[0]


def _command(arguments: list[str], cwd: pathlib.Path, **environment: str) -> subprocess.CompletedProcess:
    variables = {**os.environ, "PYTHONPATH": str(REPOSITORY), **environment}
    variables.pop(errors.VERBOSE_VARIABLE, None) if errors.VERBOSE_VARIABLE not in environment else None
    return subprocess.run(
        [sys.executable, *arguments], cwd=cwd, env=variables, capture_output=True, text=True, timeout=120
    )


def test_params_that_are_not_yaml_name_the_line_and_column_and_verbose_shows_the_traceback(workdir):
    (workdir / "params.yaml").write_text("base:\n  seed: 42\ntrain: [epochs: 3\n")
    quiet = _command(["-m", "tasks.download"], workdir)
    assert quiet.returncode == 2
    line = _one_line(quiet.stderr, "tasks.download")
    assert "params.yaml, line 4, column 1: not valid YAML: while parsing a flow sequence (line 3, column 8)" in line
    assert not (workdir / "data").exists()

    verbose = _command(["-m", "tasks.download", "--verbose"], workdir)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == line
    from_environment = _command(["-m", "tasks.download"], workdir, **{errors.VERBOSE_VARIABLE: "1"})
    assert from_environment.returncode == 2 and "Traceback" in from_environment.stderr


def test_a_missing_params_file(workdir, capsys):
    from tasks import convert

    code, stderr = _run(convert.main, capsys)
    assert code == 2
    assert (
        "cannot read the params file params.yaml: no such file; run from the folder that holds params.yaml"
        in _one_line(stderr, "tasks.convert")
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"dataset.image_size": [0, 8]},
            "params.yaml: invalid setting dataset.image_size = [0, 8]: [height, width] in pixels, both at least 1",
        ),
        (
            {"train.image_size": [0, 0]},
            "params.yaml: invalid setting train.image_size = [0, 0]: both sides must be at least 4 pixels",
        ),
        ({"train.epochs": 0, "train.batch_size": "many"}, "params.yaml: 2 invalid setting(s):"),
    ],
)
def test_an_impossible_setting(workdir, capsys, overrides, expected):
    from tasks import train

    write_params(workdir / "params.yaml", overrides)
    code, stderr = _run(train.main, capsys)
    assert code == 2 and expected in stderr and "Traceback" not in stderr
    if len(overrides) == 1:
        _one_line(stderr, "tasks.train")  # several invalid settings get a line each


def _imagefolder(workdir: pathlib.Path, source: str) -> None:
    write_params(workdir / "params.yaml", {**FAST, "dataset.name": "imagefolder", "dataset.source": source})


def test_a_missing_source_folder(workdir, capsys):
    from tasks import download

    _imagefolder(workdir, str(workdir / "pets"))
    code, stderr = _run(download.main, capsys)
    assert code == 2
    assert (
        f"dataset.source '{workdir / 'pets'}' does not exist; give an existing folder with one sub-folder per class"
        in _one_line(stderr, "tasks.download")
    )


def test_a_source_file_that_is_not_an_archive(workdir, capsys):
    from tasks import download

    (workdir / "pets.zip").write_text("not an archive")
    _imagefolder(workdir, "pets.zip")
    code, stderr = _run(download.main, capsys)
    assert code == 2
    assert "dataset.source 'pets.zip' is a file but not a .zip/.tar/.tar.gz/.tgz archive" in _one_line(
        stderr, "tasks.download"
    )
    assert (workdir / "pets.zip").read_text() == "not an archive", "the user's file is only read"


def _raw_digits(workdir: pathlib.Path, **changes) -> pathlib.Path:
    """A tiny class folder where convert looks for the digits (paths.raw = raw)."""
    write_params(workdir / "params.yaml", {**FAST, "paths.raw": "raw", "paths.shards": "shards", **changes})
    return make_image_folder(workdir / "raw" / "digits", classes=2, per_class=4)


def test_a_file_where_the_shards_folder_belongs(workdir, capsys):
    from tasks import convert

    _raw_digits(workdir)
    (workdir / "shards").write_text("a file, not a folder")
    code, stderr = _run(convert.main, capsys)
    assert code == 2
    assert "shards is a file where a folder is expected (to hold shards); move the file away" in _one_line(
        stderr, "tasks.convert"
    )
    assert (workdir / "shards").read_text() == "a file, not a folder"


def test_an_empty_class_folder_and_a_single_class(workdir, capsys):
    from tasks import convert

    raw = _raw_digits(workdir)
    (raw / "class_9").mkdir()
    code, stderr = _run(convert.main, capsys)
    assert code == 2
    assert f"class folder {pathlib.Path('raw/digits/class_9')} holds no files; add images to it" in _one_line(
        stderr, "tasks.convert"
    )

    (raw / "class_9").rmdir()
    shutil.rmtree(raw / "class_1")
    code, stderr = _run(convert.main, capsys)
    assert code == 2
    assert "at least 2 classes, found ['class_0']; a classifier needs two or more" in _one_line(stderr, "tasks.convert")
    assert not (workdir / "shards").exists()


def test_stages_run_out_of_order_name_the_stage_to_run(workdir, capsys):
    from tasks import evaluate, register, train

    write_params(workdir / "params.yaml", FAST)
    for main, expected in [
        (train.main, "manifest.json is missing: run the convert stage first"),
        (evaluate.main, "run.json is missing: run the train stage first"),
        (register.main, "run.json is missing: run the train stage first"),
    ]:
        code, stderr = _run(main, capsys)
        assert code == 2 and expected in _one_line(stderr, main.__module__)


def _read_only(folder: pathlib.Path) -> None:
    """Makes `folder` refuse new files, also for root (whom permissions do not stop): the immutable attribute."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0
    ):
        pytest.skip(
            "running as root, and this file system cannot mark a folder immutable (chattr +i): "
            "nothing makes a folder read-only for root"
        )


def _writable(folder: pathlib.Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_a_read_only_output_folder(workdir, capsys):
    from tasks import download

    write_params(workdir / "params.yaml", FAST)
    _read_only(workdir / "data" / "raw")
    try:
        code, stderr = _run(download.main, capsys)
    finally:
        _writable(workdir / "data" / "raw")
    assert code == 2
    line = _one_line(stderr, "tasks.download")
    assert "data/raw/.digits." in line and ("Permission denied" in line or "Operation not permitted" in line)
    assert "make data/raw writable, or point its setting in params.yaml (paths.*) at a writable folder" in line
    assert list((workdir / "data" / "raw").iterdir()) == []


def test_the_flow_and_its_deployment_refuse_bad_settings_before_starting_prefect(workdir, capsys):
    (workdir / "broken.yaml").write_text("train:\n  epochs: [1\n")
    code, stderr = _run(pipeline.main, capsys, "--params", "broken.yaml")
    assert code == 2 and "broken.yaml, line 3, column 1: not valid YAML" in _one_line(stderr, "flows.pipeline")

    write_params(workdir / "params.yaml", FAST)
    code, stderr = _run(pipeline.main, capsys, "--set", "train.epochs=0")
    assert (
        code == 2
        and "params.yaml: invalid setting train.epochs = 0: Input should be greater than or equal to 1"
        in _one_line(stderr, "flows.pipeline")
    )
    code, stderr = _run(deploy.main, capsys, "--set", "flow.cron=daily")
    assert code == 2 and "flow.cron = 'daily': a cron schedule has 5 fields" in _one_line(stderr, "flows.deploy")
    code, stderr = _run(deploy.main, capsys, "--set", "train.epochs")
    assert code == 2 and "--set 'train.epochs': expected KEY=VALUE" in _one_line(stderr, "flows.deploy")


def test_predict_names_a_missing_model(workdir, capsys):
    from tasks import predict

    code, stderr = _run(predict.main, capsys, "nowhere", "photos/")
    assert code == 2 and "nowhere is not a model file: give models/, a .keras file or a models:/ URI" in _one_line(
        stderr, "tasks.predict"
    )


def test_a_bug_keeps_its_traceback_and_says_it_is_one(capsys):
    def main(arguments):
        return {}["missing"]

    code, stderr = _run(main, capsys)
    assert code == 1
    assert "Traceback" in stderr and "KeyError" in stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .endswith(
            "error: a bug, not a problem with the input: KeyError: 'missing' "
            "(the traceback above shows where; please report it)"
        )
    )
