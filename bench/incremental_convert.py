"""Incremental convert: a nightly run after 100 images were added to a large folder, against converting it all.

    python -m bench.incremental_convert                      # 50,000 photo-sized JPEGs, 100 added
    python -m bench.incremental_convert --images 5000        # quicker

The anchor is what convert did before it reused anything, and what it still does on a first run: a
full conversion of the grown folder, in this process, on the same files. For each case (each image's
own size, the default; and dataset.image_size [224, 224], which re-encodes every image) the folder is
converted, 100 new images are added, and the grown folder is converted in turns, --rounds times each:
incrementally (from the same previous shards each time) and in full (into an empty folder). Each must
write byte-identical shards. The ratio is of the fastest of each kind, as timeit takes the best of its
repeats: the machine's speed moves by up to 1.5x within minutes, on both sides alike. Prints a table,
writes reports/bench/incremental_convert.json and exits non-zero when an incremental run takes more than
5% of the full one's time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL.Image

from bench import report as bench_report
from bench.convert import folder_dataset
from tasks import convert
from tasks.common import machine

GOAL = 0.05  # of the full conversion's time


CLASSES = 20


def make_photos(root: pathlib.Path, count: int, side: int, seed: int, prefix: str = "") -> pathlib.Path:
    """`count` JPEGs of about `side` pixels (each side varies by up to a quarter), quality 90, in CLASSES
    class folders: windows of one smooth noise texture, tinted per class, so that every file differs.
    Made on all cores: 50,000 photos take about as long as converting them."""
    jobs = [(root, index, side, seed, prefix) for index in range(count)]
    with concurrent.futures.ProcessPoolExecutor(machine.usable_cores()) as pool:
        list(pool.map(_photo, jobs, chunksize=256))
    return root


_TEXTURE: dict[int, np.ndarray] = {}


def _photo(job) -> None:
    root, index, side, seed, prefix = job
    if side not in _TEXTURE:  # per worker process, once
        noise = np.random.default_rng(0).normal(128, 40, (side // 8, side // 8, 3)).clip(0, 255).astype(np.uint8)
        _TEXTURE[side] = np.asarray(PIL.Image.fromarray(noise).resize((side * 2, side * 2), PIL.Image.BICUBIC))
    random = np.random.default_rng((seed, index))
    height, width = (int(side * factor) for factor in random.uniform(0.75, 1.25, 2))
    top, left = random.integers(0, side * 2 - side * 5 // 4, 2)
    label = index % CLASSES
    window = _TEXTURE[side][top : top + height, left : left + width].astype(np.int16)
    tint = np.array([label * 12 % 97, label * 29 % 89, label * 41 % 83]) - 45
    folder = root / f"class_{label:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(window + tint, 0, 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(folder / f"{prefix}{index:06d}.jpg", quality=90)


def _timed(dataset, raw_dir: pathlib.Path, shards_dir: pathlib.Path) -> tuple[float, convert.ConvertResult]:
    """A conversion as `python -m tasks.convert` runs it: with its record of file digests beside the shards."""
    start = time.perf_counter()
    result = convert.convert(dataset, seed=0, raw_dir=raw_dir, shards_dir=shards_dir, digests_file=_record(shards_dir))
    return time.perf_counter() - start, result


def _record(shards_dir: pathlib.Path) -> pathlib.Path:
    return shards_dir.parent / f"{shards_dir.name}-digests.sqlite"


def _copy_state(shards_dir: pathlib.Path, to: pathlib.Path) -> None:
    """The shards as hard links (as the kept shards of a run are: same bytes, time and inode, so the record of
    digests, which names them by their paths in `shards`, still vouches for them once they are back there) and a
    copy of the record, which a run changes in place."""
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(shards_dir, to, copy_function=os.link)
    shutil.copyfile(_record(shards_dir), _record(to))


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def measure_case(
    dataset, raw_dir: pathlib.Path, work: pathlib.Path, added: int, side: int, seed: int, rounds: int
) -> dict:
    _timed(dataset, raw_dir, work / "shards")  # the nightly's previous state, kept aside for each round
    _copy_state(work / "shards", work / "previous")
    make_photos(raw_dir, added, side, seed=seed, prefix=f"new-{seed}-")  # into the class folders
    incremental_times, full_times, identical = [], [], True
    for _ in range(rounds):
        _copy_state(work / "previous", work / "shards")
        incremental_seconds, incremental = _timed(dataset, raw_dir, work / "shards")
        shutil.rmtree(work / "full", ignore_errors=True)
        _record(work / "full").unlink(missing_ok=True)
        full_seconds, full = _timed(dataset, raw_dir, work / "full")
        incremental_times.append(incremental_seconds)
        full_times.append(full_seconds)
        identical = identical and _tree(work / "shards") == _tree(work / "full")
    return {
        "images": sum(full.counts.values()),
        "full_seconds": round(min(full_times), 2),
        "incremental_seconds": round(min(incremental_times), 2),
        "ratio": round(min(incremental_times) / min(full_times), 4),
        "full_runs": [round(seconds, 2) for seconds in full_times],
        "incremental_runs": [round(seconds, 2) for seconds in incremental_times],
        "decoded_incremental": incremental.decoded,
        "decoded_full": full.decoded,
        "byte_identical": identical,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="images in the folder (default: %(default)s)")
    parser.add_argument("--added", type=int, default=100, help="images added before the rerun (default: %(default)s)")
    parser.add_argument("--side", type=int, default=384, help="their typical side in pixels (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind, in turns (default: %(default)s)")
    arguments = parser.parse_args(argv)
    dataset = folder_dataset()
    cases = {"keep size": dataset, "resize to 224x224": dataset.model_copy(update={"image_size": (224, 224)})}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as folder:
        folder = pathlib.Path(folder)
        started = time.perf_counter()
        raw_dir = make_photos(folder / "raw", arguments.images, arguments.side, seed=0)
        print(f"made {arguments.images} photos in {time.perf_counter() - started:.0f} s")
        for index, (case, case_dataset) in enumerate(cases.items()):
            work = folder / f"case-{index}"
            work.mkdir()
            results[case] = measure_case(
                case_dataset, raw_dir, work, arguments.added, arguments.side, seed=index + 1, rounds=arguments.rounds
            )
    bench_report.print_table(
        [
            "case",
            "images",
            "full s (each run)",
            "incremental s (each run)",
            "ratio of fastest",
            "decoded",
            "byte-identical",
        ],
        [
            [
                case,
                row["images"],
                " / ".join(map(str, row["full_runs"])),
                " / ".join(map(str, row["incremental_runs"])),
                f"{row['ratio']:.1%}",
                row["decoded_incremental"],
                row["byte_identical"],
            ]
            for case, row in results.items()
        ],
    )
    passed = [
        bench_report.check(f"{case}: incremental / full", row["ratio"], GOAL, higher_is_better=False, unit="")
        and row["byte_identical"]
        for case, row in results.items()
    ]
    bench_report.write("incremental_convert", {"arguments": vars(arguments), "goal": GOAL, "cases": results})
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
