"""The promotion gate, exports, and a registered model used without this repository's code."""

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import pytest

from tasks import convert, register
from tasks.common import errors
from tests.conftest import REPOSITORY, make_image_folder
from tests.test_train_evaluate_register import register_in, run_stages


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny image folder and its shards, with an MLflow store beside them."""
    folder = tmp_path_factory.mktemp("registry")
    make_image_folder(folder / "raw", classes=3, per_class=20)
    return folder


@pytest.fixture
def inside(store, monkeypatch):
    monkeypatch.chdir(store)
    return store


def _client(folder):
    return mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


# Enough steps for the tiny folder's three classes to be learned (precision@1 1.0), and a learning rate
# that decays to zero, so that the last epochs do not swing between two classes (validation accuracy
# 1.0 in the last five of twelve epochs; at a constant rate it swung between 0.67 and 1.0 to the end).
LEARNS = {
    "train.epochs": 12,
    "train.batch_size": 4,
    "train.learning_rate": 0.003,
    "train.schedule": "cosine",
    "train.ema_momentum": None,
}


def test_a_worse_second_run_becomes_challenger_and_champion_stays(inside):
    params, good = run_stages(inside, LEARNS)
    first = register_in(inside, params, min_precision=0.0)
    # Deliberately worse: one epoch at a learning rate too small to learn anything.
    params, bad = run_stages(inside, {"train.epochs": 1, "train.learning_rate": 1e-7, "train.ema_momentum": None})
    second = register_in(inside, params, min_precision=0.0)

    assert (first.alias, second.alias) == ("champion", "challenger")
    assert "vs champion version 1's" in second.reason and "< register.min_improvement" in second.reason
    client = _client(inside)
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == first.version == "1"
    assert str(client.get_model_version_by_alias("tiny", "challenger").version) == second.version == "2"
    challenger = client.get_model_version("tiny", "2")
    assert challenger.tags["run_id"] == bad.run_id and challenger.tags["decision"] == second.reason
    assert json.loads((inside / "reports" / "registry.json").read_text())["alias"] == "challenger"

    exported = {item.path for item in client.list_artifacts(good.run_id, "export")}
    assert exported == {"export/model.tflite", "export/saved_model"}, "a champion is exported"
    assert not client.list_artifacts(bad.run_id, "export"), "a challenger is not"


def test_min_precision_and_min_improvement_hold_back_a_good_run(inside):
    params, _ = run_stages(inside, LEARNS)
    metrics_path = inside / "reports" / "metrics.json"
    first = register_in(inside, params, name="gated", min_precision=0.0)
    params, _ = run_stages(inside, LEARNS)  # a second run, as good as the first
    again = register_in(inside, params, name="gated", min_precision=0.0, min_improvement=0.05)
    tie = register_in(inside, params, name="gated", min_precision=0.0, min_improvement=0.0)
    assert (first.alias, again.alias, tie.alias) == ("champion", "challenger", "champion")
    assert "+0.0000 < register.min_improvement 0.05" in again.reason
    assert (first.version, again.version, tie.version) == ("1", "2", "2"), "the run registered again keeps its version"
    assert _client(inside).get_registered_model("gated").aliases == {"champion": 2}, (
        "promoted, it is no longer the challenger"
    )

    params, _ = run_stages(inside, LEARNS)
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "precision_at_1": 0.5}))
    held = register_in(inside, params, name="gated", min_precision=0.9)
    assert held.alias == "challenger"
    assert held.reason == "precision@1 0.5000 is below register.min_precision 0.9"
    assert str(_client(inside).get_model_version_by_alias("gated", "champion").version) == tie.version


def test_a_model_without_a_champion_yet_takes_one(inside):
    """Its first version held back (challenger): the model exists, no version holds `champion`."""
    params, _ = run_stages(
        inside, {"train.epochs": 1, "train.learning_rate": 1e-7, "train.ema_momentum": None}
    )  # learns nothing
    held = register_in(inside, params, name="unchampioned", min_precision=1.0)
    promoted = register_in(inside, params, name="unchampioned", min_precision=0.0)
    assert (held.alias, promoted.alias) == ("challenger", "champion")
    assert promoted.reason.startswith("first version to reach register.min_precision")
    assert (held.version, promoted.version) == ("1", "1"), "one run, one version: decided again, not registered again"
    assert _client(inside).get_model_version("unchampioned", "1").tags["registration"] == "complete"


def test_the_champion_registered_again_stays_as_it_is(inside):
    """A rerun (`dvc repro --force`, or after a kill before registry.json): no second version,
    no comparison with itself."""
    params, _ = run_stages(inside, {"train.epochs": 1})
    first = register_in(inside, params, name="rerun", min_precision=0.0)
    registry = (inside / "reports" / "registry.json").read_bytes()
    (inside / "reports" / "registry.json").unlink()
    again = register_in(inside, params, name="rerun", min_precision=0.0, min_improvement=0.5)
    assert again == first
    assert (inside / "reports" / "registry.json").read_bytes() == registry
    client = _client(inside)
    assert [version.version for version in client.search_model_versions("name = 'rerun'")] == [1]
    assert client.get_registered_model("rerun").aliases == {"champion": 1}


def test_a_changed_test_set_re_evaluates_the_champion_before_comparing(inside):
    params, _ = run_stages(inside, {"train.epochs": 3})
    first = register_in(inside, params, name="moving", min_precision=0.0)
    # Another split of the same images: a different test set, a different manifest hash.
    convert.convert(params.dataset, 8, inside / "raw", inside / "shards_other")
    params, second_run = run_stages(inside, {"train.epochs": 3}, shards="shards_other")
    second = register_in(inside, params, name="moving", shards="shards_other", min_precision=0.0)

    client = _client(inside)
    champion_one = client.get_model_version("moving", first.version)
    measured = [key for key in champion_one.tags if key.startswith("test_precision_at_1_on_")]
    assert len(measured) == 1, "the old champion was scored on the new test set"
    assert f"champion version {first.version}'s {float(champion_one.tags[measured[0]]):.4f}" in second.reason


def test_the_champion_loads_and_predicts_without_this_repository(inside, tmp_path):
    params, _ = run_stages(inside, {"train.epochs": 2})
    register_in(inside, params, name="portable", min_precision=0.0)
    images = sorted((inside / "raw" / "class_2").glob("*.png"))[:3]
    script = textwrap.dedent(
        f"""
        import json, sys
        import mlflow, numpy as np, PIL.Image
        mlflow.set_tracking_uri({f"sqlite:///{inside / 'mlflow.db'}"!r})
        model = mlflow.pyfunc.load_model("models:/portable@champion")
        pixels = np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in {[str(p) for p in images]!r}])
        probabilities = np.asarray(model.predict(pixels))
        names = mlflow.models.get_model_info("models:/portable@champion").metadata["class_names"]
        print(json.dumps({{"shape": probabilities.shape, "sums": probabilities.sum(axis=1).tolist(), "names": names,
                          "tasks_from": getattr(sys.modules.get("tasks"), "__file__", None)}}))
        """
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["shape"] == [3, 3]
    assert answer["sums"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    assert answer["names"] == ["class_0", "class_1", "class_2"]
    # The model carries its own copy of the code it needs; the checkout is never imported.
    assert answer["tasks_from"] is None or not answer["tasks_from"].startswith(str(REPOSITORY))


def test_an_unfinished_model_upload_is_never_registered(inside, monkeypatch):
    params, result = run_stages(inside, {"train.epochs": 1})
    client = _client(inside)
    model_id = json.loads((inside / "models" / "run.json").read_text())["model_uri"].removeprefix("models:/")
    client.finalize_logged_model(model_id, mlflow.entities.LoggedModelStatus.FAILED)
    with pytest.raises(errors.Outage, match="was not completely uploaded"):
        register_in(inside, params, name="half", min_precision=0.0)
    assert not client.search_registered_models(filter_string="name = 'half'")
    assert register.CHAMPION == "champion"
