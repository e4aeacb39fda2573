import csv
import hashlib
import io
import json
import os
import tarfile
import zipfile

import PIL.Image
import pytest

from tasks import convert, download
from tasks.common import config, errors
from tasks.data import fetch
from tests import archives
from tests.conftest import REPOSITORY


def test_digits_are_written_as_an_image_folder(workdir):
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    result = download.download(dataset, workdir / "raw" / "digits", workdir / "downloads")

    assert result.file_count == 1797
    assert result.class_names == tuple(str(digit) for digit in range(10))
    folders = sorted(path.name for path in (workdir / "raw" / "digits").iterdir() if path.is_dir())
    assert folders == list(result.class_names)
    assert result.splits == ()
    images = sorted((workdir / "raw" / "digits").rglob("*.png"))
    assert len(images) == 1797
    with PIL.Image.open(images[0]) as image:
        assert image.size == (8, 8)
        assert image.mode == "L"
        assert image.getextrema()[1] > 200  # 0..16 stretched to 0..255


def test_a_second_download_replaces_the_first_and_leaves_nothing_partial(workdir):
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    target = workdir / "raw" / "digits"
    download.download(dataset, target, workdir / "downloads")
    (target / "0" / "stray.png").write_bytes(b"left over")
    download.download(dataset, target, workdir / "downloads")

    assert not (target / "0" / "stray.png").exists()
    assert sorted(path.name for path in (workdir / "raw").iterdir()) == ["digits", "digits.files.csv"]
    assert len(list(target.rglob("*.png"))) == 1797


def test_the_listing_dvc_tracks_names_every_file_and_convert_refuses_a_folder_that_differs(workdir):
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    raw, listed = workdir / "raw" / "digits", workdir / "raw" / "digits.files.csv"
    download.download(dataset, raw, workdir / "downloads")
    first = listed.read_bytes()
    rows = list(csv.reader(io.StringIO(first.decode())))

    assert rows[0] == ["path", "size", "sha256"]
    on_disk = sorted(path.relative_to(raw).as_posix() for path in raw.rglob("*") if path.is_file())
    assert sorted(row[0] for row in rows[1:]) == on_disk and len(on_disk) == 1797 + 1  # the images and layout.json
    for path, size, sha256 in rows[1::300]:
        content = (raw / path).read_bytes()
        assert (int(size), sha256) == (len(content), hashlib.sha256(content).hexdigest())
    download.download(dataset, raw, workdir / "downloads")  # new files, new inodes: hashed again
    assert listed.read_bytes() == first, "the same images give the same listing: DVC sees no change"

    pictures = [row[0] for row in rows[1:] if row[0].endswith(".png")]
    changed = raw / pictures[0]
    changed.write_bytes((raw / pictures[1]).read_bytes())
    with pytest.raises(errors.BadInput) as stopped:
        convert.convert(dataset, 42, raw, workdir / "shards", listing_file=listed)
    assert str(stopped.value) == (
        f"1 files of the raw folder differ from download's listing {listed} (added, removed or changed since, "
        f"e.g. {pictures[0]}); the raw folder is download's output: change the images in dataset.source, then "
        "rerun download (`dvc repro -f download`)"
    )
    assert not (workdir / "shards").exists()
    changed.unlink()
    with pytest.raises(errors.BadInput, match=f"1 files of the raw folder differ .* e.g. {pictures[0]}\\)"):
        convert.convert(dataset, 42, raw, workdir / "shards", listing_file=listed)


# --- real sources, over HTTP from a local server --------------------------------------------------


def _dataset(**changes) -> config.DatasetParams:
    return config.load_params(REPOSITORY / "params.yaml").dataset.model_copy(update=changes)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cifar10_keeps_its_test_split_and_reads_channel_planar_records(http_server, workdir):
    archive = archives.cifar10_binary(train_per_class_per_batch=2, test_per_class=3)
    url = http_server.serve("/mirror/cifar-10-binary.tar.gz", archive)
    dataset = _dataset(name="cifar10", source=url, sha256=_sha256(archive))
    result = download.download(dataset, workdir / "raw" / "cifar10", workdir / "downloads")

    raw = workdir / "raw" / "cifar10"
    assert result.splits == ("train", "test")
    assert result.class_names == tuple(sorted(archives.CIFAR_CLASSES))
    assert result.file_count == 10 * 2 * 5 + 10 * 3
    assert len(list((raw / "test" / "cat").glob("*.png"))) == 3
    with PIL.Image.open(raw / "train" / "deer" / "data_batch_1-00004.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert image.getpixel((31, 31)) == archives.cifar_pixel(4, 4), "planes -> interleaved RGB"
    assert json.loads((raw / "layout.json").read_text())["splits"] == ["train", "test"]
    kept = workdir / "downloads" / fetch.cached_name(url)
    assert kept.read_bytes() == archive and not list((workdir / "downloads").glob("*.partial"))

    again = download.download(dataset, raw, workdir / "downloads")
    assert again == result
    assert len(http_server.gets("/mirror/cifar-10-binary.tar.gz")) == 1, (
        "a present, valid archive is not downloaded again"
    )

    converted = convert.convert(dataset, seed=1, raw_dir=raw, shards_dir=workdir / "shards")
    assert converted.counts["test"] == 30, "the official test split is kept whole"
    assert converted.counts == {"train": 90, "validation": 10, "test": 30}, "validation: 10% of train, per class"


def test_flowers_archive_gives_five_classes_and_keeps_its_license(http_server, workdir):
    archive = archives.flower_photos(per_class=10)
    url = http_server.serve("/flower_photos.tgz", archive)
    dataset = _dataset(name="flowers", source=url, sha256=_sha256(archive))
    result = download.download(dataset, workdir / "raw" / "flowers", workdir / "downloads")

    assert result.class_names == tuple(archives.FLOWER_CLASSES) and result.splits == ()
    assert (workdir / "raw" / "flowers" / "LICENSE.txt").is_file(), "the attribution list travels with the photos"
    converted = convert.convert(dataset, seed=1, raw_dir=workdir / "raw" / "flowers", shards_dir=workdir / "shards")
    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == archives.FLOWER_CLASSES
    assert sum(converted.counts.values()) == 50 and min(converted.counts.values()) > 0
    assert manifest["encodings"] == {"original": 50}, "unchanged JPEGs are stored as they came"
    assert (workdir / "shards" / "rejected.csv").read_text().splitlines()[1:] == [
        "LICENSE.txt,not inside a class folder: belongs to no class"
    ]


def test_an_interrupted_download_resumes_with_a_range_request(http_server, workdir):
    archive = archives.flower_photos(per_class=4)
    url = http_server.serve("/flower_photos.tgz", archive)
    destination = workdir / "downloads" / "flowers.tgz"
    destination.parent.mkdir()
    # What a killed run leaves behind: the first part, under the name that never looks complete.
    (workdir / "downloads" / "flowers.tgz.partial").write_bytes(archive[:1000])

    fetch.download(url, destination, _sha256(archive))

    assert destination.read_bytes() == archive
    assert http_server.gets("/flower_photos.tgz")[0]["Range"] == "bytes=1000-"
    assert not list((workdir / "downloads").glob("*.partial"))


def test_a_connection_dropped_mid_transfer_is_retried_from_where_it_stopped(http_server, workdir):
    archive = archives.flower_photos(per_class=4)
    url = http_server.serve("/flower_photos.tgz", archive, cut_first_after=len(archive) // 3)
    destination = fetch.download(url, workdir / "downloads" / "flowers.tgz", _sha256(archive))

    assert destination.read_bytes() == archive
    first, second = http_server.gets("/flower_photos.tgz")
    assert "Range" not in first and second["Range"] == f"bytes={len(archive) // 3}-"


def test_a_server_that_fails_twice_then_answers_is_retried(http_server, workdir):
    archive = archives.flower_photos(per_class=4)
    url = http_server.serve("/flower_photos.tgz", archive, fail_first=2)
    destination = fetch.download(url, workdir / "downloads" / "flowers.tgz", _sha256(archive))

    assert destination.read_bytes() == archive
    assert len(http_server.gets("/flower_photos.tgz")) == 3


def test_a_server_that_keeps_failing_is_named(http_server, workdir):
    url = http_server.serve("/down.tgz", b"never sent", fail_first=100)
    with pytest.raises(fetch.DownloadError, match=f"{url}: gave up after 5 attempts: HTTP 503"):
        fetch.download(url, workdir / "downloads" / "down.tgz", None)
    with pytest.raises(fetch.DownloadError, match="missing.tgz: HTTP 404"):
        fetch.download(http_server.url + "/missing.tgz", workdir / "downloads" / "missing.tgz", None)
    assert len(http_server.gets("/missing.tgz")) == 1, "a 404 is not retried"


def test_a_checksum_mismatch_names_url_and_both_digests_and_keeps_nothing(http_server, workdir):
    archive = archives.flower_photos(per_class=4)
    url = http_server.serve("/flower_photos.tgz", archive)
    expected = "0" * 64
    dataset = _dataset(name="flowers", source=url, sha256=expected)
    with pytest.raises(ValueError) as error:
        download.download(dataset, workdir / "raw" / "flowers", workdir / "downloads")
    assert url in str(error.value) and expected in str(error.value) and _sha256(archive) in str(error.value)
    assert not list((workdir / "downloads").glob("*.tgz*")), "neither a complete-looking nor a partial file is left"
    assert not (workdir / "raw").exists() or not list((workdir / "raw").iterdir())


def test_an_unpinned_url_is_revalidated_not_downloaded_again(http_server, workdir):
    archive = archives.zip_of(
        {"pets/cats/a.jpg": archives.jpeg((200, 0, 0)), "pets/dogs/b.jpg": archives.jpeg((0, 0, 200))}
    )
    url = http_server.serve("/pets.zip", archive)
    dataset = _dataset(name="imagefolder", source=url)
    download.download(dataset, workdir / "raw" / "imagefolder", workdir / "downloads")
    download.download(dataset, workdir / "raw" / "imagefolder", workdir / "downloads")

    first, second = http_server.gets("/pets.zip")
    assert "If-None-Match" in second, "the second run asks whether the file changed; the server says 304"
    assert sorted(path.name for path in (workdir / "raw" / "imagefolder").iterdir()) == ["cats", "dogs", "layout.json"]


@pytest.mark.parametrize(
    ("member", "refusal"),
    [
        (tarfile.TarInfo("../escape.jpg"), "'../escape.jpg': '..' component"),
        (tarfile.TarInfo("/etc/escape.jpg"), "'/etc/escape.jpg': absolute path"),
        (
            dict(name="pets/link", type=tarfile.SYMTYPE, linkname="../../../etc/passwd"),
            "'pets/link': LinkOutsideDestinationError",
        ),
        (dict(name="pets/device", type=tarfile.CHRTYPE), "'pets/device': SpecialFileError"),
    ],
)
def test_a_hostile_tar_member_is_refused_by_name_and_nothing_is_extracted(http_server, workdir, member, refusal):
    if isinstance(member, dict):
        info = tarfile.TarInfo(member.pop("name"))
        for key, value in member.items():
            setattr(info, key, value)
        member = info
    archive = archives.tar_with(member, b"payload")
    url = http_server.serve("/hostile.tgz", archive)
    with pytest.raises(ValueError, match=f"refused to extract member {refusal}"):
        download.download(
            _dataset(name="imagefolder", source=url), workdir / "raw" / "imagefolder", workdir / "downloads"
        )
    assert not (workdir / "raw" / "imagefolder").exists()
    assert not (workdir / "escape.jpg").exists() and not (workdir.parent / "escape.jpg").exists()


def test_a_hostile_zip_member_is_refused_by_name(workdir):
    archive = workdir / "hostile.zip"
    archive.write_bytes(archives.zip_of({"pets/cats/a.jpg": archives.jpeg((1, 1, 1)), "../../escape.jpg": b"x"}))
    with pytest.raises(ValueError, match="refused to extract member '../../escape.jpg': '..' component"):
        download.download(
            _dataset(name="imagefolder", source=str(archive)), workdir / "raw" / "imagefolder", workdir / "downloads"
        )
    assert not (workdir / "raw" / "imagefolder").exists()


def _snapshot(folder):
    return {
        path: (
            path.stat().st_mtime_ns,
            path.stat().st_mode,
            path.stat().st_nlink if path.is_dir() else path.read_bytes(),
        )
        for path in [folder, *folder.rglob("*")]
    }


def test_a_local_folder_is_linked_not_changed_and_its_split_folders_are_kept(workdir):
    source = workdir / "photos"
    for split in ("train", "val", "test"):
        for name in ("cats", "dogs"):
            (source / split / name).mkdir(parents=True)
            (source / split / name / f"{split}.jpg").write_bytes(archives.jpeg((len(split), len(name), 9)))
    before = _snapshot(source)

    result = download.download(
        _dataset(name="imagefolder", source=str(source)), workdir / "raw" / "imagefolder", workdir / "downloads"
    )

    raw = workdir / "raw" / "imagefolder"
    assert result.splits == ("test", "train", "validation"), "val/ is read as validation/"
    assert (raw / "validation" / "cats" / "val.jpg").read_bytes() == (source / "val" / "cats" / "val.jpg").read_bytes()
    assert (
        os.stat(raw / "train" / "dogs" / "train.jpg").st_ino == os.stat(source / "train" / "dogs" / "train.jpg").st_ino
    ), "hard-linked"
    download.download(
        _dataset(name="imagefolder", source=str(source)), raw, workdir / "downloads"
    )  # replaces the raw folder
    assert _snapshot(source) == before, "not a byte, time stamp or permission of the source changed"

    with pytest.raises(ValueError, match="overlap"):
        download.download(_dataset(name="imagefolder", source=str(raw)), raw, workdir / "downloads")
    with pytest.raises(ValueError, match="is a folder; set dataset.sha256 to null"):
        download.download(_dataset(name="imagefolder", source=str(source), sha256="a" * 64), raw, workdir / "downloads")
    with pytest.raises(FileNotFoundError, match="dataset.source 'nowhere' does not exist"):
        download.download(_dataset(name="imagefolder", source="nowhere"), raw, workdir / "downloads")


def test_a_local_zip_with_a_wrapping_folder_and_mac_noise(workdir):
    archive = workdir / "pets.zip"
    archive.write_bytes(
        archives.zip_of(
            {
                "pets/cats/a.jpg": archives.jpeg((200, 0, 0)),
                "pets/dogs/b.jpg": archives.jpeg((0, 0, 200)),
                "__MACOSX/pets/cats/._a.jpg": b"resource fork",
            }
        )
    )
    result = download.download(
        _dataset(name="imagefolder", source=str(archive), sha256=_sha256(archive.read_bytes())),
        workdir / "raw" / "imagefolder",
        workdir / "downloads",
    )
    assert result.class_names == ("cats", "dogs") and result.file_count == 2
    assert zipfile.is_zipfile(archive), "the user's archive is only read"
