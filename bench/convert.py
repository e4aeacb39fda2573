"""Convert throughput: the convert stage against Pillow alone doing the same work on every core.

    python -m bench.convert                  # 10,000 128x128 JPEGs in a temporary folder
    python -m bench.convert --images 3000    # quicker, noisier: the pools' start-up weighs more

The anchor is what a user would write today without this pipeline: a process pool with a worker per
core (concurrent.futures.ProcessPoolExecutor, started as the stage starts its own) maps one function
over the sorted files in chunks of 64; each call opens a file, decodes it (letting the JPEG decoder
scale down, as the stage does), converts it to RGB, resizes and encodes it, and this process writes
every result to one TFRecord. The anchor's time includes listing the folder and starting its pool, as
the stage's includes finding its files and starting its own.

Two cases, in this process, one after the other:
- resize to half (dataset.image_size set): the anchor resizes bilinearly and encodes JPEG at quality 95,
  exactly the stage's own per-image work. Like for like: what is left is the stage's own bookkeeping
  (digests, validation, perceptual hashes, the splits, the index, the data-change report). The ratio
  of this case is the one checked.
- keep size (dataset.image_size: null, the default): the anchor re-encodes each file as PNG (as this
  pipeline's first convert stage did), while the stage keeps an unchanged JPEG's own bytes: not the
  same work, so shown for what it tells, not checked.
A plain single-process loop doing the anchor's work is shown too, for scale, in the resize case (re-encoding
PNGs in one process would take longer than all the rest). Each method is timed
twice, alternating, and the faster run counts (other work on the machine only ever slows a run down).
Prints a table, writes reports/bench/convert.json and exits non-zero when the stage converts at less
than 0.9 times the anchor's rate in the resize case.

10,000 images by default, about two seconds a run: at 3,000 a run takes well under a second, and what
both sides pay once (forking the workers from a process that has TensorFlow loaded, about 0.07 s; the
stage about 0.02 s more for its sample, report and index) and a busy machine's noise weigh three times as
much. The CPU column (this process and its workers) moves less than the seconds when the machine is shared.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import io
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import PIL.Image

from bench import report as bench_report
from tasks import convert
from tasks.common import config
from tasks.data import tfrecords

REQUIRED_RATIO = 0.9
CHUNK = 64  # files per task of the anchor's pool: a round-trip per file would cost more than a small file


@dataclasses.dataclass(frozen=True)
class Timing:
    method: str
    images: int
    seconds: float
    megabytes_written: float
    cpu_seconds: float  # of this process and its finished workers: what other work on the machine barely changes

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def folder_dataset() -> config.DatasetParams:
    """A benchmark's image folder: each image's own size, params.yaml's split fractions and shard size."""
    return config.DatasetParams(
        name="imagefolder",
        source="bench",
        sha256=None,
        image_size=None,
        split_seed=42,
        validation_fraction=0.1,
        test_fraction=0.2,
        shard_size_mb=100.0,
        max_class_drop=0.5,
        accept_data_changes=False,
    )


def make_folder(
    root: pathlib.Path, image_count: int, side: int, classes: int = 10, extension: str = ".jpg", seed: int = 0
) -> pathlib.Path:
    """Photo-like images (smooth gradients plus sensor-like noise, a colour per class), one folder per class:
    JPEGs of quality 90, or PNGs with `extension=".png"` (Pillow's PNG writer ignores the quality)."""
    random = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, side)
    for index in range(image_count):
        label = index % classes
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack(
            [np.outer(ramp, ramp) * 255, np.outer(ramp[::-1], ramp) * 200, np.full((side, side), 25.0 * label)], axis=2
        )
        pixels = np.clip(base + random.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{index:05d}{extension}", quality=90)
    return root


def encode_file(path: str, image_size: tuple[int, int] | None) -> bytes:
    """The anchor's work on one file: decode (scaled by the JPEG decoder), RGB, then resize and JPEG 95, or PNG."""
    with PIL.Image.open(path) as image:
        if image_size is not None:
            image.draft("RGB", (max(image_size), max(image_size)))
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # as the stage: no copy of an RGB picture
    buffer = io.BytesIO()
    if image_size is None:
        rgb.save(buffer, format="PNG")
    else:
        rgb.resize((image_size[1], image_size[0]), PIL.Image.Resampling.BILINEAR).save(
            buffer, format="JPEG", quality=95
        )
    return buffer.getvalue()


def cpu_seconds() -> float:
    """User and system time of this process and of the workers it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def pillow(raw_dir: pathlib.Path, output: pathlib.Path, image_size: tuple[int, int] | None, all_cores: bool) -> Timing:
    """The anchor (`all_cores`: a worker per core, this process writing), or the same work in one process.
    Timed from listing the folder, as the stage's time includes finding its files."""
    start, cpu = time.perf_counter(), cpu_seconds()
    paths = sorted(raw_dir.rglob("*.jpg"))
    labels = {
        name: label for label, name in enumerate(sorted(path.name for path in raw_dir.iterdir() if path.is_dir()))
    }
    work = functools.partial(encode_file, image_size=image_size)
    # fork where there is one, as the stage starts its workers: the same start-up cost on both sides.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = concurrent.futures.ProcessPoolExecutor(convert.worker_count(), mp_context=context) if all_cores else None
    try:
        with output.open("wb") as stream:  # written as the stage writes its shards
            encoded = pool.map(work, map(str, paths), chunksize=CHUNK) if pool else map(work, map(str, paths))
            for path, data in zip(paths, encoded, strict=True):
                record = tfrecords.serialize(data, labels[path.parent.name], path.relative_to(raw_dir).as_posix())
                tfrecords.write_record(stream, record)
    finally:
        if pool:
            pool.shutdown()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    encoding = "PNG" if image_size is None else "resize, JPEG 95"
    where = f"Pillow on {convert.worker_count()} cores" if all_cores else "Pillow, one process"
    return Timing(f"{where}: decode, RGB, {encoding}, write", len(paths), seconds, output.stat().st_size / 1e6, cpu)


def convert_stage(raw_dir: pathlib.Path, shards_dir: pathlib.Path, dataset: config.DatasetParams) -> Timing:
    start, cpu = time.perf_counter(), cpu_seconds()
    result = convert.convert(dataset, seed=0, raw_dir=raw_dir, shards_dir=shards_dir)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    written = sum(path.stat().st_size for path in shards_dir.glob("*.tfrecord")) / 1e6
    return Timing("convert stage (tasks.convert)", sum(result.counts.values()), seconds, written, cpu)


METHODS = ("anchor", "one process", "convert")


def measure(
    raw_dir: pathlib.Path, work: pathlib.Path, dataset: config.DatasetParams, methods: tuple[str, ...]
) -> dict[str, list[Timing]]:
    """Each method's runs on the same files; each is run twice, alternating, so that a burst of other work
    hits all alike."""
    runs: dict[str, list[Timing]] = {method: [] for method in methods}
    for attempt in range(2):
        for method in methods:
            if method == "convert":
                runs[method].append(convert_stage(raw_dir, work / f"shards-{attempt}", dataset))
            else:
                output = work / f"{method}-{attempt}.tfrecord"
                runs[method].append(pillow(raw_dir, output, dataset.image_size, all_cores=method == "anchor"))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="JPEGs to convert (default: %(default)s)")
    parser.add_argument("--side", type=int, default=128, help="their width and height in pixels (default: %(default)s)")
    arguments = parser.parse_args(argv)
    dataset = folder_dataset()
    half = (arguments.side // 2, arguments.side // 2)
    checked = f"resize to {half[0]}x{half[1]}"
    # The single-process loop only where it is cheap (see above).
    cases = {
        "keep size": (dataset, ("anchor", "convert")),
        checked: (dataset.model_copy(update={"image_size": half}), METHODS),
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as folder:
        folder = pathlib.Path(folder)
        raw_dir = make_folder(folder / "raw", arguments.images, arguments.side)
        for index, (case, (case_dataset, methods)) in enumerate(cases.items()):
            (folder / str(index)).mkdir()
            results[case] = measure(raw_dir, folder / str(index), case_dataset, methods)
    print(f"{arguments.images} JPEGs of {arguments.side}x{arguments.side}, {convert.worker_count()} cores")
    rows = []
    report = {"images": arguments.images, "side": arguments.side, "required_ratio": REQUIRED_RATIO, "cases": {}}
    for case, runs in results.items():
        fastest = {method: min(timings, key=lambda timing: timing.seconds) for method, timings in runs.items()}
        anchor = fastest["anchor"].images_per_second
        for method, timing in fastest.items():
            ratio = timing.images_per_second / anchor
            shown = None if method == "anchor" else f"{ratio:.2f}x"
            cpu_per_image = timing.cpu_seconds / timing.images * 1e6
            row = [case, timing.method, timing.seconds, timing.images_per_second, cpu_per_image]
            rows.append(row + [timing.megabytes_written, shown])
        report["cases"][case] = {
            "images_per_second": {method: round(timing.images_per_second, 1) for method, timing in fastest.items()},
            "ratio": round(fastest["convert"].images_per_second / anchor, 3),
            "runs": {method: [dataclasses.asdict(timing) for timing in timings] for method, timings in runs.items()},
        }
    bench_report.print_table(["case", "method", "seconds", "images/s", "CPU us/image", "MB written", "ratio"], rows)
    report["passed"] = bench_report.check(
        f"convert stage over Pillow on all cores ({checked})", report["cases"][checked]["ratio"], REQUIRED_RATIO
    )
    bench_report.write("convert", report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
