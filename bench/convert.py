"""Convert throughput: the convert stage against a plain single-process loop over the same files.

    python -m bench.convert                  # 3,000 128x128 JPEGs in a temporary folder
    python -m bench.convert --images 600     # quicker, noisier

Two cases, each a loop and the stage on the same files, in this process, one after the other:
- resize to half (dataset.image_size set): the loop decodes (letting the JPEG decoder scale down, as
  the stage does), converts to RGB, resizes and encodes JPEG at quality 95, exactly the stage's own
  per-image work, and writes one TFRecord. Like for like: what is left is the stage's use of every
  core, against its own bookkeeping (digests, validation, the index). The ratio of this case is the
  one checked.
- keep size (dataset.image_size: null, the default): the loop re-encodes each file as PNG (as this
  pipeline's first convert stage did), while the stage keeps an unchanged JPEG's own bytes: not the
  same work, so shown for what it tells, not checked.
Each is timed twice, alternating, and the faster run counts (other work on the machine only ever
slows a run down). Prints a table, writes reports/bench/convert.json and exits non-zero when the
stage is less than 1.7 times as fast as the loop in the resize case (2 cores: at most 2x).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pathlib
import sys
import tempfile
import time

import numpy as np
import PIL.Image

from bench import report as bench_report
from tasks import convert
from tasks.common import config
from tasks.data import records

REQUIRED_RATIO = 1.7


@dataclasses.dataclass(frozen=True)
class Timing:
    method: str
    images: int
    seconds: float
    megabytes_written: float

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


def plain_loop(raw_dir: pathlib.Path, output: pathlib.Path, image_size: tuple[int, int] | None) -> Timing:
    paths = sorted(path for path in raw_dir.rglob("*.jpg"))
    labels = {
        name: label for label, name in enumerate(sorted(path.name for path in raw_dir.iterdir() if path.is_dir()))
    }
    import tensorflow as tf  # here, not above: importing tasks first turns its start-up notices down

    start = time.perf_counter()
    with tf.io.TFRecordWriter(str(output)) as writer:
        for path in paths:
            with PIL.Image.open(path) as image:
                if image_size is not None:
                    image.draft("RGB", (max(image_size), max(image_size)))
                rgb = image.convert("RGB")
            buffer = io.BytesIO()
            if image_size is None:
                rgb.save(buffer, format="PNG")
            else:
                rgb.resize((image_size[1], image_size[0]), PIL.Image.Resampling.BILINEAR).save(
                    buffer, format="JPEG", quality=95
                )
            writer.write(
                records.serialize(buffer.getvalue(), labels[path.parent.name], path.relative_to(raw_dir).as_posix())
            )
    seconds = time.perf_counter() - start
    encoding = "PNG" if image_size is None else "resize, JPEG 95"
    return Timing(f"loop: decode, RGB, {encoding}, write", len(paths), seconds, output.stat().st_size / 1e6)


def convert_stage(raw_dir: pathlib.Path, shards_dir: pathlib.Path, dataset: config.DatasetParams) -> Timing:
    start = time.perf_counter()
    result = convert.convert(dataset, seed=0, raw_dir=raw_dir, shards_dir=shards_dir)
    seconds = time.perf_counter() - start
    written = sum(path.stat().st_size for path in shards_dir.glob("*.tfrecord")) / 1e6
    return Timing("convert stage (tasks.convert)", sum(result.counts.values()), seconds, written)


def measure(
    raw_dir: pathlib.Path, work: pathlib.Path, dataset: config.DatasetParams
) -> tuple[Timing, Timing, list, list]:
    loops, stages = [], []
    for attempt in range(2):  # alternating, so that a burst of other work hits both alike
        loops.append(plain_loop(raw_dir, work / f"loop-{attempt}.tfrecord", dataset.image_size))
        stages.append(convert_stage(raw_dir, work / f"shards-{attempt}", dataset))
    fastest = lambda timings: min(timings, key=lambda timing: timing.seconds)  # noqa: E731
    return fastest(loops), fastest(stages), loops, stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to convert (default: %(default)s)")
    parser.add_argument("--side", type=int, default=128, help="their width and height in pixels (default: %(default)s)")
    arguments = parser.parse_args()
    dataset = folder_dataset()
    half = (arguments.side // 2, arguments.side // 2)
    checked = f"resize to {half[0]}x{half[1]}"
    cases = {"keep size": dataset, checked: dataset.model_copy(update={"image_size": half})}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as folder:
        folder = pathlib.Path(folder)
        raw_dir = make_folder(folder / "raw", arguments.images, arguments.side)
        for index, (case, case_dataset) in enumerate(cases.items()):
            (folder / str(index)).mkdir()
            results[case] = measure(raw_dir, folder / str(index), case_dataset)
    print(f"{arguments.images} JPEGs of {arguments.side}x{arguments.side}")
    rows = []
    report = {"images": arguments.images, "side": arguments.side, "required_ratio": REQUIRED_RATIO, "cases": {}}
    for case, (loop, stage, loops, stages) in results.items():
        ratio = stage.images_per_second / loop.images_per_second
        for timing, shown in ((loop, None), (stage, f"{ratio:.2f}x")):
            rows.append(
                [case, timing.method, timing.seconds, timing.images_per_second, timing.megabytes_written, shown]
            )
        report["cases"][case] = {
            "loop_images_per_second": round(loop.images_per_second, 1),
            "convert_images_per_second": round(stage.images_per_second, 1),
            "ratio": round(ratio, 3),
            "runs": {
                "loop": [dataclasses.asdict(t) for t in loops],
                "convert": [dataclasses.asdict(t) for t in stages],
            },
        }
    bench_report.print_table(["case", "method", "seconds", "images/s", "MB written", "ratio"], rows)
    report["passed"] = bench_report.check(
        f"convert stage over the loop ({checked})", report["cases"][checked]["ratio"], REQUIRED_RATIO
    )
    bench_report.write("convert", report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
