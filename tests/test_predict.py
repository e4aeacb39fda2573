import csv
import io

import pytest

from tasks import predict
from tests.test_register import LEARNS
from tests.test_train_evaluate_register import register_in, trained_in


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    with trained_in(folder, LEARNS) as (params, _):
        register_in(folder, params, name="reader", min_precision=0.0)
        yield folder


def _images(folder):
    photos = folder / "photos"
    photos.mkdir()
    for class_name in ("class_0", "class_2"):
        (photos / f"{class_name}.png").write_bytes((folder / "raw" / class_name / "001.png").read_bytes())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "empty.png").write_bytes(b"")
    return photos


def test_a_folder_with_broken_files_gets_a_row_for_each(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    photos = _images(trained)
    exit_code = predict.main(["models", str(photos), "--top-k", "2", "--output", str(trained / "out.csv")])

    assert exit_code == 1, "the exit code says that a file failed"
    rows = {row["file"]: row for row in csv.DictReader((trained / "out.csv").open())}
    assert set(rows) == {str(photos / name) for name in ("broken.jpg", "class_0.png", "class_2.png", "empty.png")}
    assert rows[str(photos / "class_0.png")]["label_1"] == "class_0"
    assert rows[str(photos / "class_2.png")]["label_1"] == "class_2"
    assert float(rows[str(photos / "class_2.png")]["probability_1"]) >= float(
        rows[str(photos / "class_2.png")]["probability_2"]
    )
    assert (
        rows[str(photos / "broken.jpg")]["error"].startswith("truncated or corrupt image data")
        and not rows[str(photos / "broken.jpg")]["label_1"]
    )
    assert rows[str(photos / "empty.png")]["error"] and not rows[str(photos / "empty.png")]["label_1"]
    assert "2 classified, 2 failed" in capsys.readouterr().err


def test_a_registered_model_and_a_glob_to_stdout(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    exit_code = predict.main(["models:/reader@champion", str(trained / "raw" / "class_1" / "00*.png")])

    assert exit_code == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 10
    assert {row["label_1"] for row in rows} == {"class_1"}
    assert list(rows[0]) == ["file", "label_1", "probability_1", "error"]


def test_bad_arguments_are_named(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    with pytest.raises(
        FileNotFoundError, match="nowhere is not a model file: give models/, a .keras file or a models:/ URI"
    ):
        predict.main(["nowhere", str(trained / "raw")])
    with pytest.raises(FileNotFoundError, match="no-such-folder is neither a file, a folder nor a glob pattern"):
        predict.main(["models", str(trained / "no-such-folder")])
    with pytest.raises(SystemExit):
        predict.main(["models", str(trained / "raw"), "--top-k", "4"])
    assert "--top-k must be between 1 and 3" in capsys.readouterr().err


def test_predict_evaluate_and_the_registered_model_give_the_same_probabilities(trained, monkeypatch):
    """One preparation for every path an image takes: evaluate's (test shards), predict's (files read as
    convert reads them) and the registered MLflow model's (raw pixels of any size, prepared inside it)."""
    import mlflow.pyfunc
    import numpy as np
    import PIL.Image

    from tasks.common import contracts, tracking
    from tasks.modeling import scoring

    monkeypatch.chdir(trained)
    model_dir = trained / "models"
    saved = tracking.load_model_file(model_dir / contracts.MODEL_FILE)
    preprocessing = contracts.Preprocessing.read(model_dir)
    assert tuple(saved.input_shape[1:3]) == (None, None), "the saved model takes images of any size"
    evaluated = scoring.predict_split(
        saved, trained / "shards", "test", 8, preprocessing.image_size, preprocessing.input_size
    )
    test_files = [trained / "raw" / source for source in evaluated.sources]

    model, _, stored_size = predict.load("models")
    registered = mlflow.pyfunc.load_model("models:/reader@champion")
    for file, from_evaluate in zip(test_files, evaluated.probabilities, strict=True):
        from_predict = np.asarray(model.predict_on_batch(predict.read_image(file, stored_size)[np.newaxis]))[0]
        pixels = np.asarray(PIL.Image.open(file).convert("RGB"))[
            np.newaxis
        ]  # what a user of the registered model sends
        from_registry = np.asarray(registered.predict(pixels))[0]
        np.testing.assert_allclose(
            from_predict, from_evaluate, rtol=0, atol=1e-6, err_msg=f"predict and evaluate differ on {file}"
        )
        np.testing.assert_allclose(
            from_registry, from_evaluate, rtol=0, atol=1e-6, err_msg=f"MLflow's model and evaluate differ on {file}"
        )

    # Another size: the registered model resizes it itself, exactly as predict's path does.
    odd = trained / "odd.png"
    PIL.Image.open(test_files[0]).convert("RGB").resize((13, 11)).save(odd)
    pixels = np.asarray(PIL.Image.open(odd))[np.newaxis]
    assert pixels.shape[1:3] != tuple(preprocessing.image_size)
    np.testing.assert_allclose(
        np.asarray(registered.predict(pixels))[0],
        np.asarray(model.predict_on_batch(predict.read_image(odd, stored_size)[np.newaxis]))[0],
        rtol=0,
        atol=1e-6,
    )
