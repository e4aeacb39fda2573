"""Incremental convert: a nightly run after 100 images were added to a large folder, against converting it all.

    python -m bench.incremental_convert                      # 50,000 128x128 JPEGs, 100 added
    python -m bench.incremental_convert --images 5000        # quicker

The anchor is what convert did before it reused anything, and what it still does on a first run: a
full conversion of the grown folder, in this process, on the same files. For each case (each image's
own size, the default; and dataset.image_size set, which re-encodes every image) the folder is
converted, 100 new images are added, and the grown folder is converted twice: incrementally (the
previous shards in place) and in full (into an empty folder). The two must write byte-identical shards.
Prints a table, writes reports/bench/incremental_convert.json and exits non-zero when an incremental
run takes more than 5% of the full one's time.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from bench import report as bench_report
from bench.convert import folder_dataset, make_folder
from tasks import convert

GOAL = 0.05  # of the full conversion's time


def _timed(dataset, raw_dir: pathlib.Path, shards_dir: pathlib.Path) -> tuple[float, convert.ConvertResult]:
    start = time.perf_counter()
    result = convert.convert(dataset, seed=0, raw_dir=raw_dir, shards_dir=shards_dir)
    return time.perf_counter() - start, result


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def measure_case(dataset, raw_dir: pathlib.Path, work: pathlib.Path, added: int, side: int, seed: int) -> dict:
    _timed(dataset, raw_dir, work / "shards")  # the nightly's previous state
    grown = make_folder(work / "new", added, side, seed=seed)
    for path in sorted(grown.rglob("*.jpg")):  # into the class folders, under new names
        path.rename(raw_dir / path.parent.name / f"new-{seed}-{path.name}")
    incremental_seconds, incremental = _timed(dataset, raw_dir, work / "shards")
    full_seconds, full = _timed(dataset, raw_dir, work / "full")
    identical = _tree(work / "shards") == _tree(work / "full")
    return {
        "images": sum(full.counts.values()),
        "full_seconds": round(full_seconds, 2),
        "incremental_seconds": round(incremental_seconds, 2),
        "ratio": round(incremental_seconds / full_seconds, 4),
        "decoded_incremental": incremental.decoded,
        "decoded_full": full.decoded,
        "byte_identical": identical,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="images in the folder (default: %(default)s)")
    parser.add_argument("--added", type=int, default=100, help="images added before the rerun (default: %(default)s)")
    parser.add_argument("--side", type=int, default=128, help="their width and height in pixels (default: %(default)s)")
    arguments = parser.parse_args()
    dataset = folder_dataset()
    half = (arguments.side // 2, arguments.side // 2)
    cases = {"keep size": dataset, f"resize to {half[0]}x{half[1]}": dataset.model_copy(update={"image_size": half})}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as folder:
        folder = pathlib.Path(folder)
        raw_dir = make_folder(folder / "raw", arguments.images, arguments.side)
        for index, (case, case_dataset) in enumerate(cases.items()):
            work = folder / f"case-{index}"
            work.mkdir()
            results[case] = measure_case(case_dataset, raw_dir, work, arguments.added, arguments.side, seed=index + 1)
    bench_report.print_table(
        ["case", "images", "full s", "incremental s", "ratio", "decoded", "byte-identical"],
        [
            [
                case,
                row["images"],
                row["full_seconds"],
                row["incremental_seconds"],
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
