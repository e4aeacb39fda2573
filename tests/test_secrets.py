"""Credentials in MLFLOW_TRACKING_URI, netrc or a download URL are used, never written down or printed."""

import re

import pytest

from tasks import download, predict
from tasks.common import errors
from tasks.data import fetch
from tests.conftest import LocalServer, write_params

PASSWORD = "s3cret-Pa55"
# A run against a real `mlflow server` with the password in MLFLOW_TRACKING_URI is in
# tests/test_tracking_server.py, which runs the stages against that server anyway.


@pytest.mark.parametrize(
    ("text", "redacted", "stored"),
    [
        (
            f"https://alice:{PASSWORD}@mlflow.internal:5000",
            "https://alice:***@mlflow.internal:5000",
            "https://mlflow.internal:5000",
        ),
        ("https://ghp_token@example.org/pets.zip", "https://***@example.org/pets.zip", "https://example.org/pets.zip"),
        (
            f"failed: http://bob:{PASSWORD}@h/api and s3://key:{PASSWORD}@bucket/x",
            "failed: http://bob:***@h/api and s3://key:***@bucket/x",
            None,
        ),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ],
)
def test_passwords_in_urls_are_hidden(text, redacted, stored):
    assert errors.redact(text) == redacted
    if stored is not None:
        assert errors.without_credentials(text) == stored


def test_an_unreachable_server_is_named_without_its_password(workdir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:9")
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    code = errors.run_main(predict.main, ["models:/digits-mnist_cnn@champion", "photos/"])
    stderr = capsys.readouterr().err
    assert code == 1 and "Traceback" not in stderr
    assert stderr.startswith("tasks.predict: error: MLflow: ") and "127.0.0.1:9" in stderr
    assert PASSWORD not in stderr


def _netrc(folder, monkeypatch, login="alice", password=PASSWORD):
    path = folder / "netrc"
    path.write_text(f"machine 127.0.0.1\n  login {login}\n  password {password}\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    return path


def test_a_download_takes_its_credentials_from_netrc_and_never_passes_them_on(http_server, workdir, monkeypatch):
    url = http_server.serve("/private/pets.zip", b"the archive", credentials=f"alice:{PASSWORD}")
    monkeypatch.setenv("NETRC", str(workdir / "no-such-netrc"))
    with pytest.raises(
        fetch.DownloadError,
        match=r"HTTP 401 Unauthorized; the server wants credentials it accepts: put them in ~/.netrc",
    ):
        fetch.download(url, workdir / "downloads" / "pets.zip", None)

    netrc_file = _netrc(workdir, monkeypatch)
    assert fetch.download(url, workdir / "downloads" / "pets.zip", None).read_bytes() == b"the archive"
    asked, answered = http_server.gets("/private/pets.zip")[-2:]
    assert "Authorization" not in asked and answered["Authorization"].startswith("Basic "), (
        "sent only when the server asks"
    )

    # Redirected within the same server, they follow; redirected to another one (another port), never.
    moved = http_server.serve("/moved/pets.zip", b"", redirect_to="/private/pets.zip")
    assert fetch.download(moved, workdir / "downloads" / "moved.zip", None).read_bytes() == b"the archive"
    elsewhere = LocalServer()
    try:
        elsewhere.serve("/pets.zip", b"the archive", credentials=f"alice:{PASSWORD}")
        away = http_server.serve("/away/pets.zip", b"", redirect_to=f"{elsewhere.url}/pets.zip")
        with pytest.raises(fetch.DownloadError, match="HTTP 401"):
            fetch.download(away, workdir / "downloads" / "away.zip", None)
        assert elsewhere.gets("/pets.zip") and not [
            headers for headers in elsewhere.gets("/pets.zip") if "Authorization" in headers
        ]
    finally:
        elsewhere.stop()
    written = [path for path in workdir.rglob("*") if path.is_file() and path != netrc_file]
    assert written and not [path for path in written if PASSWORD.encode() in path.read_bytes()]


def test_a_malformed_netrc_is_read_only_when_asked_and_named_without_its_secrets(http_server, workdir, monkeypatch):
    netrc_file = workdir / "netrc"
    netrc_file.write_text("machine 127.0.0.1 login alice s3cret\n")  # the word "password" forgotten
    monkeypatch.setenv("NETRC", str(netrc_file))
    public = http_server.serve("/public/pets.zip", b"the archive")
    assert fetch.download(public, workdir / "downloads" / "public.zip", None).read_bytes() == b"the archive"
    private = http_server.serve("/private/pets.zip", b"the archive", credentials=f"alice:{PASSWORD}")
    with pytest.raises(
        fetch.DownloadError, match=rf"{re.escape(str(netrc_file))}, line \d: not valid netrc; fix the file"
    ) as refused:
        fetch.download(private, workdir / "downloads" / "pets.zip", None)
    assert "s3cret" not in str(refused.value)


def test_a_password_in_dataset_source_is_refused_without_printing_it(workdir, capsys):
    write_params(
        workdir / "params.yaml",
        {"dataset.name": "imagefolder", "dataset.source": f"https://alice:{PASSWORD}@data.example/pets.zip"},
    )
    code = errors.run_main(download.main, [])
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert (
        "dataset.source = 'https://alice:***@data.example/pets.zip': a user name, password or token in the URL"
        in stderr
    )
    assert "~/.netrc" in stderr and PASSWORD not in stderr
    assert not (workdir / "data").exists()
