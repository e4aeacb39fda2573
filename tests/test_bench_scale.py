"""The scale benchmark's parts: its photos, its memory and disk accounting, its reading of DVC's output.

The benchmark itself runs the whole pipeline on 10,000 photos (docs/benchmarks.md); here its parts run on
a few files, so that a figure it reports is known to mean what it says.
"""

import io
import json
import os
import subprocess
import sys

import PIL.Image
import pytest

from bench import cifar10_sized, scale
from bench import convert as bench_convert
from bench import report as bench_report
from tasks import download
from tasks.common import config, files
from tasks.data import images, tfrecords
from tests.conftest import REPOSITORY


def test_the_photos_are_seeded_varied_jpegs_with_a_few_broken_files(tmp_path):
    folder = scale.make_photos(tmp_path / "photos", 60)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 60 and len({path.parent.name for path in files}) == scale.CLASSES
    sides = set()
    for path in files:
        assert isinstance(images.prepare(str(path), image_size=(224, 224)), images.Prepared), path
        with PIL.Image.open(path) as image:
            sides.update(image.size)
    assert min(sides) >= 300 and max(sides) <= 500 and len(sides) > 10, sides
    assert scale.photo(7, seed=0) == scale.photo(7, seed=0) != scale.photo(7, seed=1), "seeded"
    # One file in BROKEN_EVERY is broken, in turn empty, not an image, truncated.
    for index in (scale.BROKEN_EVERY - 1, 2 * scale.BROKEN_EVERY - 1, 3 * scale.BROKEN_EVERY - 1):
        path = tmp_path / f"broken-{index}.jpg"
        path.write_bytes(scale.photo(index, seed=0)[1])
        assert isinstance(images.prepare(str(path), image_size=None), images.Rejected), index


def test_disk_usage_counts_a_hard_linked_file_once(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "copy").mkdir()
    data = os.urandom(64 * 1024)
    (tmp_path / "source" / "a.bin").write_bytes(data)
    os.link(tmp_path / "source" / "a.bin", tmp_path / "copy" / "a.bin")
    (tmp_path / "copy" / "b.bin").write_bytes(data)
    seen: set = set()
    assert scale.disk_usage([tmp_path / "source"], seen) >= 64 * 1024
    assert 64 * 1024 <= scale.disk_usage([tmp_path / "copy"], seen) < 2 * 64 * 1024, "only b.bin is new"


def test_a_stage_watch_sums_a_process_and_its_children_and_times_the_children():
    """As DVC runs a stage: the parent works alone (DVC's own time), then runs its command as a child.

    The parent prints how long its child ran by its own clock; the watch must agree within its sampling
    (0.1 s, later on a loaded machine), far from the child plus the parent's 1.2 s alone."""
    code = (
        "import subprocess, sys, time; block = bytearray(80 * 2**20); time.sleep(0.6); "
        "command = 'import time; b = bytearray(80 * 2**20); time.sleep(1.5)'; "
        "began = time.perf_counter(); subprocess.run([sys.executable, '-c', command]); "
        "print(time.perf_counter() - began, flush=True); time.sleep(0.6)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    watch = scale.StageWatch(process.pid)
    child_seconds = float(process.stdout.read())
    process.wait()
    peak, command_seconds = watch.stop()
    assert peak > 160 * 2**20, "both processes' 80 MiB blocks at once"
    assert child_seconds >= 1.5
    assert abs(command_seconds - child_seconds) <= 0.5, (command_seconds, child_seconds)


def test_the_cifar10_sized_archive_is_read_by_the_cifar10_source_over_http(tmp_path):
    archive = cifar10_sized.make_archive(tmp_path / "archive", records_per_batch=20)
    dataset = config.DatasetParams(
        **{**config.load_params(REPOSITORY / "params.yaml").dataset.model_dump(), "name": "cifar10"}
    )
    with cifar10_sized.serving(archive.parent) as url:
        source = dataset.model_copy(update={"source": f"{url}/{archive.name}", "sha256": files.sha256_of(archive)})
        result = download.download(source, tmp_path / "raw" / "cifar10", tmp_path / "downloads")

    assert result.splits == ("train", "test") and result.class_names == tuple(sorted(cifar10_sized.CLASS_NAMES))
    assert result.file_count == 6 * 20
    assert len(list((tmp_path / "raw" / "cifar10" / "test").rglob("*.png"))) == 20
    with PIL.Image.open(next((tmp_path / "raw" / "cifar10" / "train").rglob("*.png"))) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_dvc_bookkeeping_is_its_time_outside_the_command_beyond_an_unchanged_stage():
    unchanged = [0.7, 0.9, 0.6]
    assert scale.dvc_bookkeeping({"seconds": 10.0, "command_seconds": 8.5}, unchanged) == pytest.approx(0.8)
    assert scale.dvc_bookkeeping({"seconds": 2.0, "command_seconds": 1.5}, unchanged) == 0.0, "no more than a no-op"


def _report(images: int, convert_seconds: float, dvc_seconds: float, train_memory: float) -> dict:
    """A scale report of two stages: Pillow at 1,000 images/s, convert's command taking `convert_seconds`,
    each stage `dvc_seconds` outside its command beyond an unchanged one's 0.5 s."""
    stage = {"seconds": 10.0 + dvc_seconds + 0.5, "command_seconds": 10.0, "peak_memory": 100.0}
    return {
        "images": images,
        "case": "photos",
        "pillow_images_per_second": 1000.0,
        "stages": {
            "convert": {**stage, "seconds": convert_seconds + dvc_seconds + 0.5, "command_seconds": convert_seconds},
            "train": {**stage, "peak_memory": train_memory},
        },
        "unchanged_stage_seconds": {"convert": [0.5], "train": [0.5]},
        "noop_repro_seconds": [1.2, 1.1, 1.3],
        "disk": {"shards": 100, "added": {"data (raw, shards)": 102, "DVC cache of the shards": 0}},
    }


def test_convert_and_dvc_goals_are_checked_from_the_size_they_are_set_for():
    slow = {"convert_seconds": 20.0, "dvc_seconds": 3.0}  # 0.5x Pillow at 10,000 photos; DVC 22% of a stage
    assert scale.check(_report(10_000, **slow, train_memory=100.0), None), "shown, not checked, at 10,000"
    assert not scale.check(_report(100_000, **{**slow, "convert_seconds": 200.0}, train_memory=100.0), None)
    assert not scale.check(_report(100_000, 100.0, 3.0, train_memory=100.0), None), "DVC's share alone fails"
    assert scale.check(_report(100_000, 100.0, 0.5, train_memory=100.0), None)


def test_peak_memory_is_checked_against_a_run_at_least_ten_times_smaller(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_report, "REPORT_DIR", tmp_path)
    for count in (600, 10_000, 50_000):
        (tmp_path / f"scale-{count}.json").write_text(json.dumps(_report(count, 10.0, 0.5, train_memory=100.0)))
    assert scale.smaller_report(100_000, "photos")["images"] == 10_000
    assert scale.smaller_report(10_000, "photos")["images"] == 600
    assert scale.smaller_report(5_000, "photos") is None
    smaller = scale.smaller_report(100_000, "photos")
    assert scale.check(_report(100_000, 100.0, 0.5, train_memory=129.0), smaller)
    assert not scale.check(_report(100_000, 100.0, 0.5, train_memory=131.0), smaller)


def test_the_convert_anchor_stores_every_photo_like_the_stage_and_leaves_nothing_behind(tmp_path, monkeypatch):
    folder = scale.make_photos(tmp_path / "photos", 40)
    stored, pillow = [], bench_convert.pillow

    def anchor(raw_dir, output, image_size, all_cores):
        timing = pillow(raw_dir, output, image_size, all_cores)
        sizes = [
            PIL.Image.open(io.BytesIO(image)).size
            for *_, image in tfrecords.iterate_records(output.read_bytes(), output)
        ]
        stored.append((len(sizes), set(sizes), all_cores))
        return timing

    monkeypatch.setattr(scale.bench_convert, "pillow", anchor)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scale.pillow_rates(folder, scratch)
    assert stored == [(40, {(224, 224)}, True)], "a record of every photo (none broken in 40), 224x224, on every core"
    assert list(scratch.iterdir()) == [], "its file is removed"
