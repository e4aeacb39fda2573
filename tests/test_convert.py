import hashlib
import json

import numpy as np
import PIL.Image
import pytest

from tasks import config, convert, records
from tests.conftest import REPOSITORY, make_image_folder


def _dataset(**changes) -> config.DatasetParams:
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    return dataset.model_copy(update=changes)


def _tree_digest(root):
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def raw(workdir):
    folder = make_image_folder(workdir / "raw", classes=3, per_class=20)
    (folder / "class_0" / "empty.png").write_bytes(b"")
    (folder / "class_1" / "notes.jpg").write_text("not an image, whatever the extension says")
    png = (folder / "class_2" / "000.png").read_bytes()
    (folder / "class_2" / "truncated.png").write_bytes(png[: len(png) // 2])
    return folder


def test_shards_manifest_and_rejections(raw, workdir):
    before = _tree_digest(raw)
    # ~10 kB of encoded training images, ~1.5 kB and ~3 kB for validation and test: 6 kB shards split train in two.
    result = convert.convert(_dataset(shard_size_mb=0.006), seed=7, raw_dir=raw, shards_dir=workdir / "shards")
    shards = workdir / "shards"

    assert _tree_digest(raw) == before, "the source folder must not change"
    assert result.counts == {"train": 42, "validation": 6, "test": 12}
    assert result.rejected_count == 3
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == ["class_0", "class_1", "class_2"]
    assert manifest["splits"]["test"]["per_class"] == {"class_0": 4, "class_1": 4, "class_2": 4}
    assert manifest["splits"]["validation"]["per_class"] == {"class_0": 2, "class_1": 2, "class_2": 2}
    names = sorted(path.name for path in shards.glob("*.tfrecord"))
    assert names == ["test-00000-of-00001.tfrecord", "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord", "validation-00000-of-00001.tfrecord"]
    for split in records.SPLITS:
        listed = manifest["splits"][split]["shards"]
        assert sum(shard["records"] for shard in listed) == manifest["splits"][split]["count"]
        for shard in listed:
            assert hashlib.sha256((shards / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    rejected = (shards / "rejected.csv").read_text().splitlines()
    assert rejected[0] == "path,reason"
    assert sorted(line.split(",")[0] for line in rejected[1:]) == ["class_0/empty.png", "class_1/notes.jpg", "class_2/truncated.png"]
    assert not [path for path in workdir.iterdir() if path.name.endswith(".partial")]


def test_records_hold_the_source_pixels_as_rgb_with_their_labels(raw, workdir):
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "shards")
    images = list(records.read_split(workdir / "shards", "test", (8, 8)).as_numpy_iterator())

    assert len(images) == 12
    for image, label in images:
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        assert 0 <= label < 3
    first, first_label = images[0]
    classes = ["class_0", "class_1", "class_2"]
    matches = [
        path for path in (raw / classes[first_label]).glob("*.png")
        if path.stat().st_size > 0 and path.name != "truncated.png"
        and np.array_equal(np.asarray(PIL.Image.open(path).convert("RGB")), first)
    ]
    assert len(matches) == 1, "each record is one source image of its own class, pixel for pixel"


def test_conversion_is_deterministic(raw, workdir):
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "first")
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "second")
    assert _tree_digest(workdir / "first") == _tree_digest(workdir / "second")
    convert.convert(_dataset(), seed=8, raw_dir=raw, shards_dir=workdir / "other")
    assert _tree_digest(workdir / "first") != _tree_digest(workdir / "other")


def test_a_corrupted_shard_is_named(raw, workdir):
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "shards")
    shard = workdir / "shards" / "test-00000-of-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="test-00000-of-00001.tfrecord does not match its sha256"):
        records.read_split(workdir / "shards", "test", (8, 8))


def test_bad_source_folders_give_clear_errors(workdir):
    with pytest.raises(FileNotFoundError, match="missing is not a folder: run the download stage first"):
        convert.convert(_dataset(), seed=7, raw_dir=workdir / "missing", shards_dir=workdir / "shards")
    single = make_image_folder(workdir / "single", classes=1)
    with pytest.raises(ValueError, match="at least 2 classes, found \\['class_0'\\]"):
        convert.convert(_dataset(), seed=7, raw_dir=single, shards_dir=workdir / "shards")
    with_empty = make_image_folder(workdir / "with_empty", classes=2)
    (with_empty / "class_9").mkdir()
    with pytest.raises(ValueError, match="class_9 holds no files"):
        convert.convert(_dataset(), seed=7, raw_dir=with_empty, shards_dir=workdir / "shards")
    tiny = make_image_folder(workdir / "tiny", classes=2, per_class=2)
    with pytest.raises(ValueError, match="the validation split is empty: 4 images are too few"):
        convert.convert(_dataset(), seed=7, raw_dir=tiny, shards_dir=workdir / "shards")
    assert not (workdir / "shards").exists(), "a failed conversion leaves no output that looks complete"
