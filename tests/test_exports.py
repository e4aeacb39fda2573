"""Exports verified against the Keras model before they are attached, and the logged model served for real."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess

import keras
import numpy as np
import pytest

from tasks.common import contracts, errors, tracking
from tasks.data import inputs
from tasks.modeling import architectures, export, serving_check
from tests.test_register import LEARNS
from tests.test_train_evaluate_register import trained_in

ONNX_INSTALLED = all(importlib.util.find_spec(package) for package in ("tf2onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> pathlib.Path:
    """A tiny image folder learned to precision@1 1.0 (confident answers, which a wrong export changes),
    with its MLflow store; the working folder while the module's tests run."""
    folder = tmp_path_factory.mktemp("exports")
    with trained_in(folder, LEARNS):
        yield folder


def _export(folder: pathlib.Path, export_dir: pathlib.Path) -> export.Exports:
    models = folder / "models"
    return export.export_verified(
        models / contracts.MODEL_FILE, export_dir, folder / "shards", contracts.Preprocessing.read(models), 64
    )


def test_every_format_is_written_and_answers_as_the_keras_model(learned, tmp_path):
    exports = _export(learned, tmp_path)

    written = [check.format for check in exports.checks]
    expected = ["saved_model", "tflite_float32", "tflite_float16", "tflite_int8"] + (["onnx"] if ONNX_INSTALLED else [])
    assert written == expected
    assert set(exports.left_out) == ({"onnx"} - set(written))
    test_images = contracts.Manifest.read(learned / "shards").count("test")
    for check in exports.checks:
        assert (tmp_path / check.file).exists() and check.size_bytes > 0
        assert check.top1_agreement == 1.0, check
        assert check.max_probability_difference <= export.TOLERANCES[check.format].max_probability_difference
        assert check.precision_at_1 == 1.0, "the tiny folder is learned; every format keeps it"
        assert check.latency_ms_per_image > 0
        assert list(check.row()) == [
            "format",
            "file",
            "size_bytes",
            "precision_at_1",
            "keras_precision_at_1",
            "top1_agreement",
            "max_probability_difference",
            "latency_ms_per_image",
        ]
    sizes = {check.format: check.size_bytes for check in exports.checks}
    assert sizes["tflite_int8"] < sizes["tflite_float16"] < sizes["tflite_float32"], "quantization shrinks the file"
    table = export.markdown_table(exports).splitlines()
    # Header, rows, the Keras model's precision@1 (after a blank line), what was left out.
    assert len(table) == 2 + len(exports.checks) + 2 + 2 * len(exports.left_out)
    assert table[2].startswith("| saved_model | saved_model |")
    assert test_images <= export.VERIFICATION_IMAGES, "every test image of the tiny folder was compared"


def test_an_export_that_prepares_images_wrongly_is_refused(learned, tmp_path, monkeypatch):
    made_by = architectures.calibrated_network

    def inverted(model):
        """The network behind a preparation gone wrong: dark and bright pixels swapped."""
        network = made_by(model)
        images = keras.Input(shape=network.input_shape[1:], dtype="uint8", name="image")
        wrong = keras.ops.cast(255.0 - keras.ops.cast(images, "float32"), "uint8")
        return keras.Model(images, network(wrong))

    monkeypatch.setattr(export.architectures, "calibrated_network", inverted)
    with pytest.raises(errors.BadInput) as raised:
        _export(learned, tmp_path)
    message = str(raised.value)
    for name in ("tflite_float32 (model_float32.tflite)", "tflite_float16", "tflite_int8"):
        assert name in message
    assert "top-1 agreement with the Keras model" in message and "at least 1.0 expected" in message
    assert "saved_model (" not in message, "the SavedModel holds the whole model and was not broken"


def test_a_model_trained_in_mixed_precision_is_exported_in_float32(tmp_path):
    keras.mixed_precision.set_dtype_policy("mixed_float16")  # as train sets it with a GPU
    try:
        network = architectures.build_model("mnist_cnn", (8, 8, 3), 3)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    model = architectures.serving_model(network, (8, 8), (8, 8), temperature=1.5)

    copy, half_precision = export._float32_network(model)

    assert half_precision
    assert {layer.dtype_policy.name for layer in copy.get_layer("mnist_cnn_logits").layers} == {"float32"}
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(copy.predict_on_batch(images), model.predict_on_batch(images), atol=0.01)
    export._write_tflite(copy, tmp_path, images)  # float16 layers would fail: "TF Select ops: BiasAdd, Conv2D"
    assert all((tmp_path / export.FILES[name]).stat().st_size for name in ("tflite_float32", "tflite_int8"))


def test_onnx_is_left_out_with_the_reason_when_its_converter_is_missing(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "tf2onnx" else find_spec(name))
    assert export._write_onnx(None, tmp_path / "model.onnx") == "tf2onnx not installed (pip install '.[onnx]')"


@pytest.mark.skipif(not ONNX_INSTALLED, reason="the onnx extra is not installed")
def test_onnx_is_left_out_with_the_reason_when_tf2onnx_cannot_convert_the_network(tmp_path):
    network = architectures.build_model("resnet", (8, 8, 3), 3, resnet_n=1, channel_mean=[0.5, 0.5, 0.5])
    serving = architectures.calibrated_network(architectures.serving_model(network, (8, 8), (8, 8)))
    reason = export._write_onnx(serving, tmp_path / "model.onnx")
    assert reason.startswith("tf2onnx cannot convert this network: ") and "subtract_mean" in reason
    assert not (tmp_path / "model.onnx").exists(), "no file that does not work"


# --- the served model


@pytest.fixture
def server_groups(monkeypatch) -> list[int]:
    """The process group of every process started while the test runs (each server is one)."""
    groups = []

    class Recorded(subprocess.Popen):
        def __init__(self, *arguments, **options):
            super().__init__(*arguments, **options)
            groups.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return groups


def _running(group: int) -> list[int]:
    """The processes of `group` that run: not ended, not zombies waiting for PID 1 to reap them."""
    running = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            running.append(int(stat.parent.name))
    return running


def _test_images(folder: pathlib.Path) -> np.ndarray:
    size = contracts.Preprocessing.read(folder / "models").image_size
    return next(iter(inputs.evaluation_data(folder / "shards", "test", size, size, 6)))[0].numpy()


def test_the_served_model_answers_as_the_model_in_this_process(learned, server_groups):
    run = contracts.RunRecord.read(learned / "models")
    tracking.connect(run.tracking_uri)
    images = _test_images(learned)
    expected = tracking.load_model_file(learned / "models" / contracts.MODEL_FILE).predict_on_batch(images)

    served = serving_check.check_served(run.model_uri, images, np.asarray(expected))

    assert served.images == len(images) == 6
    assert served.largest_difference <= serving_check.SERVED_TOLERANCE
    assert 0 < served.seconds_to_first_answer < 180
    assert len(server_groups) == 1 and not _running(server_groups[0]), "the server stopped"


def test_a_model_that_cannot_be_served_fails_with_the_servers_reason(learned, server_groups):
    tracking.connect(contracts.RunRecord.read(learned / "models").tracking_uri)
    images = _test_images(learned)
    with pytest.raises(errors.BadInput) as raised:
        serving_check.check_served("models:/m-0123456789abcdef", images, np.zeros((len(images), 3)))
    message = str(raised.value)
    assert "exited (code" in message and "before answering /ping" in message
    assert "m-0123456789abcdef' not found" in message, "the server's own last lines say why"
    assert server_groups and not _running(server_groups[0])


def test_a_server_that_does_not_answer_in_time_is_stopped(learned, server_groups):
    run = contracts.RunRecord.read(learned / "models")
    tracking.connect(run.tracking_uri)
    images = _test_images(learned)
    with pytest.raises(errors.Outage, match="did not answer /ping in time"):
        serving_check.check_served(run.model_uri, images, np.zeros((len(images), 3)), timeout_seconds=1)
    assert server_groups and not _running(server_groups[0]), "stopped while it was still starting"


def test_answers_that_differ_from_the_expected_ones_are_refused(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO: Uvicorn running\nINFO: POST /invocations 200\n")
    expected = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    assert serving_check._compare(expected + 1e-6, expected, "models:/m-1", log) == pytest.approx(1e-6, rel=0.1)
    with pytest.raises(errors.BadInput, match=r"largest probability difference 0\.1, at most 0\.0001") as raised:
        serving_check._compare(expected + [[0.1, -0.1], [0, 0]], expected, "models:/m-1", log)
    assert "POST /invocations 200" in str(raised.value), "with the server's last lines"
    with pytest.raises(errors.BadInput, match="largest probability difference nan"):
        serving_check._compare(np.full_like(expected, np.nan), expected, "models:/m-1", log)
    with pytest.raises(errors.BadInput, match=r"of shape \(2, 3\), \(2, 2\) expected"):
        serving_check._compare(np.zeros((2, 3), np.float32), expected, "models:/m-1", log)
