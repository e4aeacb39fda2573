"""Corrupted shards: a flipped byte or a cut-off shard stops train and evaluate before they read it, naming it.

Every shard's sha256 is in the manifest convert writes; train and evaluate check each shard they read
against it first. Under `dvc repro` the damaged output is seen by DVC too, and convert rebuilds it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import pytest

from bench.workspace import copy_repository
from tasks import convert, train
from tasks.common import config, contracts, files
from tasks.modeling import scoring
from tests.conftest import FAST, REPOSITORY, assert_cache_intact, make_image_folder, write_params


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[config.Params, pathlib.Path]:
    """Params and the shards of a tiny image folder, converted once; each test damages a copy."""
    folder = tmp_path_factory.mktemp("corrupt")
    params = config.load_params(REPOSITORY / "params.yaml", FAST)
    make_image_folder(folder / "raw", classes=3, per_class=12)
    convert.convert(params.dataset, params.base.seed, folder / "raw", folder / "shards")
    return params, folder / "shards"


@pytest.fixture
def shards(converted, workdir) -> pathlib.Path:
    shutil.copytree(converted[1], workdir / "shards")
    return workdir / "shards"


def _flip_one_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _train(params: config.Params, shards: pathlib.Path, workdir: pathlib.Path) -> None:
    train.train(params.train, params.base.seed, shards, workdir / "models", checkpoints_dir=workdir / "checkpoints")


@pytest.mark.parametrize(
    ("shard", "damage"),
    [("train-00000-of-00001.tfrecord", _flip_one_byte), ("validation-00000-of-00001.tfrecord", _truncate)],
)
def test_training_refuses_a_damaged_shard_and_names_it(converted, shards, workdir, shard, damage):
    damage(shards / shard)
    with pytest.raises(ValueError) as error:
        _train(converted[0], shards, workdir)
    message = str(error.value)
    assert str(shards / shard) in message and "does not match its sha256" in message
    assert "dvc repro" in message, "says how to get a good shard back"
    assert not (workdir / "models").exists() and not (workdir / "mlflow.db").exists(), (
        "refused before any training or MLflow run"
    )


def test_evaluate_refuses_a_truncated_test_shard_and_names_it(converted, shards):
    _truncate(shards / "test-00000-of-00001.tfrecord")
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    )
    with pytest.raises(ValueError, match="test-00000-of-00001.tfrecord does not match its sha256"):
        scoring.predict_split(model, shards, "test", 16, (8, 8), (8, 8))


def test_a_shard_listed_but_missing_is_named(converted, shards, workdir):
    (shards / "validation-00000-of-00001.tfrecord").unlink()
    with pytest.raises(
        FileNotFoundError, match="validation-00000-of-00001.tfrecord listed in .*manifest.json is missing"
    ):
        _train(converted[0], shards, workdir)


def test_dvc_sees_the_damaged_shard_and_repro_brings_it_back(tmp_path):
    """`dvc status` reports convert's output modified; `dvc repro` brings the good shard back."""
    folder = copy_repository(tmp_path / "repository")
    make_image_folder(tmp_path / "photos", classes=3, per_class=12)
    write_params(
        folder / "params.yaml", {**FAST, "dataset.name": "imagefolder", "dataset.source": str(tmp_path / "photos")}
    )
    bin_dir = pathlib.Path(sys.executable).parent
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*arguments):
        done = subprocess.run(
            [str(bin_dir / "dvc"), *arguments], cwd=folder, env=environment, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("repro", "convert")
    shard = folder / "data" / "shards" / "imagefolder" / "train-00000-of-00001.tfrecord"
    good = shard.read_bytes()
    _flip_one_byte(shard)

    status = dvc("status", "convert")
    assert "modified:" in status and "data/shards/imagefolder" in status, status
    restored = dvc("repro", "convert")
    # The shards are a persistent output (convert reuses them): DVC runs convert again, which finds the damaged
    # shard, decodes its images again from their files, and writes the same bytes.
    assert "Running stage 'convert'" in restored
    assert "train-00000-of-00001.tfrecord again: it is missing or does not match its sha256" in restored
    assert "from DVC's cache: a damaged copy of a shard" in restored
    assert shard.read_bytes() == good
    manifest = json.loads((shard.parent / contracts.MANIFEST_FILE).read_text())
    assert files.sha256_of(shard) == manifest["splits"]["train"]["shards"][0]["sha256"]
    # The damaged shard was a hard link to DVC's cached copy (cache.type hardlink): convert removed that copy
    # and DVC cached the good shard again, so no version in the cache holds the damage.
    assert_cache_intact(folder)
