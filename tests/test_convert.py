import collections
import csv
import gc
import hashlib
import json

import numpy as np
import PIL.Image
import pytest

from tasks import convert
from tasks.common import config, contracts
from tasks.common.contracts import SPLITS
from tasks.data import listing, records, shard_writing, splits
from tests.conftest import REPOSITORY, make_image_folder


def _dataset(**changes) -> config.DatasetParams:
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    return dataset.model_copy(update=changes)


def _tree_digest(root):
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def raw(workdir):
    folder = make_image_folder(workdir / "raw", classes=3, per_class=20)
    (folder / "class_0" / "empty.png").write_bytes(b"")
    (folder / "class_1" / "notes.jpg").write_text("not an image, whatever the extension says")
    png = (folder / "class_2" / "000.png").read_bytes()
    (folder / "class_2" / "truncated.png").write_bytes(png[: len(png) // 2])
    return folder


def test_shards_manifest_and_rejections(raw, workdir):
    before, frozen_before = _tree_digest(raw), gc.get_freeze_count()
    # ~10 kB of encoded training images, ~1.5 kB and ~3 kB for validation and test: 6 kB shards split train in two.
    result = convert.convert(_dataset(shard_size_mb=0.006), seed=7, raw_dir=raw, shards_dir=workdir / "shards")
    shards = workdir / "shards"

    assert _tree_digest(raw) == before, "the source folder must not change"
    assert gc.isenabled() and gc.get_freeze_count() == frozen_before, "convert hands the collector back as it was"
    # Each image's split follows from its class and name alone (tests/test_splits.py checks the rule).
    expected = collections.Counter()
    for label in range(3):
        for index in range(20):
            place = splits.position(7, f"class_{label}", f"{index:03d}.png")
            expected[(splits.split_of(place, None, {"test": 0.2, "validation": 0.1}), f"class_{label}")] += 1
    assert result.counts == {split: sum(expected[(split, f"class_{label}")] for label in range(3)) for split in SPLITS}
    assert sum(result.counts.values()) == 60
    assert result.rejected_count == 3
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == ["class_0", "class_1", "class_2"]
    for split in SPLITS:
        assert manifest["splits"][split]["per_class"] == {
            f"class_{label}": expected[(split, f"class_{label}")] for label in range(3)
        }
    names = sorted(path.name for path in shards.glob("*.tfrecord"))
    assert names == [
        "test-00000-of-00001.tfrecord",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
        "validation-00000-of-00001.tfrecord",
    ]
    for split in contracts.SPLITS:
        listed = manifest["splits"][split]["shards"]
        assert sum(shard["records"] for shard in listed) == manifest["splits"][split]["count"]
        for shard in listed:
            assert hashlib.sha256((shards / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    rejected = (shards / "rejected.csv").read_text().splitlines()
    assert rejected[0] == "path,reason"
    assert sorted(line.split(",")[0] for line in rejected[1:]) == [
        "class_0/empty.png",
        "class_1/notes.jpg",
        "class_2/truncated.png",
    ]
    assert not [path for path in workdir.iterdir() if path.name.endswith(".partial")]


def test_records_hold_the_source_pixels_as_rgb_with_their_labels(raw, workdir):
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "shards")
    images = list(records.read_split(workdir / "shards", "test", (8, 8)).as_numpy_iterator())

    assert len(images) == contracts.Manifest.read(workdir / "shards").count("test") > 5
    for image, label in images:
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        assert 0 <= label < 3
    first, first_label = images[0]
    classes = ["class_0", "class_1", "class_2"]
    matches = [
        path
        for path in (raw / classes[first_label]).glob("*.png")
        if path.stat().st_size > 0
        and path.name != "truncated.png"
        and np.array_equal(np.asarray(PIL.Image.open(path).convert("RGB")), first)
    ]
    assert len(matches) == 1, "each record is one source image of its own class, pixel for pixel"


def test_conversion_is_deterministic(raw, workdir):
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "first")
    convert.convert(_dataset(), seed=7, raw_dir=raw, shards_dir=workdir / "second")
    assert _tree_digest(workdir / "first") == _tree_digest(workdir / "second")
    convert.convert(_dataset(), seed=8, raw_dir=raw, shards_dir=workdir / "other")
    assert _tree_digest(workdir / "first") != _tree_digest(workdir / "other")


def test_shards_are_the_same_bytes_whether_or_not_their_layout_was_the_one_expected(raw, workdir, monkeypatch):
    """Decoded images are written as they come into files laid out as the shards are expected to be (their number
    estimated before decoding): each such file is moved into place as its shard when the layout holds, and the shards
    are copied from them when it does not."""
    dataset = _dataset(shard_size_mb=0.001)
    convert.convert(dataset, seed=7, raw_dir=raw, shards_dir=workdir / "first")  # as estimated, right or not
    manifest = contracts.Manifest.read(workdir / "first")
    copied = []
    write_records = shard_writing._write_records
    monkeypatch.setattr(
        shard_writing, "_write_records", lambda shard, *rest: copied.append(shard) or write_records(shard, *rest)
    )
    for name, counts in [
        ("expected", {split: manifest.splits[split].shard_slots for split in SPLITS}),
        ("unexpected", {split: 1 for split in SPLITS}),  # every split has more: no file holds a whole shard
    ]:
        monkeypatch.setattr(
            convert, "_expected_shard_counts", lambda found, stored_sizes, dataset, earlier, counts=counts: counts
        )
        copied.clear()
        convert.convert(dataset, seed=7, raw_dir=raw, shards_dir=workdir / name)
        assert _tree_digest(workdir / name) == _tree_digest(workdir / "first")
        assert [path.name for path in (workdir / name).iterdir() if path.name.startswith(".")] == []
        assert len(copied) == (0 if name == "expected" else len(manifest.shards())), name
    assert min(manifest.splits[split].shard_slots for split in SPLITS) > 1 and len(manifest.shards()) >= 8


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
        convert.convert(_dataset(validation_fraction=0.01), seed=7, raw_dir=tiny, shards_dir=workdir / "shards")
    assert not (workdir / "shards").exists(), "a failed conversion leaves no output that looks complete"


# --- the images people really have ---------------------------------------------------------------

import io
import struct
import unicodedata
import zlib

import tensorflow as tf

from tasks.data import images


def _encode(image, format, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _rotated_jpeg() -> bytes:
    """16 wide, 8 high, left half black; EXIF orientation 6: shown turned 90 degrees clockwise."""
    pixels = np.full((8, 16, 3), 255, dtype=np.uint8)
    pixels[:, :8] = 0
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    return _encode(PIL.Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _decoded(prepared: images.Prepared) -> np.ndarray:
    """The stored image as training decodes it: RGB, whatever channels the stored file has."""
    return tf.io.decode_image(prepared.encoded, channels=3, expand_animations=False).numpy()


def test_every_kind_of_image_becomes_upright_rgb(tmp_path):
    cases = {
        "cmyk.jpg": _encode(PIL.Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        "alpha.png": _encode(PIL.Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "PNG"),
        "gray.png": _encode(PIL.Image.new("L", (8, 8), 77), "PNG"),
        "gray.jpg": _encode(PIL.Image.new("L", (8, 8), 77), "JPEG"),
        "palette.gif": _encode(PIL.Image.new("P", (8, 8), 3), "GIF"),
        "deep.png": _encode(PIL.Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), "PNG"),
        "rotated.jpg": _rotated_jpeg(),
    }
    prepared = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        prepared[name] = images.prepare(str(tmp_path / name), image_size=None)
        assert isinstance(prepared[name], images.Prepared), (name, prepared[name])
        expected_shape = (16, 8, 3) if name == "rotated.jpg" else (8, 8, 3)
        assert _decoded(prepared[name]).shape == expected_shape, name

    for unchanged in ("gray.jpg", "gray.png"):
        assert prepared[unchanged].encoding == "original" and prepared[unchanged].encoded == cases[unchanged]
    assert tuple(_decoded(prepared["gray.png"])[0, 0]) == (77, 77, 77), "one gray channel decodes as three"
    assert PIL.Image.open(io.BytesIO(prepared["deep.png"].encoded)).mode == "L", "16-bit gray stays one channel"
    assert prepared["cmyk.jpg"].encoding == "jpeg" and tuple(_decoded(prepared["cmyk.jpg"])[0, 0]) > (200, 0, 0)
    assert tuple(_decoded(prepared["alpha.png"])[0, 0]) == (255, 255, 255), "transparent pixels are composited on white"
    assert tuple(_decoded(prepared["deep.png"])[0, 0]) == (255, 255, 255), "16-bit white stays white"
    upright = _decoded(prepared["rotated.jpg"])
    assert upright.shape == (16, 8, 3), "EXIF orientation applied: now 8 wide, 16 high"
    assert upright[:4].mean() < 60 and upright[-4:].mean() > 200, "the black left half is now on top"

    resized = images.prepare(str(tmp_path / "rotated.jpg"), image_size=(4, 6))
    assert _decoded(resized).shape == (4, 6, 3) and resized.encoding == "jpeg"


def test_the_perceptual_hash_is_of_the_picture_as_stored(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 255, (160, 200, 3), dtype=np.uint8)
    (tmp_path / "noise.png").write_bytes(_encode(PIL.Image.fromarray(pixels), "PNG"))
    resized = PIL.Image.fromarray(pixels).resize((64, 64), PIL.Image.Resampling.BILINEAR)
    whole = images.difference_hash(PIL.Image.fromarray(pixels))
    assert len(whole) == 16 and images.difference_hash(resized.crop((0, 0, 31, 64))) == "", "none under 32 pixels"
    assert images.difference_hash(resized) != whole, "a picture whose hash changes with resizing"

    assert images.prepare(str(tmp_path / "noise.png"), image_size=(64, 64)).difference_hash == (
        images.difference_hash(resized)
    )
    assert images.prepare(str(tmp_path / "noise.png"), image_size=None).difference_hash == whole


@pytest.fixture
def messy(workdir):
    """What a business folder looks like: odd modes, odd names, broken files, one image under two classes."""
    folder = make_image_folder(workdir / "messy", classes=3, per_class=12)
    nfd_class = unicodedata.normalize("NFD", "Éclair")
    (folder / "class_2").rename(folder / nfd_class)
    photo = _encode(PIL.Image.new("RGB", (32, 24), (10, 200, 30)), "JPEG", quality=90)
    good = {
        "class_0/cmyk.jpg": _encode(PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "class_0/transparent.png": _encode(PIL.Image.new("RGBA", (16, 16), (0, 0, 255, 0)), "PNG"),
        "class_1/gray.jpg": _encode(PIL.Image.new("L", (16, 16), 90), "JPEG"),
        "class_1/rotated.jpg": _rotated_jpeg(),
        "class_1/café.png": _encode(PIL.Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"),
        f"{nfd_class}/日本語の写真.jpg": photo,
        "class_0/same-photo.jpg": photo,
    }
    bad = {
        "class_0/empty.png": (b"", "empty file (0 bytes)"),
        "class_1/notes.jpg": (b"not an image, whatever the extension says", "not an image"),
        f"{nfd_class}/truncated.jpg": (photo[: len(photo) // 2], "truncated or corrupt image data"),
        "class_1/bomb.png": (_png_declaring(100_000, 100_000), "decompression bomb"),
    }
    for name, data in good.items():
        (folder / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    return folder, {name: reason for name, (_, reason) in bad.items()}


def test_a_messy_folder_converts_with_exactly_the_broken_files_rejected(messy, workdir):
    folder, broken = messy
    before = _tree_digest(folder)
    result = convert.convert(_dataset(image_size=(16, 16)), seed=3, raw_dir=folder, shards_dir=workdir / "shards")

    assert _tree_digest(folder) == before, "nothing in the source is moved, changed or deleted"
    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == ["class_0", "class_1", "Éclair"], "class names in NFC, sorted"
    rows = (workdir / "shards" / "rejected.csv").read_text(encoding="utf-8").splitlines()[1:]
    rejected = dict(row.split(",", 1) for row in rows)
    assert sorted(rejected) == sorted(broken)
    for name, reason in broken.items():
        assert rejected[name].strip('"').startswith(reason), (name, rejected[name])
    assert manifest["files_seen"] == 36 + 7 + 4 == manifest["accepted"] + manifest["rejected"]
    assert result.rejected_count == 4 and sum(result.counts.values()) == 43
    conflict = manifest["duplicates"]["label_conflicts"]
    assert [sorted(member["path"] for member in group["files"]) for group in conflict] == [
        sorted(["class_0/same-photo.jpg", f"{unicodedata.normalize('NFD', 'Éclair')}/日本語の写真.jpg"])
    ]
    for split in contracts.SPLITS:
        for image, label in records.read_split(workdir / "shards", split, (16, 16)).as_numpy_iterator():
            assert image.shape == (16, 16, 3) and 0 <= label < 3


def test_the_summary_shows_classes_imbalance_rejections_and_duplicates(messy, workdir):
    folder, _ = messy
    convert.convert(_dataset(), seed=3, raw_dir=folder, shards_dir=workdir / "shards")
    text = convert.summary(contracts.Manifest.read(workdir / "shards"), workdir / "shards")
    assert "Éclair" in text and "imbalance: largest 'class_0' 15, smallest 'Éclair' 13" in text
    assert "1 x empty file (0 bytes)" in text and "1 x decompression bomb" in text
    assert "1 under different classes (label conflict)" in text


def test_split_folders_from_the_source_are_kept(workdir):
    raw = workdir / "raw"
    for split, count in (("train", 10), ("validation", 3), ("test", 4)):
        make_image_folder(raw / split, classes=2, per_class=count, seed=len(split))
    (raw / "layout.json").write_text(
        json.dumps({"source": "test", "archive_sha256": None, "splits": ["test", "train", "validation"]})
    )
    (raw / "train" / "README.txt").write_text("which photographer took what")
    (raw / "extra" / "class_0").mkdir(parents=True)
    (raw / "extra" / "class_0" / "x.png").write_bytes((raw / "test" / "class_1" / "000.png").read_bytes())
    (raw / "test" / ".ipynb_checkpoints").mkdir()
    (raw / "test" / ".ipynb_checkpoints" / "y.png").write_bytes(b"checkpoint")
    shared = (raw / "train" / "class_0" / "000.png").read_bytes()
    (raw / "test" / "class_0" / "leaked.png").write_bytes(shared)

    result = convert.convert(_dataset(), seed=3, raw_dir=raw, shards_dir=workdir / "shards")

    assert result.counts == {"train": 20, "validation": 6, "test": 9}
    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    assert manifest["source_splits"] == ["test", "train", "validation"]
    assert [group["files"][0]["path"] for group in manifest["duplicates"]["leakage"]] == ["test/class_0/leaked.png"]
    assert (workdir / "shards" / "rejected.csv").read_text().splitlines()[1:] == [
        'extra/class_0/x.png,"not inside a split folder (train/, validation/, test/): belongs to no class"',
        "test/.ipynb_checkpoints/y.png,"
        "\"in hidden folder '.ipynb_checkpoints', not a class folder: belongs to no class\"",
        "train/README.txt,not inside a class folder: belongs to no class",
    ]


def test_jpeg_records_are_read_by_the_train_stage_reader(workdir):
    raw = workdir / "raw"
    for label in range(2):
        (raw / f"c{label}").mkdir(parents=True)
        for index in range(30):
            PIL.Image.new("RGB", (20, 10), (200 * label, 50, 8 * index)).save(
                raw / f"c{label}" / f"{index}.jpg", quality=95
            )
    convert.convert(_dataset(), seed=1, raw_dir=raw, shards_dir=workdir / "shards")
    dataset = records.read_split(workdir / "shards", "train", (10, 20))
    assert dataset.element_spec[0].shape == (10, 20, 3) and dataset.element_spec[0].dtype == tf.uint8
    for image, label in dataset.as_numpy_iterator():
        assert abs(int(image[5, 10, 0]) - 200 * int(label)) <= 3, "JPEG records decode to their colour, per label"


def test_records_are_the_same_bytes_in_every_process():
    """A record's features are a protobuf map: without deterministic serialization their order follows
    the process's string hash seed, and `dvc repro` in a new process would write other shard bytes."""
    import os
    import subprocess
    import sys

    code = "from tasks.data import tfrecords; print(tfrecords.serialize(b'image', 1, 'class_1/a.png').hex())"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONPATH": str(REPOSITORY), "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for seed in ("0", "1")  # two seeds that order the three features differently
    ]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert outputs[0] and outputs[0] == outputs[1]


def test_shards_store_each_image_in_its_smallest_lossless_form(workdir):
    """Unchanged gray and RGB PNGs and JPEGs keep their own bytes; a resized gray image stays one channel;
    every record decodes (as training decodes it) to the RGB pixels of its source."""
    raw, random = workdir / "raw", np.random.default_rng(3)
    sources = {}
    for label, (mode, extension) in enumerate([("L", ".png"), ("RGB", ".png"), ("L", ".jpg"), ("RGB", ".jpg")]):
        (raw / f"c{label}").mkdir(parents=True)
        for index in range(12):
            shape = (48, 64) if mode == "L" else (48, 64, 3)
            pixels = np.clip(random.normal(90 + 20 * label, 30, shape), 0, 255).astype(np.uint8)
            path = raw / f"c{label}" / f"{index}{extension}"
            PIL.Image.fromarray(pixels, mode=mode).save(path, quality=90)
            sources[path.relative_to(raw).as_posix()] = np.asarray(PIL.Image.open(path).convert("RGB"))
    convert.convert(_dataset(), seed=2, raw_dir=raw, shards_dir=workdir / "shards")

    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    assert manifest["encodings"] == {"original": 48}
    shard_bytes = sum(path.stat().st_size for path in (workdir / "shards").glob("*.tfrecord"))
    source_bytes = sum(path.stat().st_size for path in raw.rglob("*.*"))
    assert shard_bytes <= 1.1 * source_bytes, (shard_bytes, source_bytes)
    for split in SPLITS:
        for image, _, source in records.read_split(workdir / "shards", split, (48, 64), with_source=True):
            name = source.numpy().decode()
            # PNGs exactly; JPEGs as close as two JPEG decoders (TensorFlow's and Pillow's) come.
            tolerance = 0 if name.endswith(".png") else 4
            assert np.abs(image.numpy().astype(int) - sources[name]).max() <= tolerance, name

    gray = raw / "c0" / "0.png"
    resized = images.prepare(str(gray), image_size=(24, 32))
    assert resized.encoding == "png" and PIL.Image.open(io.BytesIO(resized.encoded)).mode == "L"
    expected = np.asarray(PIL.Image.open(gray).convert("RGB").resize((32, 24), PIL.Image.Resampling.BILINEAR))
    assert np.array_equal(tf.io.decode_image(resized.encoded, channels=3).numpy(), expected)


def test_the_index_is_what_the_csv_module_writes_whatever_the_names(tmp_path):
    plain = [
        contracts.IndexEntry(f"cat/{i:05d}.jpg", "cat", "train", "ab" * 32, "0f" * 8, "original") for i in range(5000)
    ]
    odd_names = ["dog/a,b.jpg", 'dog/say "cheese".png', "dog/two\nlines.jpg", "dog/caf\udce9.jpg", ""]
    odd = [contracts.IndexEntry(name, "dog", "test", "cd" * 32, "", "png") for name in odd_names]
    entries = plain[:4500] + odd + plain[4500:]  # one chunk of plain rows, then one holding the odd ones
    contracts.write_index(tmp_path, entries)
    expected = io.StringIO(newline="")
    csv.writer(expected, lineterminator="\n").writerows([contracts._INDEX_COLUMNS, *map(_row, entries)])
    written = (tmp_path / contracts.INDEX_FILE).read_bytes()
    assert written == expected.getvalue().encode("utf-8", "surrogateescape")
    assert contracts.read_index(tmp_path) == entries


def test_a_carriage_return_in_a_file_name_survives_the_index_and_the_listing(tmp_path):
    entries = [contracts.IndexEntry(f"cat/{i}\r.jpg", "cat", "train", "ab" * 32, "0f" * 8, "jpeg") for i in range(3)]
    contracts.write_index(tmp_path, entries)
    assert contracts.read_index(tmp_path) == entries
    raw = tmp_path / "raw"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "a\r.jpg").write_bytes(b"one")
    (raw / "cat" / "b.jpg").write_bytes(b"two")
    assert listing.write(raw, tmp_path / "digests.sqlite") == 2
    assert listing.read(listing.path_for(raw)) == {
        "cat/a\r.jpg": hashlib.sha256(b"one").hexdigest(),
        "cat/b.jpg": hashlib.sha256(b"two").hexdigest(),
    }


def _row(entry: contracts.IndexEntry) -> tuple[str, ...]:
    return tuple(getattr(entry, column) for column in contracts._INDEX_COLUMNS)
