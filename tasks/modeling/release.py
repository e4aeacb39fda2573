"""What a version must pass before it becomes champion, beyond the gate: exports that run and agree with the
Keras model, and a real `mlflow models serve` process that answers as the model does in this process.

Both run before the alias moves. A failure refuses the promotion with a message that names the format or
says why serving failed; the version stays registered, without the alias (TFX's InfraValidator does the
same: a model that cannot be served is not blessed).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import mlflow
import numpy as np
import pandas as pd

from tasks.common import contracts, disk, errors, tracking
from tasks.data import inputs
from tasks.modeling import export, serving_check

SERVED_IMAGES = 8  # test images posted to the served model
EXPORT_BATCH_SIZE = 64  # images per step when the exports are run on the test split


@dataclasses.dataclass(frozen=True)
class Release:
    exports: str  # the verified exports, a markdown table
    served: str  # the served-model check, in words


def verify_and_attach(
    run_id: str, model_file: pathlib.Path, model_uri: str, shards_dir: pathlib.Path, serve: bool
) -> Release:
    """Exports the model of `model_file` in every format, checks each on the test split of `shards_dir`, then
    serves `model_uri` and checks its answers; attaches the exports and their table to run `run_id`."""
    preprocessing = contracts.Preprocessing.read(model_file.parent)
    with tempfile.TemporaryDirectory() as folder:
        export_dir = pathlib.Path(folder)
        with disk.writing({"TMPDIR": pathlib.Path(tempfile.gettempdir())}):  # the exports' room: export.space_needed
            exports = export.export_verified(model_file, export_dir, shards_dir, preprocessing, EXPORT_BATCH_SIZE)
        served = (
            _served(model_file, model_uri, shards_dir, preprocessing)
            if serve
            else "not checked (register.serve_check: false)"
        )
        table = export.markdown_table(exports)
        client = mlflow.MlflowClient()
        for path in sorted(export_dir.iterdir()):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), f"export/{path.name}")
            else:
                client.log_artifact(run_id, str(path), "export")
        client.log_table(run_id, pd.DataFrame([check.row() for check in exports.checks]), "export/checks.json")
        client.log_text(run_id, table, "export/checks.md")
    return Release(exports=table, served=served)


def _served(
    model_file: pathlib.Path, model_uri: str, shards_dir: pathlib.Path, preprocessing: contracts.Preprocessing
) -> str:
    """Serves `model_uri` and compares its answers on a few test images with the saved model's here."""
    size = preprocessing.image_size  # uncropped: the model prepares images itself
    images, _ = next(iter(inputs.evaluation_data(shards_dir, "test", size, size, SERVED_IMAGES)))
    images = images.numpy()
    model = tracking.load_model_file(model_file)
    expected = np.asarray(model.predict_on_batch(images))
    result = serving_check.check_served(model_uri, images, expected)
    return (
        f"`mlflow models serve` gave its first answer {result.seconds_to_first_answer:.1f} s after starting; its "
        f"probabilities on {result.images} test images equal this process's within {result.largest_difference:.2g}"
    )


def logged_model_file(model_uri: str) -> pathlib.Path:
    """The .keras file of a logged model, downloaded, with the model's preparation record written beside it
    (as the train stage writes it beside models/model.keras)."""
    import mlflow.models

    model_file = tracking.logged_model_file(model_uri)
    recorded = (mlflow.models.get_model_info(model_uri).metadata or {}).get("preprocessing")
    if not recorded:
        raise errors.BadInput(
            f"{model_uri} does not record how it prepares images (metadata: preprocessing); retrain it"
        )
    tracking.load_model_file(model_file, what=model_uri)  # refuses, naming the URI, a file it could not load
    contracts.Preprocessing.model_validate(recorded).write(model_file.parent)
    return model_file
