"""Errors by intent: what each failure means decides its exit code, its message and whether the flow retries.

Fast: no TensorFlow. The command line is errors.run_main, exactly what `python -m tasks.<stage>` runs.
"""

import errno

import pytest
from mlflow.exceptions import MlflowException

from tasks.common import config, errors, files, locking
from tasks.data import fetch
from tests import archives

PROGRAM = __name__  # run_main names a command by the module of its main()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch):
    # The exit codes and messages under test are those of a run without --verbose.
    monkeypatch.delenv(errors.VERBOSE_VARIABLE, raising=False)


def _raising(error: BaseException):
    def main(arguments):
        raise error

    return main


def _kind(value) -> str | None:
    return type(value).__name__ if isinstance(value, BaseException) else None


def _run(main, capsys) -> tuple[int, str]:
    code = errors.run_main(main, [])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("error_class", "code"),
    [
        (errors.BadInput, 2),
        (errors.MissingInput, 2),
        (errors.Outage, 1),
        (errors.Diverged, 1),
        (errors.Busy, 3),
        (errors.PipelineBusy, 3),
        (config.ConfigError, 2),
        (fetch.DownloadOutage, 1),
        (fetch.DownloadRefused, 2),
    ],
)
def test_an_intended_error_ends_in_its_exit_code_and_one_line(error_class, code, capsys):
    exit_code, stderr = _run(_raising(error_class("the thing at fault, and what would fix it")), capsys)

    assert exit_code == code
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [f"{PROGRAM}: error: the thing at fault, and what would fix it"]


def test_the_intent_classes_are_still_what_callers_catch():
    # `except ValueError` / `except FileNotFoundError` around the product's own checks keep working.
    assert issubclass(errors.BadInput, ValueError) and issubclass(errors.MissingInput, FileNotFoundError)
    assert issubclass(errors.Outage, ConnectionError) and issubclass(errors.Busy, RuntimeError)
    assert issubclass(config.ConfigError, errors.BadInput)
    assert issubclass(fetch.DownloadOutage, fetch.DownloadError)
    assert issubclass(fetch.DownloadRefused, fetch.DownloadError)


def test_a_value_error_nobody_raised_on_purpose_is_a_bug_with_its_traceback(capsys):
    exit_code, stderr = _run(_raising(ValueError("x")), capsys)

    assert exit_code == 1
    assert "Traceback" in stderr and "ValueError: x" in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"{PROGRAM}: error: a bug, not a problem with the input: ValueError: x "
        "(the traceback above shows where; please report it)"
    )


def test_a_path_that_cannot_be_written_is_bad_input(capsys):
    denied = PermissionError(errno.EACCES, "Permission denied", "models/.model.keras.123-abc.partial")
    exit_code, stderr = _run(_raising(denied), capsys)

    assert exit_code == 2
    assert stderr.splitlines() == [
        f"{PROGRAM}: error: models/.model.keras.123-abc.partial: Permission denied; make models writable, "
        "or point its setting in params.yaml (paths.*) at a writable folder"
    ]


@pytest.mark.parametrize(
    "error",
    [
        errors.Outage("the tracking server is not answering"),
        OSError(errno.ENOSPC, "No space left on device", "data/shards/train-00000-of-00004.tfrecord"),
        MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 503"),
        fetch.DownloadOutage("https://data.example/pets.zip: gave up after 5 attempts: HTTP 503 Service Unavailable"),
    ],
    ids=_kind,
)
def test_what_waiting_may_fix_is_retried(error):
    assert errors.worth_retrying(error)
    assert errors.exit_code(error) == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.BadInput("train.epochs = 0"), 2),
        (errors.MissingInput("manifest.json is missing"), 2),
        (errors.Diverged("the loss is NaN at step 12"), 1),
        (errors.Busy("another pipeline run is working in this folder"), 3),
        (fetch.DownloadRefused("https://data.example/missing.tgz: HTTP 404 Not Found"), 2),
        (ValueError("x"), None),
        (KeyError("missing"), None),
    ],
    ids=_kind,
)
def test_what_a_retry_would_repeat_is_not_retried(error, code):
    assert not errors.worth_retrying(error)
    assert errors.exit_code(error) == code


# --- downloads, from a server on 127.0.0.1 ---------------------------------------------------------


def test_a_server_that_keeps_failing_is_an_outage(http_server, workdir):
    url = http_server.serve("/down.tgz", b"never sent", fail_first=100)
    with pytest.raises(errors.Outage, match=f"{url}: gave up after 5 attempts: HTTP 503") as failed:
        fetch.download(url, workdir / "downloads" / "down.tgz", None)

    assert isinstance(failed.value, fetch.DownloadError)
    assert errors.worth_retrying(failed.value) and errors.exit_code(failed.value) == 1
    assert len(http_server.gets("/down.tgz")) == fetch.ATTEMPTS


def test_a_missing_file_on_the_server_is_bad_input_and_not_retried(http_server, workdir, capsys):
    url = http_server.url + "/missing.tgz"
    with pytest.raises(errors.BadInput, match="missing.tgz: HTTP 404") as refused:
        fetch.download(url, workdir / "downloads" / "missing.tgz", None)

    assert isinstance(refused.value, fetch.DownloadError)
    assert not errors.worth_retrying(refused.value)
    assert len(http_server.gets("/missing.tgz")) == 1, "asked once"

    exit_code, stderr = _run(lambda arguments: fetch.download(url, workdir / "downloads" / "missing.tgz", None), capsys)
    assert exit_code == 2
    assert stderr.splitlines() == [f"{PROGRAM}: error: {url}: HTTP 404 Not Found"]


def test_refused_credentials_and_a_broken_netrc_are_bad_input(http_server, workdir, monkeypatch):
    url = http_server.serve("/private/pets.zip", b"the archive", credentials="alice:secret")
    monkeypatch.setenv("NETRC", str(workdir / "no-such-netrc"))
    with pytest.raises(fetch.DownloadRefused, match="HTTP 401 Unauthorized; the server wants credentials"):
        fetch.download(url, workdir / "downloads" / "pets.zip", None)

    (workdir / "netrc").write_text("machine 127.0.0.1 login alice secret\n")  # the word "password" forgotten
    monkeypatch.setenv("NETRC", str(workdir / "netrc"))
    with pytest.raises(fetch.DownloadRefused, match="not valid netrc") as refused:
        fetch.download(url, workdir / "downloads" / "pets.zip", None)
    assert errors.exit_code(refused.value) == 2 and not errors.worth_retrying(refused.value)


def test_a_checksum_mismatch_is_bad_input(http_server, workdir):
    url = http_server.serve("/pets.zip", b"another version")
    with pytest.raises(errors.BadInput, match="sha256 mismatch"):
        fetch.download(url, workdir / "downloads" / "pets.zip", "0" * 64)


def test_a_file_that_cannot_be_written_is_not_retried_as_an_outage(workdir, monkeypatch):
    attempts = []

    def transfer(url, partial):
        attempts.append(url)
        raise PermissionError(errno.EACCES, "Permission denied", str(partial))

    monkeypatch.setattr(fetch, "_transfer", transfer)
    with pytest.raises(PermissionError) as denied:
        fetch.download("http://127.0.0.1:9/pets.zip", workdir / "downloads" / "pets.zip", None)

    assert len(attempts) == 1, "the downloads folder, not the network: waiting does not help"
    assert errors.exit_code(denied.value) == 2


def test_archives_that_cannot_be_unpacked_are_bad_input(workdir):
    (workdir / "pets.zip").write_bytes(b"not an archive")
    with pytest.raises(errors.BadInput, match="is neither a zip nor a tar archive"):
        fetch.extract(workdir / "pets.zip", workdir / "unpacked")

    (workdir / "escape.zip").write_bytes(archives.zip_of({"../outside.jpg": archives.jpeg((0, 0, 0))}))
    with pytest.raises(errors.BadInput, match="refused to extract member '../outside.jpg'"):
        fetch.extract(workdir / "escape.zip", workdir / "unpacked")


# --- files and the lock ------------------------------------------------------------------------------


def test_outputs_of_an_earlier_stage_missing_or_damaged_are_bad_input(workdir):
    with pytest.raises(errors.MissingInput, match="run.json is missing: run the train stage first"):
        files.read_json(workdir / "run.json", "run the train stage first")

    (workdir / "run.json").write_text("{not json")
    with pytest.raises(errors.BadInput, match="run.json is not valid JSON"):
        files.read_json(workdir / "run.json", "run the train stage first")

    (workdir / "models").write_text("a file")
    with pytest.raises(errors.BadInput, match="models is a file where a folder is expected"):
        files.make_folder(workdir / "models" / "work")


def test_a_second_run_in_the_same_folder_is_busy(workdir, capsys):
    def second_run(arguments):
        with locking.pipeline_lock("python -m tasks.train", workdir):
            pass

    with locking.pipeline_lock("python -m tasks.convert", workdir):
        exit_code, stderr = _run(second_run, capsys)
        with pytest.raises(errors.Busy):
            second_run([])

    assert exit_code == 3
    (line,) = stderr.splitlines()
    assert line.startswith(f"{PROGRAM}: error: another pipeline run is working in this folder: python -m tasks.convert")
    assert (workdir / locking.LOCK_FILE).read_text() == "", "released: the file names no holder any more"
