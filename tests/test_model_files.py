"""Model files are loaded in Keras' safe mode, and nothing pickled beside a logged model is ever unpickled."""

import pathlib
import pickle

import keras
import mlflow
import mlflow.tensorflow
import numpy as np
import pytest

from tasks import predict
from tasks.common import errors, tracking


def _lambda_model() -> keras.Model:
    inputs = keras.Input((4, 4, 3), dtype="uint8")
    outputs = keras.layers.Lambda(lambda images: keras.ops.cast(images, "float32") / 255.0)(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(outputs))
    return keras.Model(inputs, outputs)


def test_a_keras_file_with_a_lambda_layer_is_refused(workdir, capsys):
    folder = workdir / "models"
    folder.mkdir()
    _lambda_model().save(folder / "model.keras")
    (folder / "labels.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="model.keras: refused to load: it holds code that loading would run"):
        tracking.load_model_file(folder / "model.keras")

    code = errors.run_main(predict.main, ["models", str(folder)])
    line = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line
    assert line.startswith("tasks.predict: error: models/model.keras: refused to load")


class _Planted:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_logged_model_loads_without_unpickling_what_lies_beside_it(workdir):
    mlflow.set_tracking_uri(tracking.tracking_uri())
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    with mlflow.start_run():
        uri = mlflow.tensorflow.log_model(model, name="model").model_uri
    (model_folder,) = {path.parent for path in workdir.rglob("MLmodel")}
    marker = workdir / "code-ran"
    for name in ("global_custom_objects.cloudpickle", "custom_objects.cloudpickle"):
        (model_folder / "data" / name).write_bytes(pickle.dumps(_Planted(marker)))

    loaded = tracking.load_logged_model(uri)
    assert not marker.exists(), "the pickled custom objects were not loaded"
    images = np.zeros((1, 4, 4, 3), dtype="float32")
    assert np.allclose(loaded.predict_on_batch(images), model.predict_on_batch(images))

    mlflow.tensorflow.load_model(uri)  # what the product avoids: MLflow's own loader runs the planted code
    assert marker.exists()
