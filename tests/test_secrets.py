"""Credentials in MLFLOW_TRACKING_URI or a download URL are used, never written down or printed."""

import pytest

from tasks import errors, predict

PASSWORD = "s3cret-Pa55"
# A run against a real `mlflow server` with the password in MLFLOW_TRACKING_URI is in
# tests/test_tracking_server.py, which runs the stages against that server anyway.


@pytest.mark.parametrize(
    ("text", "redacted", "stored"),
    [
        (f"https://alice:{PASSWORD}@mlflow.internal:5000", "https://alice:***@mlflow.internal:5000", "https://mlflow.internal:5000"),
        ("https://ghp_token@example.org/pets.zip", "https://***@example.org/pets.zip", "https://example.org/pets.zip"),
        (f"failed: http://bob:{PASSWORD}@h/api and s3://key:{PASSWORD}@bucket/x", "failed: http://bob:***@h/api and s3://key:***@bucket/x", None),
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
