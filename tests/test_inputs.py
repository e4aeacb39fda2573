"""The input pipeline: shapes, crops, distortions, determinism; and the optimizers and schedules by name."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tasks import convert, train
from tasks.common import config, contracts
from tasks.data import inputs, records
from tasks.modeling import optimizers
from tests.conftest import REPOSITORY, make_image_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    params = config.load_params(REPOSITORY / "params.yaml")
    make_image_folder(folder / "raw", classes=3, per_class=20, size=16)
    convert.convert(params.dataset, 7, folder / "raw", folder / "shards")
    return folder / "shards"


def _images(data):
    return np.concatenate([images.numpy() for images, _ in data])


def test_training_batches_are_crops_of_the_input_size_and_reproducible(shards):
    settings = dict(
        image_size=(16, 16),
        input_size=(12, 12),
        crop_padding=0,
        augment=("crop", "flip", "shift", "brightness", "contrast"),
        batch_size=8,
        shuffle_buffer=100,
        cache_mb=10,
        seed=3,
    )
    tf.config.experimental.enable_op_determinism()  # as train does with train.deterministic (the default)
    images, labels = next(iter(inputs.training_data(shards, **settings)))
    assert images.shape == (8, 12, 12, 3) and images.dtype == "uint8" and labels.dtype == "int64"
    keras.utils.set_random_seed(3)
    first = _images(inputs.training_data(shards, **settings))
    keras.utils.set_random_seed(3)
    np.testing.assert_array_equal(first, _images(inputs.training_data(shards, **settings)))
    undistorted = _images(inputs.training_data(shards, **{**settings, "augment": ()}))
    assert not np.array_equal(np.sort(first, axis=None), np.sort(undistorted, axis=None))


@pytest.mark.parametrize("cache_mb", [10, 0], ids=["from memory", "from the shards"])
def test_every_epoch_holds_every_training_image_once_in_a_new_order(shards, cache_mb):
    settings = dict(image_size=(16, 16), input_size=(16, 16), crop_padding=0, augment=(), batch_size=8)
    in_stored_order = np.stack(
        [image for image, _ in records.read_split(shards, "train", (16, 16)).as_numpy_iterator()]
    )
    stored, count = sorted(image.tobytes() for image in in_stored_order), len(in_stored_order)
    data = inputs.training_data(shards, **settings, shuffle_buffer=count, cache_mb=cache_mb, seed=5).repeat(2)
    batches = [images.numpy() for images, _ in data]
    steps = inputs.batches_per_epoch(count, 8)
    assert len(batches) == 2 * steps
    epochs = [np.concatenate(batches[:steps]), np.concatenate(batches[steps:])]
    for epoch in epochs:
        assert sorted(image.tobytes() for image in epoch) == stored, "each image once an epoch, unchanged"
    assert not np.array_equal(epochs[0], epochs[1]), "reshuffled every epoch"
    assert not np.array_equal(epochs[0], in_stored_order), "shuffled"

    # Three replicas (of a batch size they divide): every batch a multiple of three images, the last one cut.
    settings["batch_size"] = 6
    data = inputs.training_data(shards, **settings, shuffle_buffer=count, cache_mb=cache_mb, seed=5, replicas=3)
    sizes = [int(images.shape[0]) for images, _ in data]
    assert len(sizes) == inputs.batches_per_epoch(count, 6, 3)
    assert sizes == [6] * (count // 6) + ([count % 6 // 3 * 3] if count % 6 >= 3 else []), sizes


def test_padded_crops_shift_whole_images_by_at_most_the_padding(shards):
    data = inputs.training_data(
        shards,
        image_size=(16, 16),
        input_size=(16, 16),
        crop_padding=4,
        augment=("crop",),
        batch_size=64,
        shuffle_buffer=1,
        cache_mb=0,
        seed=1,
    )
    plain = inputs.training_data(
        shards,
        image_size=(16, 16),
        input_size=(16, 16),
        crop_padding=0,
        augment=(),
        batch_size=64,
        shuffle_buffer=1,
        cache_mb=0,
        seed=1,
    )
    shifted, original = _images(data), _images(plain)
    assert shifted.shape == original.shape
    assert (shifted == 0).any() and not (original == 0).all(), "zero padding shows at the borders of shifted images"
    assert not np.array_equal(shifted, original)


def _stored_at(manifest: contracts.Manifest, bytes_per_image: int | None) -> contracts.Manifest:
    """The manifest with its training shards' images recorded as `bytes_per_image` each."""
    split = manifest.splits["train"]
    shards = [
        shard.model_copy(update={"image_bytes": None if bytes_per_image is None else bytes_per_image * shard.records})
        for shard in split.shards
    ]
    return manifest.model_copy(
        update={"splits": {**manifest.splits, "train": split.model_copy(update={"shards": shards})}}
    )


def test_the_shuffle_buffer_holds_at_most_shuffle_mb_of_stored_images(shards, capsys):
    manifest = contracts.Manifest.read(shards)
    stored = sum(shard.image_bytes for shard in manifest.splits["train"].shards)
    assert inputs.mean_stored_bytes(manifest, "train") == stored / manifest.count("train")
    # Phone photos kept at their own size, 4 MiB each: 512 MiB hold 128 of them, not the tutorial's 20,000.
    photos = _stored_at(manifest, 4 * 2**20)
    assert inputs.bounded_shuffle_buffer(photos, 20_000, 512) == 128
    assert inputs.bounded_shuffle_buffer(photos, 100, 512) == 100, "never more than train.shuffle_buffer"
    assert inputs.bounded_shuffle_buffer(photos, 20_000, 1) == 1, "one image larger than the bound: a buffer of one"
    assert inputs.bounded_shuffle_buffer(_stored_at(manifest, None), 20_000, 1) == 20_000, "sizes not recorded"

    # The train stage says so when it streams the split through a buffer the bound cut (64 KiB an image: 16 in 1 MiB).
    count = manifest.count("train")
    assert count > 16
    streamed = _train_params(cache_mb=0, shuffle_mb=1)
    assert train._shuffle_buffer(streamed, _stored_at(manifest, 64 * 2**10)) == 16
    said = capsys.readouterr().out
    assert "shuffling through 16 stored images at a time, not train.shuffle_buffer's 20,000" in said
    assert "64 KiB each on average" in said and "train.shuffle_mb bounds the buffer to 1 MiB" in said
    cached = _train_params(shuffle_mb=1)  # the split held in memory: no buffer to speak of
    assert train._shuffle_buffer(cached, _stored_at(manifest, 64 * 2**10)) == 16
    assert capsys.readouterr().out == ""


def test_evaluation_takes_the_centre_and_keeps_the_stored_order(shards):
    centre = inputs.evaluation_data(shards, "test", (16, 16), (10, 10), batch_size=4)
    whole = inputs.evaluation_data(shards, "test", (16, 16), (16, 16), batch_size=4)
    np.testing.assert_array_equal(_images(centre), _images(whole)[:, 3:13, 3:13, :])
    assert [int(label) for _, labels in centre for label in labels] == [
        int(label) for _, labels in whole for label in labels
    ]


def test_a_split_of_more_shards_than_parallel_reads_is_read_whole(tmp_path):
    params = config.load_params(REPOSITORY / "params.yaml")
    make_image_folder(tmp_path / "raw", classes=2, per_class=40)
    convert.convert(
        params.dataset.model_copy(update={"shard_size_mb": 0.0005}), 7, tmp_path / "raw", tmp_path / "shards"
    )
    manifest = contracts.Manifest.read(tmp_path / "shards")
    assert len(manifest.splits["train"].shards) > records.PARALLEL_READS
    sources = [
        source.numpy().decode() for _, _, source in records.read_split(tmp_path / "shards", "train", (8, 8), True)
    ]
    index = [entry.path for entry in contracts.read_index(tmp_path / "shards") if entry.split == "train"]
    assert sorted(sources) == sorted(index), "every record once"
    again = [source.numpy().decode() for _, _, source in records.read_split(tmp_path / "shards", "train", (8, 8), True)]
    assert again == sources, "in the same order every time"


def test_channel_mean_is_in_unit_range(shards):
    mean = inputs.channel_mean(shards, (16, 16))
    assert len(mean) == 3 and all(0.0 < value < 1.0 for value in mean)
    assert mean[0] == pytest.approx(mean[1]) == pytest.approx(mean[2]), "the fixture's images are grey"


def _train_params(**overrides):
    return config.load_params(
        REPOSITORY / "params.yaml", {f"train.{key}": value for key, value in overrides.items()}
    ).train


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sgd", keras.optimizers.SGD),
        ("momentum", keras.optimizers.SGD),
        ("nesterov", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adam", keras.optimizers.Adam),
        ("adagrad", keras.optimizers.Adagrad),
        ("adadelta", keras.optimizers.Adadelta),
    ],
)
def test_every_optimizer_by_name_keeps_moving_averages(name, kind):
    optimizer = optimizers.make_optimizer(_train_params(optimizer=name), total_steps=100)
    assert isinstance(optimizer, kind) and optimizer.use_ema
    if name in ("momentum", "nesterov"):
        assert optimizer.momentum == 0.9 and optimizer.nesterov == (name == "nesterov")
    assert not optimizers.make_optimizer(_train_params(optimizer=name, ema_momentum=None), total_steps=100).use_ema


def test_schedules_follow_the_seeds():
    piecewise = optimizers.make_schedule(
        _train_params(schedule="piecewise", learning_rate=0.1, boundaries=[100, 200]), 300
    )
    assert [float(piecewise(step)) for step in (0, 101, 201)] == pytest.approx([0.1, 0.01, 0.001])
    staircase = optimizers.make_schedule(
        _train_params(schedule="exponential", learning_rate=0.1, decay_steps=10, decay_rate=0.5, staircase=True), 100
    )
    assert [float(staircase(step)) for step in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    cosine = optimizers.make_schedule(_train_params(schedule="cosine", learning_rate=0.1, warmup_steps=10), 110)
    assert [float(cosine(step)) for step in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.05, 0.1, 0.05, 0.0], abs=1e-6)
    assert optimizers.make_schedule(_train_params(), 100) == 0.001
    with pytest.raises(ValueError, match="warmup_steps = 500 leaves no step to decay over; training has 100 steps"):
        optimizers.make_schedule(_train_params(schedule="cosine", warmup_steps=500), 100)
