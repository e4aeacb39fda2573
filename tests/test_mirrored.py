"""Several replicas on one machine (MirroredStrategy over 2 logical CPU devices) on the settings a user may pick.

The networks that train at 32x32 or smaller, each builder at its default settings (vgg16 and vgg19 are
vgg16_bn's layout without batch normalization: trained so by hand, left out for the suite's time), and the
settings that change how batches meet the replicas (batch size against the data's size, odd splits, moving
averages, an interrupted run): each must train, and where both see the same images its losses are the
one-device run's. Device layouts are fixed when TensorFlow starts, so all of them train one after the other
in one process. (Fine-tuning needs InceptionV3 at 75x75: too slow here; tests/test_training.py fine-tunes on
one device.)
"""

import csv
import json
import pathlib

import pytest

from tasks import train
from tasks.common import errors
from tests.test_training import _finish, _prepare, _start

DEFAULTS = {"train.epochs": 1, "train.image_size": [28, 28], "train.histogram_freq": 0, "register.serve_check": False}
VGG = {"train.image_size": [32, 32], "train.batch_size": 16}
# Images a class: 17 make 41 training images (an odd last batch, cut to an even one) and 3 validation images
# (split unevenly); 19 make 44 training images, whose batches of 64, 32 or 8 all split evenly, so that one
# device and two see exactly the same images, and 3 validation images.
ODD, EVEN = 17, 19
# (name, network, settings beyond the defaults of params.yaml, images a class, whether a one-device run is
# compared). Each network at its defaults; then the settings that change how batches meet the replicas, on
# the network without dropout or batch statistics, whose losses on one device and on two then agree.
CASES = [
    ("mnist_cnn", "mnist_cnn", {}, ODD, False),
    ("keras_cnn", "keras_cnn", {}, ODD, False),
    ("resnet", "resnet", {"train.resnet_n": 1}, ODD, False),
    ("vgg16_bn", "vgg16_bn", VGG, ODD, False),
    (
        "small batches",
        "cifar10_tutorial",
        {"train.epochs": 2, "train.batch_size": 8, "train.log_every_steps": 5},
        EVEN,
        True,
    ),
    ("batch above the data", "cifar10_tutorial", {"train.epochs": 2, "train.batch_size": 64}, EVEN, True),
    (
        "interrupted",
        "cifar10_tutorial",
        {"train.epochs": 3, "train.batch_size": 8, "train.backup_every_seconds": 0},
        EVEN,
        False,
    ),
    (
        "no moving averages",
        "cifar10_tutorial",
        {"train.epochs": 2, "train.batch_size": 8, "train.ema_momentum": None, "train.restore_best": True},
        EVEN,
        True,
    ),
]

# Trains each (folder, strategy) of $RUNS, one after the other in one process; a JSON line for each.
# A folder named "interrupted" is stopped after its first epoch's backup, then trained again: it resumes.
_TRAIN_EACH = """
import json, os, traceback, keras
from tasks import train
from tasks.common import config

class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt

for folder, strategy in json.loads(os.environ["RUNS"]):
    os.chdir(folder)
    params = config.load_params("params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={"strategy": strategy})})
    try:
        if "interrupted" in folder:
            try:
                train.train(**train.arguments(params), callbacks=[Interrupt()])
            except KeyboardInterrupt:
                print("interrupted after epoch 1", flush=True)
        train.train(**train.arguments(params))
        print("RESULT " + json.dumps({"folder": folder, "error": None}), flush=True)
    except Exception as error:
        traceback.print_exc()
        print("RESULT " + json.dumps({"folder": folder, "error": f"{type(error).__name__}: {error}"}), flush=True)
"""


def _train_each(runs: list[tuple[pathlib.Path, str]]) -> str:
    """Trains every folder with its strategy, all in one process on 2 CPU devices (one strategy of each kind)."""
    environment = {"RUNS": json.dumps([(str(folder), strategy) for folder, strategy in runs])}
    process = _start(runs[0][0].parent, code=_TRAIN_EACH, environment=environment)
    output = _finish(process)
    assert process.returncode == 0, output[-3000:]
    results = [json.loads(line.removeprefix("RESULT ")) for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(runs), output[-3000:]
    failed = {result["folder"]: result["error"] for result in results if result["error"]}
    assert not failed, "\n".join(f"{folder}: {error[-600:]}" for folder, error in failed.items())
    return output


def _history(folder: pathlib.Path) -> list[dict[str, float]]:
    with (folder / "models" / "history.csv").open() as stream:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(stream)]


def _settings(network: str, settings: dict) -> dict:
    return {**DEFAULTS, "train.model": network, "train.cpu_devices": 2, **settings}


def test_every_small_network_and_setting_trains_on_two_replicas_as_on_one_device(tmp_path):
    folders = {}
    for name, network, settings, per_class, compared in CASES:
        for strategy in ("mirrored", "one_device") if compared else ("mirrored",):
            folder = tmp_path / name.replace(" ", "_") / strategy
            _prepare(folder, _settings(network, settings), per_class=per_class)
            folders[name, strategy] = folder
    output = _train_each([(folder, strategy) for (_, strategy), folder in folders.items()])
    assert "interrupted after epoch 1" in output and "train: resuming after epoch 1" in output

    for name, _, settings, _, compared in CASES:
        mirrored = _history(folders[name, "mirrored"])
        assert len(mirrored) == settings.get("train.epochs", DEFAULTS["train.epochs"]), name
        if not compared:
            continue
        for mirrored_epoch, one_device_epoch in zip(mirrored, _history(folders[name, "one_device"]), strict=True):
            # The same start, the same images: the same steps, but for the order of additions.
            assert mirrored_epoch["loss"] == pytest.approx(one_device_epoch["loss"], rel=1e-3), name
            assert mirrored_epoch["val_loss"] == pytest.approx(one_device_epoch["val_loss"], rel=1e-3), name
            assert mirrored_epoch["val_accuracy"] == pytest.approx(one_device_epoch["val_accuracy"], abs=1e-6), name


def test_a_batch_size_that_does_not_split_over_the_replicas_is_refused():
    with pytest.raises(
        errors.BadInput,
        match=r"train.batch_size = 33 does not split evenly over the 2 replicas: "
        r"use a multiple of 2, e.g. 32 or 34",
    ):
        train._check_replicas(33, 2)
    train._check_replicas(34, 2)
    train._check_replicas(33, 1)
