"""A folder that grows: stable splits, incremental conversion, the data-change report and its guard."""

import contextlib
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import sqlite3

import numpy as np
import PIL.Image
import pytest

from tasks import convert
from tasks.common import config, contracts, errors
from tasks.data import changes, images, listing, reuse, splits, tfrecords
from tests.conftest import REPOSITORY, make_image_folder


def _dataset(**changes) -> config.DatasetParams:
    return config.load_params(REPOSITORY / "params.yaml").dataset.model_copy(update=changes)


def _splits_of(shards_dir) -> dict[str, str]:
    return {entry.path: entry.split for entry in contracts.read_index(shards_dir)}


def _add_images(folder, class_name, names, seed):
    random = np.random.default_rng(seed)
    (folder / class_name).mkdir(exist_ok=True)
    for name in names:
        pixels = random.integers(0, 255, (8, 8), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / class_name / name)


def _convert(raw, workdir, shards="shards", **changes):
    return convert.convert(
        _dataset(**changes), seed=3, raw_dir=raw, shards_dir=workdir / shards, report_dir=workdir / "report"
    )


def _tree(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_adding_removing_renaming_files_moves_no_other_image(workdir):
    raw = make_image_folder(workdir / "raw", classes=3, per_class=30)
    _convert(raw, workdir)
    before = _splits_of(workdir / "shards")

    _add_images(raw, "class_1", [f"new_{index}.png" for index in range(15)], seed=1)
    (raw / "class_0" / "000.png").unlink()
    (raw / "class_2" / "001.png").rename(raw / "class_2" / "renamed.png")
    result = _convert(raw, workdir)
    after = _splits_of(workdir / "shards")

    kept = set(before) - {"class_0/000.png", "class_2/001.png"}
    assert {path: after[path] for path in kept} == {path: before[path] for path in kept}
    assert result.decoded == 15, "only the new files: the renamed one's bytes are known"


def test_incremental_conversion_decodes_only_new_files_and_matches_a_full_one(workdir):
    raw = make_image_folder(workdir / "raw", classes=3, per_class=30)
    first = _convert(raw, workdir)
    assert first.decoded == 90

    _add_images(raw, "class_0", ["a.png", "b.png"], seed=2)
    _add_images(raw, "class_2", ["c.png"], seed=3)
    (raw / "class_1" / "002.png").unlink()
    changed = raw / "class_1" / "003.png"
    changed.write_bytes((raw / "class_1" / "004.png").read_bytes())  # other bytes, same name
    incremental = _convert(raw, workdir)
    full = _convert(raw, workdir, shards="full")

    assert incremental.decoded == 3, "the renamed-bytes file is known by its content: only the 3 new ones decode"
    assert full.decoded == 92
    assert _tree(workdir / "shards") == _tree(workdir / "full"), "byte-identical to converting from nothing"
    report = json.loads((workdir / "report" / "changes.json").read_text())  # the full conversion's: no baseline
    values = incremental.report.values
    assert values["baseline"]["kind"] == "previous"
    assert values["classes"]["class_0"]["added"] == ["class_0/a.png", "class_0/b.png"]
    assert values["classes"]["class_2"]["added"] == ["class_2/c.png"]
    assert values["classes"]["class_1"]["removed"] == ["class_1/002.png"]
    assert values["classes"]["class_1"]["changed"] == ["class_1/003.png"]
    assert values["conversion"] == {"decoded": 3, "reused": 89, "rejected": 0}
    assert report["baseline"]["kind"] == "none"
    assert "| class_0 | 30 | 32 | 2 | 0 | 0 |" in incremental.report.markdown()
    assert "Compared with nothing: a first conversion" in (workdir / "report" / "changes.md").read_text()


def test_an_added_image_rewrites_only_the_shard_it_lands_in(workdir):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=40)
    _convert(raw, workdir, shard_size_mb=0.001)
    before = {path.name: path.stat().st_ino for path in (workdir / "shards").glob("*.tfrecord")}
    _add_images(raw, "class_0", ["new.png"], seed=5)

    _convert(raw, workdir, shard_size_mb=0.001)
    after = {path.name: path.stat().st_ino for path in (workdir / "shards").glob("*.tfrecord")}
    split = _splits_of(workdir / "shards")["class_0/new.png"]
    rewritten = [name for name, inode in after.items() if before.get(name) != inode]
    assert len(after) >= 8, "several shards"
    assert len(rewritten) == 1 and rewritten[0].startswith(f"{split}-"), "the other shards are the same files"
    _convert(raw, workdir, shards="full", shard_size_mb=0.001)
    assert _tree(workdir / "shards") == _tree(workdir / "full")


def _shards_read(monkeypatch) -> list[str]:
    """The previous shards the next conversions read, by file name."""
    read = []
    original = reuse._read_hashed
    monkeypatch.setattr(reuse, "_read_hashed", lambda path, known: read.append(path.name) or original(path, known))
    return read


def test_a_nightly_run_reads_only_the_shards_that_change(workdir, monkeypatch):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=40)
    digests_file = workdir / "digests.sqlite"
    convert.convert(_dataset(shard_size_mb=0.001), 3, raw, workdir / "shards", digests_file=digests_file)
    shards = sorted(path.name for path in (workdir / "shards").glob("*.tfrecord"))
    assert len(shards) >= 8, "several shards"
    _add_images(raw, "class_0", ["new.png"], seed=5)
    touched = workdir / "shards" / shards[0]  # a shard whose time changed: the record no longer vouches for it
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    read = _shards_read(monkeypatch)

    result = convert.convert(_dataset(shard_size_mb=0.001), 3, raw, workdir / "shards", digests_file=digests_file)
    manifest = contracts.Manifest.read(workdir / "shards")
    split = _splits_of(workdir / "shards")["class_0/new.png"]
    slots = manifest.splits[split].shard_slots
    place = splits.position(3, "class_0", "new.png")
    landed = tfrecords.shard_name(split, splits.shard_of(place, slots), slots)
    assert result.decoded == 1
    assert set(read) <= {touched.name, landed} and touched.name in read, "the others were trusted, not read"
    read.clear()
    _convert(raw, workdir, shards="full", shard_size_mb=0.001)
    assert _tree(workdir / "shards") == _tree(workdir / "full")
    convert.convert(_dataset(shard_size_mb=0.001), 3, raw, workdir / "shards", digests_file=digests_file)
    assert read == [], "nothing changed: no shard is read"


def test_a_nightly_run_writes_the_same_shards_where_the_kernel_cannot_copy_records(workdir, monkeypatch):
    """A changed shard's kept records are copied by os.copy_file_range where there is one (the test above), else
    read and written by the stage: the same bytes either way."""
    raw = make_image_folder(workdir / "raw", classes=2, per_class=40)
    digests_file = workdir / "digests.sqlite"
    convert.convert(_dataset(shard_size_mb=0.001), 3, raw, workdir / "shards", digests_file=digests_file)
    _add_images(raw, "class_0", ["new.png", "newer.png"], seed=5)
    monkeypatch.delattr(os, "copy_file_range", raising=False)

    result = convert.convert(_dataset(shard_size_mb=0.001), 3, raw, workdir / "shards", digests_file=digests_file)
    assert result.decoded == 2
    _convert(raw, workdir, shards="full", shard_size_mb=0.001)
    assert _tree(workdir / "shards") == _tree(workdir / "full")


def test_a_split_that_gets_more_shards_reads_every_shard_again(workdir, monkeypatch):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=14)
    digests_file = workdir / "digests.sqlite"
    dataset = _dataset(shard_size_mb=0.0001)  # a shard an image or so: the train split's count is capped by its size
    convert.convert(dataset, 3, raw, workdir / "shards", digests_file=digests_file)
    before = contracts.Manifest.read(workdir / "shards").splits["train"]
    carved = {"test": dataset.test_fraction, "validation": dataset.validation_fraction}
    names = (f"late-{index}.png" for index in itertools.count())
    in_train = (name for name in names if splits.split_of(splits.position(3, "class_0", name), None, carved) == "train")
    added = before.shard_slots * 2 - before.count  # the train split reaches twice its number of shards
    _add_images(raw, "class_0", list(itertools.islice(in_train, added)), seed=6)
    read = _shards_read(monkeypatch)

    convert.convert(dataset, 3, raw, workdir / "shards", digests_file=digests_file)
    after = contracts.Manifest.read(workdir / "shards").splits["train"]
    assert after.shard_slots == 2 * before.shard_slots
    assert {shard.file for shard in before.shards} <= set(read), "every previous train shard was read"
    convert.convert(dataset, 3, raw, workdir / "full")
    assert _tree(workdir / "shards") == _tree(workdir / "full")


def test_a_corrupted_previous_shard_is_not_reused(workdir, capsys):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=30)
    _convert(raw, workdir, shard_size_mb=0.002)  # several shards
    manifest = contracts.Manifest.read(workdir / "shards")
    damaged = manifest.splits["train"].shards[1]
    shard = workdir / "shards" / damaged.file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    result = _convert(raw, workdir, shard_size_mb=0.002)
    assert result.decoded == damaged.records, "only the damaged shard's images are decoded again"
    assert f"decoding the images of {shard} again" in capsys.readouterr().out
    _convert(raw, workdir, shards="full", shard_size_mb=0.002)
    assert _tree(workdir / "shards") == _tree(workdir / "full")


def test_shards_with_hashes_of_another_definition_are_converted_again(workdir, capsys):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=20, size=40)
    _convert(raw, workdir, image_size=(36, 36))
    manifest_file = workdir / "shards" / contracts.MANIFEST_FILE
    written = json.loads(manifest_file.read_text())
    assert written["difference_hash_version"] == images.DIFFERENCE_HASH_VERSION
    del written["difference_hash_version"]  # as the release before the version was recorded wrote it
    manifest_file.write_text(json.dumps(written))

    result = _convert(raw, workdir, image_size=(36, 36))
    assert result.decoded == 40, "no hash of the older definition is kept"
    assert "perceptual hashes are of version 1" in capsys.readouterr().out
    assert _convert(raw, workdir, image_size=(36, 36)).decoded == 0, "the shards just written are reused"


def test_a_new_image_size_converts_every_image_again_even_from_shards_the_record_vouches_for(workdir):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=20, size=40)

    def run(shards, **changes):
        digests_file = workdir / f"{shards}-digests.sqlite"
        return convert.convert(
            _dataset(**changes), seed=3, raw_dir=raw, shards_dir=workdir / shards, digests_file=digests_file
        )

    run("shards")
    assert run("shards", image_size=(36, 36)).decoded == 40, "no record of the images at their own size is kept"
    assert run("full", image_size=(36, 36)).decoded == 40
    assert _tree(workdir / "shards") == _tree(workdir / "full")
    assert run("shards", image_size=(36, 36)).decoded == 0, "the shards just written are reused"


def test_changing_a_fraction_moves_only_the_images_between_the_boundaries(workdir):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=40)
    _convert(raw, workdir)
    before = _splits_of(workdir / "shards")
    result = _convert(raw, workdir, test_fraction=0.3)
    after = _splits_of(workdir / "shards")

    moved = {path for path in before if before[path] != after[path]}
    assert moved and all(after[path] in ("test", "validation") for path in moved)
    assert all(before[path] in ("validation", "train") for path in moved)
    assert result.report.values["moved_between_splits"]["count"] == len(moved)
    into_test = sum(before[path] == "train" and after[path] == "test" for path in moved)  # 0: train moves up one
    assert f"; {len(moved)} moved between splits (a fraction or dataset.split_seed changed), {into_test} of them" in (
        changes.summary_line(result.report)
    )
    assert result.decoded == 0


def test_the_split_rule_depends_on_the_image_alone():
    fractions = {"test": 0.2, "validation": 0.1}
    places = [splits.position(5, "cat", f"{index}.jpg") for index in range(20000)]
    shares = np.histogram(places, bins=[0, 0.2, 0.3, 1])[0] / len(places)
    np.testing.assert_allclose(shares, [0.2, 0.1, 0.7], atol=0.01)
    assert splits.position(5, "cat", "x.jpg") != splits.position(5, "dog", "x.jpg")
    assert splits.position(5, "cat", "x.jpg") != splits.position(6, "cat", "x.jpg")
    assert splits.split_of(0.05, "test", fractions) == "test", "a split folder the source brings is kept"
    assert splits.split_of(0.05, "train", {"validation": 0.1}) == "validation"
    assert [splits.split_of(place, None, fractions) for place in (0.1, 0.25, 0.9)] == ["test", "validation", "train"]


def test_the_guard_stops_on_a_vanished_or_emptied_class_and_keeps_the_shards(workdir):
    raw = make_image_folder(workdir / "raw", classes=3, per_class=30)
    _convert(raw, workdir)
    shards_before = _tree(workdir / "shards")
    for path in sorted((raw / "class_1").iterdir())[:20]:
        path.unlink()
    shutil.rmtree(raw / "class_2")
    _add_images(raw, "class_3", [f"{index}.png" for index in range(30)], seed=4)

    with pytest.raises(errors.BadInput) as stopped:
        _convert(raw, workdir)
    message = str(stopped.value)
    assert "class 'class_2' vanished" in message
    assert "class 'class_1' lost 20 of its 30 images (67%, more than dataset.max_class_drop 50%)" in message
    assert "dataset.accept_data_changes: true" in message and "changes.md" in message
    assert _tree(workdir / "shards") == shards_before, "the shards the champion was trained on stay"
    report = (workdir / "report" / "changes.md").read_text()
    assert "**stopped the run**" in report and "New classes: class_3" in report

    let_through = _convert(raw, workdir, accept_data_changes=True)
    assert let_through.counts["train"] > 0
    assert contracts.Manifest.read(workdir / "shards").classes == ["class_0", "class_1", "class_3"]


def test_near_duplicates_across_splits_and_classes_are_reported(workdir):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=30)
    random = np.random.default_rng(9)
    photo = PIL.Image.fromarray(random.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((256, 256))
    photo.save(raw / "class_0" / "photo.png")
    photo.resize((200, 200)).save(raw / "class_1" / "photo_small.jpg", quality=80)  # other bytes, same picture
    values = _convert(raw, workdir).report.values

    conflicts = values["near_duplicates"]["across_classes"]
    assert [[member["path"] for member in group] for group in conflicts] == [
        ["class_0/photo.png", "class_1/photo_small.jpg"]
    ]
    assert values["identical"]["across_classes"] == []


def test_a_new_class_that_shifts_every_label_still_gives_the_full_conversion_bytes(workdir):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=30)
    _convert(raw, workdir)
    _add_images(raw, "a_first_class", [f"{index}.png" for index in range(30)], seed=6)  # sorts first: labels move
    incremental = _convert(raw, workdir)
    full = _convert(raw, workdir, shards="full")

    assert incremental.decoded == 30 and full.decoded == 90
    assert _tree(workdir / "shards") == _tree(workdir / "full")
    assert incremental.report.values["new_classes"] == ["a_first_class"]


def test_unchanged_files_are_not_even_read_again(workdir, monkeypatch):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=30)
    digests_file = workdir / "checkpoints" / "digests.csv"
    convert.convert(_dataset(), 3, raw, workdir / "shards", digests_file=digests_file)
    _add_images(raw, "class_0", ["late.png"], seed=8)
    (raw / "class_1" / "005.png").write_bytes((raw / "class_1" / "006.png").read_bytes())  # new bytes, new time
    hashed = []
    original = listing.file_sha256
    monkeypatch.setattr(listing, "file_sha256", lambda path: hashed.append(path) or original(path))

    result = convert.convert(_dataset(), 3, raw, workdir / "shards", digests_file=digests_file)
    assert sorted(pathlib.Path(path).name for path in hashed) == ["005.png", "late.png"]
    assert result.decoded == 1, "005.png now holds 006.png's bytes, which the shards have"
    convert.convert(_dataset(), 3, raw, workdir / "full")
    assert _tree(workdir / "shards") == _tree(workdir / "full")


def test_the_record_of_digests_holds_exactly_the_files_there_are(workdir, monkeypatch):
    raw = make_image_folder(workdir / "raw", classes=2, per_class=20)
    digests_file = workdir / "checkpoints" / "digests.sqlite"

    def recorded() -> dict[str, str]:
        with contextlib.closing(sqlite3.connect(digests_file)) as connection:
            rows = connection.execute("SELECT source, sha256 FROM digests").fetchall()
        return {source.decode(): sha256 for source, sha256 in rows}

    def on_disk() -> dict[str, str]:
        return {
            path.relative_to(raw).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in raw.rglob("*.png")
        }

    convert.convert(_dataset(), 3, raw, workdir / "shards", digests_file=digests_file)
    assert recorded() == on_disk()
    record_inode = digests_file.stat().st_ino
    _add_images(raw, "class_0", ["late.png"], seed=8)
    convert.convert(_dataset(), 3, raw, workdir / "shards", digests_file=digests_file)
    assert recorded() == on_disk()
    assert digests_file.stat().st_ino == record_inode, "only added files: their rows are added to the record"
    (raw / "class_1" / "003.png").unlink()
    (raw / "class_1" / "005.png").write_bytes((raw / "class_1" / "006.png").read_bytes())
    convert.convert(_dataset(), 3, raw, workdir / "shards", digests_file=digests_file)
    assert recorded() == on_disk(), "a file gone and a file changed: the record is written again"
    hashed = []
    original = listing.file_sha256
    monkeypatch.setattr(listing, "file_sha256", lambda path: hashed.append(path) or original(path))
    convert.convert(_dataset(), 3, raw, workdir / "shards", digests_file=digests_file)
    assert hashed == []


def test_a_class_whose_files_all_became_unreadable_counts_as_vanished(workdir):
    raw = make_image_folder(workdir / "raw", classes=3, per_class=20)
    _convert(raw, workdir)
    for path in (raw / "class_2").iterdir():
        path.write_bytes(b"half-synced")  # the folder is still there, its images are not
    with pytest.raises(errors.BadInput, match="class 'class_2' vanished"):
        _convert(raw, workdir)


def _entries(hashes: list[int]) -> list[contracts.IndexEntry]:
    return [
        contracts.IndexEntry(
            f"class_{index % 2}/{index:05d}.png", f"class_{index % 2}", "train", "", f"{value:016x}", ""
        )
        for index, value in enumerate(hashes)
    ]


def test_the_near_duplicate_search_finds_every_close_pair_a_bucket_block_at_a_time(monkeypatch):
    # Clustered hashes (a few bits flipped in 40 bases), in buckets larger than a block of rows.
    monkeypatch.setattr(changes, "_ROWS", 7)
    random = np.random.default_rng(4)
    bases = random.integers(0, 2**63, 40, dtype=np.uint64)
    flips = [sum(1 << int(bit) for bit in random.choice(64, random.integers(0, 5), replace=False)) for _ in range(400)]
    hashes = [int(bases[index % 40]) ^ flips[index] for index in range(400)]
    entries = _entries(hashes)

    found = {(a.path, b.path) for a, b in changes._near_duplicate_pairs(entries)}

    expected = {
        (a.path, b.path)
        for a in entries
        for b in entries
        if a.path < b.path and bin(int(a.difference_hash, 16) ^ int(b.difference_hash, 16)).count("1") <= 3
    }
    assert found == expected and len(expected) > 100


def test_a_folder_of_look_alikes_stops_the_near_duplicate_search_and_says_so(monkeypatch):
    monkeypatch.setattr(changes, "MOST_NEAR_DUPLICATE_PAIRS", 50)
    near = changes._near_duplicates(_entries([index % 3 for index in range(300)]))  # 3 hashes, 1 bit apart
    assert near["search_stopped"] and near["groups"] == 50
    assert not changes._near_duplicates(_entries([0, 1, 2**40]))["search_stopped"]
