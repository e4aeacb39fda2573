"""The promotion gate on real runs (evidence, class drops, forced promotion), verified exports, the served-model
check, and a registered model used without this repository's code."""

import datetime
import getpass
import json
import os
import subprocess
import sys
import textwrap

import keras
import mlflow
import pytest
import scipy.stats

from tasks import convert, register
from tasks.common import contracts, errors, tracking
from tasks.modeling import architectures, scoring, serving_check
from tests.conftest import EXPORTED, REPOSITORY, make_image_folder
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


def _version(folder, name, version):
    return _client(folder).get_model_version(name, version)


def test_a_run_that_differs_only_in_its_seed_does_not_take_the_champion(inside):
    params, first_run = run_stages(inside, LEARNS)
    first = register_in(inside, params, name="seeded", min_precision=0.0)
    params, second_run = run_stages(inside, LEARNS, seed=8)  # same data, same settings, other initial weights
    second = register_in(inside, params, name="seeded", min_precision=0.0)

    assert (first.alias, second.alias) == ("champion", "challenger")
    assert "not better at register.significance 0.05" in second.reason
    version = _version(inside, "seeded", second.version)
    tags = version.tags
    test_images = json.loads((inside / "reports" / "metrics.json").read_text())["images"]
    assert (tags["gate.champion_version"], int(tags["gate.images"])) == (first.version, test_images)
    right_alone, wrong_alone = int(tags["gate.challenger_only_right"]), int(tags["gate.champion_only_right"])
    expected_p = (
        scipy.stats.binomtest(right_alone, right_alone + wrong_alone, 0.5, alternative="greater").pvalue
        if right_alone + wrong_alone
        else 1.0
    )
    assert float(tags["gate.p_value"]) == pytest.approx(expected_p, rel=1e-3) and expected_p >= 0.05
    assert tags["decision"] == second.reason and tags["registration"] == "complete"
    assert "McNemar's exact test gives p" in version.description and second.reason in version.description
    registry = json.loads((inside / "reports" / "registry.json").read_text())
    assert registry["alias"] == "challenger" and "McNemar" in registry["evidence"]
    logged = mlflow.artifacts.load_dict(f"runs:/{second_run.run_id}/registration/gate.json")
    assert logged["gate"]["challenger_only_right"] == right_alone and logged["reason"] == second.reason
    note = _client(inside).get_run(second_run.run_id).data.tags["mlflow.note.content"]
    assert "**challenger**" in note and "McNemar" in note, "the run's description says it too"
    assert not _client(inside).list_artifacts(second_run.run_id, "export"), "a challenger is not exported"


def test_a_clearly_better_run_is_promoted_with_evidence_verified_exports_and_a_served_check(inside):
    # Deliberately weak: one epoch at a learning rate too small to learn anything.
    params, _ = run_stages(inside, {"train.epochs": 1, "train.learning_rate": 1e-7, "train.ema_momentum": None})
    first = register_in(inside, params, name="better", min_precision=0.0)
    params, strong = run_stages(inside, LEARNS)
    second = register_in(inside, params, name="better", min_precision=0.0, serve_check=True)

    assert (first.alias, second.alias) == ("champion", "champion")
    assert "better at register.significance 0.05" in second.reason
    client = _client(inside)
    assert client.get_registered_model("better").aliases == {"champion": 2}
    tags = client.get_model_version("better", "2").tags
    assert float(tags["gate.p_value"]) < 0.05
    assert int(tags["gate.challenger_only_right"]) > int(tags["gate.champion_only_right"])
    exported = {item.path for item in client.list_artifacts(strong.run_id, "export")}
    assert set(EXPORTED) <= exported, "a champion carries its verified exports"
    table = mlflow.artifacts.load_text(f"runs:/{strong.run_id}/export/checks.md")
    assert "tflite_int8" in table and "saved_model" in table
    logged = mlflow.artifacts.load_dict(f"runs:/{strong.run_id}/registration/gate.json")
    assert logged["served"].startswith("`mlflow models serve` gave its first answer ")
    assert logged["exports"] == table
    registry = json.loads((inside / "reports" / "registry.json").read_text())
    assert "served" not in registry and "exports" not in registry, "times measured now: a rerun writes the same file"
    assert registry["evidence"].startswith("On the same")
    description = client.get_model_version("better", "2").description
    assert "Serving: `mlflow models serve` gave its first answer" in description and "tflite_float16" in description


def test_a_gain_that_costs_one_class_too_much_recall_is_not_promoted(inside):
    """Champion: a model that neglects classes 1 and 2; challenger: one that neglects class 0 instead. The
    challenger gains overall, but class 0 loses its recall."""
    neglect = {"class_0": 1.0, "class_1": 1e-4, "class_2": 1e-4}
    params, _ = run_stages(inside, {**LEARNS, "train.class_weight": neglect})
    first = register_in(inside, params, name="classes", min_precision=0.0)
    params, _ = run_stages(inside, {**LEARNS, "train.class_weight": {"class_0": 1e-4, "class_1": 1.0, "class_2": 1.0}})
    held = register_in(inside, params, name="classes", min_precision=0.0, significance=0.5)

    tags = _version(inside, "classes", held.version).tags
    assert float(tags["gate.precision_at_1"]) > float(tags["gate.champion_precision_at_1"]), "an overall gain"
    assert tags["gate.worst_class"] == "class_0" and float(tags["gate.worst_class_recall_change"]) < -0.5
    assert (first.alias, held.alias) == ("champion", "challenger")
    assert "class class_0's recall falls from 1.0000" in held.reason and "register.max_class_drop 0.1" in held.reason
    # The same run, registered again without the class check (and at the same significance), is promoted:
    # the class drop alone held it back.
    again = register_in(inside, params, name="classes", min_precision=0.0, significance=0.5, max_class_drop=1.0)
    assert (again.version, again.alias) == (held.version, "champion")


def test_a_person_can_force_a_promotion_and_it_is_recorded(inside):
    params, _ = run_stages(inside, LEARNS)
    register_in(inside, params, name="forced", min_precision=0.0)
    params, _ = run_stages(inside, LEARNS, seed=9)
    held = register_in(inside, params, name="forced", min_precision=0.0)
    assert held.alias == "challenger"
    registry_path = inside / "reports" / "registry.json"
    with pytest.raises(errors.BadInput, match="--reason is empty"):
        register.promote(params.registration, "forced", held.version, " ", inside / "shards", registry_path)
    with pytest.raises(errors.BadInput, match=r"--promote 7: forced has no such version \(versions: 1, 2\)"):
        register.promote(params.registration, "forced", "7", "why not", inside / "shards", registry_path)

    promoted = register.promote(
        params.registration,
        "forced",
        held.version,
        "QA signed off the new camera's images",
        inside / "shards",
        registry_path,
    )
    client = _client(inside)
    assert promoted.alias == "champion" and client.get_registered_model("forced").aliases == {"champion": 2}
    tags = client.get_model_version("forced", held.version).tags
    assert tags["promotion.user"] == getpass.getuser()
    assert tags["promotion.reason"] == "QA signed off the new camera's images"
    when = datetime.datetime.fromisoformat(tags["promotion.time"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 600
    assert "promoted by hand past the gate (champion was version 1)" in tags["decision"]
    registry = json.loads(registry_path.read_text())
    assert registry["forced"].endswith(": QA signed off the new camera's images")
    assert "Forced promotion: by" in client.get_model_version("forced", held.version).description
    held_run = client.get_model_version("forced", held.version).run_id
    assert set(EXPORTED) <= {item.path for item in client.list_artifacts(held_run, "export")}, "exported when forced"


def test_min_precision_and_min_improvement_hold_back_a_good_run(inside):
    params, _ = run_stages(inside, {"train.epochs": 1, "train.learning_rate": 1e-7, "train.ema_momentum": None})
    metrics_path = inside / "reports" / "metrics.json"
    first = register_in(inside, params, name="gated", min_precision=0.0)
    params, _ = run_stages(inside, LEARNS)  # clearly better
    again = register_in(inside, params, name="gated", min_precision=0.0, min_improvement=0.99)
    assert (first.alias, again.alias) == ("champion", "challenger")
    assert "< register.min_improvement 0.99" in again.reason
    promoted = register_in(inside, params, name="gated", min_precision=0.0)
    assert (again.version, promoted.version, promoted.alias) == ("2", "2", "champion"), (
        "the run registered again keeps its version"
    )
    assert _client(inside).get_registered_model("gated").aliases == {"champion": 2}, (
        "promoted, it is no longer the challenger"
    )

    params, _ = run_stages(inside, LEARNS)
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "precision_at_1": 0.5}))
    held = register_in(inside, params, name="gated", min_precision=0.9)
    assert held.alias == "challenger"
    assert held.reason == "precision@1 0.5000 is below register.min_precision 0.9"
    assert str(_client(inside).get_model_version_by_alias("gated", "champion").version) == promoted.version


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


def test_a_changed_test_set_re_scores_the_champion_on_the_new_test_images(inside):
    params, _ = run_stages(inside, {"train.epochs": 3})
    first = register_in(inside, params, name="moving", min_precision=0.0)
    # Another split of the same images: a different test set, a different manifest hash.
    convert.convert(params.dataset, 8, inside / "raw", inside / "shards_other")
    params, _ = run_stages(inside, {"train.epochs": 3}, shards="shards_other")
    second = register_in(inside, params, name="moving", shards="shards_other", min_precision=0.0)

    tags = _version(inside, "moving", second.version).tags
    new_test_images = contracts.Manifest.read(inside / "shards_other").count("test")
    assert int(tags["gate.images"]) == new_test_images != contracts.Manifest.read(inside / "shards").count("test")
    champion = tracking.load_logged_model(f"models:/moving/{first.version}")
    rescored = scoring.predict_split(champion, inside / "shards_other", "test", 64, (8, 8), (8, 8))
    precision = float((rescored.probabilities.argmax(axis=1) == rescored.labels).mean())
    assert tags["gate.champion_precision_at_1"] == f"{precision:.4f}"
    assert f"champion version {first.version}'s {precision:.4f} on the same {new_test_images} test images" in (
        second.reason
    )


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


def test_a_broken_export_or_a_model_that_cannot_be_served_does_not_move_the_alias(inside, monkeypatch):
    params, _ = run_stages(inside, {"train.epochs": 1, "train.learning_rate": 1e-7, "train.ema_momentum": None})
    first = register_in(inside, params, name="refused", min_precision=0.0)
    params, strong = run_stages(inside, LEARNS)  # clearly better: the gate would promote it
    client = _client(inside)

    made_by = architectures.calibrated_network

    def wrongly_prepared(model):
        """The network of the TFLite files behind a preparation gone wrong: dark and bright swapped."""
        network = made_by(model)
        images = keras.Input(shape=network.input_shape[1:], dtype="uint8", name="image")
        return keras.Model(images, network(keras.ops.cast(255.0 - keras.ops.cast(images, "float32"), "uint8")))

    with monkeypatch.context() as patch:
        patch.setattr(architectures, "calibrated_network", wrongly_prepared)
        with pytest.raises(errors.BadInput, match=r"tflite_float32 \(model_float32.tflite\): top-1 agreement"):
            register_in(inside, params, name="refused", min_precision=0.0)
    version = client.get_model_version("refused", "2")
    assert (
        version.tags["registration"] == "refused"
        and "not promoted: an export answers differently" in (version.tags["decision"])
    )
    assert client.get_registered_model("refused").aliases == {"champion": int(first.version)}
    assert not client.list_artifacts(strong.run_id, "export"), "nothing of a refused export is attached"

    # A server that cannot start: `mlflow models serve` finds no `uvicorn` on its PATH.
    environment = serving_check._environment
    bare = {"PATH": "/usr/bin:/bin"}
    with monkeypatch.context() as patch:
        patch.setattr(serving_check, "_environment", lambda: {**environment(), **bare})
        with pytest.raises(errors.BadInput, match=r"mlflow models serve -m models:/refused/2 exited"):
            register_in(inside, params, name="refused", min_precision=0.0, serve_check=True)
    assert client.get_registered_model("refused").aliases == {"champion": int(first.version)}
    assert client.get_model_version("refused", "2").tags["registration"] == "refused"

    promoted = register_in(inside, params, name="refused", min_precision=0.0, serve_check=True)  # fixed
    assert (promoted.version, promoted.alias) == ("2", "champion")
    assert client.get_model_version("refused", "2").tags["registration"] == "complete"
