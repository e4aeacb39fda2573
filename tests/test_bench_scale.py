"""The scale benchmark's parts: its photos, its memory and disk accounting, its reading of DVC's output.

The benchmark itself runs the whole pipeline on 10,000 photos (docs/benchmarks.md); here its parts run on
a few files, so that a figure it reports is known to mean what it says.
"""

import os
import subprocess
import sys

import PIL.Image

from bench import scale
from tasks.data import images


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


def test_peak_memory_sums_a_process_and_its_children():
    code = (
        "import subprocess, sys, time; block = bytearray(80 * 2**20); "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(80 * 2**20); time.sleep(1.5)']); "
        "child.wait()"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    memory = scale.PeakMemory(process.pid)
    process.wait()
    assert memory.stop() > 160 * 2**20, "both processes' 80 MiB blocks at once"


def test_the_stage_command_seconds_come_from_dvcs_own_lines():
    lines = [
        (0.8, "Running stage 'convert':"),
        (1.0, "> python -m tasks.convert"),
        (5.0, "convert: 10 images"),
        (9.0, "Updating lock file 'dvc.lock'"),
        (9.5, ""),
    ]
    assert scale._command_seconds(lines, total=10.0) == 8.0
    assert scale._command_seconds(lines[:3], total=6.0) == 5.0, "no lock line: up to the end"
