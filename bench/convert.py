"""Convert throughput: the convert stage against Pillow alone doing the same work on every core.

    python -m bench.convert                              # 4,000 photos and 10,000 128x128 JPEGs (1.5 min)
    python -m bench.convert --photos 2000 --images 3000  # quicker, noisier: the pools' start-up weighs more

The anchor is what a user would write today without this pipeline: a process pool with a worker per
core (concurrent.futures.ProcessPoolExecutor, started as the stage starts its own) maps one function
over the sorted files in chunks of 64; each call opens a file, decodes it (letting the JPEG decoder
scale down, as the stage does), converts it to RGB when it is not, resizes and encodes it, and this
process writes every result to one TFRecord, as the stage writes its records. The anchor's time
includes listing the folder and starting its pool, as the stage's includes finding its files and
starting its own.

Three cases, in this process, one after the other:
- photos resized to 224x224 (checked): the scale benchmark's generated photos (sides of 300 to 500
  pixels, a broken file in 2,000; bench/scale.py) with dataset.image_size [224, 224], the workload the
  convert goal is set for: a team's photos of a few hundred pixels. The anchor resizes bilinearly and
  encodes JPEG at quality 95, exactly the stage's own per-image work; what is left is the stage's own
  bookkeeping (digests, validation, perceptual hashes, the splits, the records' order, the index, the
  data-change report).
- 128x128 JPEGs resized to 64x64 (shown): the same, on images so small that Pillow's work is 0.2 ms an
  image and the bookkeeping, about 0.1 ms an image whatever its size, weighs half as much again. A
  plain single-process loop doing the anchor's work is shown too, for scale.
- keep size (dataset.image_size: null, the default; shown): the anchor re-encodes each 128x128 file as
  PNG (as this pipeline's first convert stage did), while the stage keeps an unchanged JPEG's own bytes:
  not the same work.
Each method is timed twice, alternating, and the faster run counts (other work on the machine only ever
slows a run down). Prints a table, writes reports/bench/convert.json and exits non-zero when the stage
converts the photos at less than 0.9 times the anchor's rate. The CPU column (this process and its
workers) moves less than the seconds when the machine is shared.
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
from bench import scale
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
        shard_size_mb=1.0,
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
    """The anchor's work on one file: decode (scaled by the JPEG decoder), RGB, then resize and JPEG 95, or PNG;
    nothing for a file that is no image."""
    try:
        with PIL.Image.open(path) as image:
            if image_size is not None:
                image.draft("RGB", (max(image_size), max(image_size)))
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")  # as the stage: no copy of an RGB picture
    except (OSError, PIL.UnidentifiedImageError):
        return b""
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
                if data:
                    source = path.relative_to(raw_dir).as_posix()
                    tfrecords.write_record(stream, tfrecords.serialize(data, labels[path.parent.name], source))
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


CHECKED = "photos, resize to 224x224"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=4000, help="photos to convert (default: %(default)s)")
    parser.add_argument("--images", type=int, default=10000, help="small JPEGs to convert (default: %(default)s)")
    parser.add_argument("--side", type=int, default=128, help="the small JPEGs' side in pixels (default: %(default)s)")
    arguments = parser.parse_args(argv)
    dataset = folder_dataset()
    half = (arguments.side // 2, arguments.side // 2)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as folder:
        folder = pathlib.Path(folder)
        small = make_folder(folder / "small", arguments.images, arguments.side)
        cases = {  # (folder, settings, methods); the single-process loop only where it is cheap (see above)
            CHECKED: (scale.make_photos(folder / "photos", arguments.photos), (224, 224), ("anchor", "convert")),
            f"{arguments.side}x{arguments.side}, resize to {half[0]}x{half[1]}": (small, half, METHODS),
            f"{arguments.side}x{arguments.side}, keep size": (small, None, ("anchor", "convert")),
        }
        for index, (case, (raw_dir, image_size, methods)) in enumerate(cases.items()):
            (folder / str(index)).mkdir()
            case_dataset = dataset.model_copy(update={"image_size": image_size})
            results[case] = measure(raw_dir, folder / str(index), case_dataset, methods)
    print(
        f"{arguments.photos} photos, {arguments.images} JPEGs of {arguments.side}x{arguments.side}, "
        f"{convert.worker_count()} cores"
    )
    report = {**vars(arguments), "required_ratio": REQUIRED_RATIO, "checked": CHECKED, "cases": {}}
    rows = []
    for case, runs in results.items():
        case_rows, report["cases"][case] = _case_report(case, runs)
        rows += case_rows
    bench_report.print_table(["case", "method", "seconds", "images/s", "CPU us/image", "MB written", "ratio"], rows)
    report["passed"] = bench_report.check(
        f"convert stage over Pillow on all cores ({CHECKED})", report["cases"][CHECKED]["ratio"], REQUIRED_RATIO
    )
    bench_report.write("convert", report)
    return 0 if report["passed"] else 1


def _case_report(case: str, runs: dict[str, list[Timing]]) -> tuple[list[list], dict]:
    """The table's rows of one case (each method's faster run) and its part of the report."""
    fastest = {method: min(timings, key=lambda timing: timing.seconds) for method, timings in runs.items()}
    anchor = fastest["anchor"].images_per_second
    rows = []
    for method, timing in fastest.items():
        ratio = timing.images_per_second / anchor
        shown = None if method == "anchor" else f"{ratio:.2f}x"
        cpu_per_image = timing.cpu_seconds / timing.images * 1e6
        rows.append([case, timing.method, timing.seconds, timing.images_per_second, cpu_per_image])
        rows[-1] += [timing.megabytes_written, shown]
    return rows, {
        "images_per_second": {method: round(timing.images_per_second, 1) for method, timing in fastest.items()},
        "ratio": round(fastest["convert"].images_per_second / anchor, 3),
        "runs": {method: [dataclasses.asdict(timing) for timing in timings] for method, timings in runs.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
