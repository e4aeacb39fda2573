"""A team's folder of photos through the whole pipeline: each stage's time, memory and disk at N images.

    python -m bench.scale                          # N = 10,000 (3 to 5 minutes on 2 cores)
    python -m bench.scale --images 100000          # the size the goals are set for (about 30 minutes, 3.5 GB of photos)
    python -m bench.scale --keep data/scale        # keep the photos and the copy there; a rerun reuses the photos
    python -m bench.scale --cifar10                # 60,000 32x32 images through the cifar10 source (5 minutes)

A seeded generator writes N photo-like JPEGs (sides of 300 to 500 pixels, quality 80 to 95, 20 classes,
one broken file in 2,000: empty, truncated or not an image) into a folder. A fresh copy of the repository
runs the default pipeline on it as a team would: `dataset.name: imagefolder` with the folder as source,
`dataset.image_size` 224, `keras_cnn` fed 64x64 images for one epoch, the training split streamed from
the shards (`train.cache_mb` 64). Each stage runs on its own (`dvc repro --single-item <stage>`) and
reports its wall time, images per second, the peak of the summed resident memory of the stage's
processes (dvc, the stage, its workers; sampled every 0.1 s) and the seconds DVC spends outside the
stage's command (starting, hashing, caching, locking: while DVC has no child process; to 0.1 s). Part
of that DVC spends on every call whatever the data (importing itself, reading the repository, dvc.yaml
and dvc.lock, checking the stage's recorded hashes: 0.6-0.9 s here): measured after the run as the same
`dvc repro --single-item <stage>` with nothing to do (the median of three). The rest is what the stage's
data costs DVC, its bookkeeping: hashing the new outputs and caching them. Then a no-op `dvc repro`,
and the disk: the source folder, and what the pipeline added besides it (hard links to the source's
files count once).

Convert's rate is set against what a team would run instead: Pillow alone decoding the same files,
resizing them to 224x224, encoding them as JPEG quality 95 on every core and writing the results into one
TFRecord file (bench/convert.py's anchor: the same work as the stage's, storing included), in the same run:
once before the stages and once right after convert, with the files as freshly read as convert had them;
the faster of the two counts (this machine's speed moves by up to 2x over half an hour, and a single
measurement before the stages once made convert look 1.8x faster than Pillow). Pillow's rate without
writing anything, the limit of the per-image work alone, is measured beside it each time and shown.

Goals (exit 1 when one is missed): a no-op `dvc repro` at most 3 s; disk beyond the source folder at most
the shards + 10%; when reports/bench/ holds this benchmark's report for an N at least 10x smaller, each
stage's peak memory at most 1.3x that one's; and from 100,000 photos, the size they are set for, convert
at least 0.9x the Pillow rate and DVC's bookkeeping at most 10% of each stage's time (below it both are
shown, not checked: the stages' fixed costs, 5-10 s of starting Python and importing TensorFlow and DVC,
weigh more there). Writes reports/bench/scale-<N>.json. The CIFAR-10-sized case
(bench/cifar10_sized.py) runs the same stages on the official binary archive's layout, served on
127.0.0.1, held to DVC's bookkeeping and the no-op repro; it writes reports/bench/scale-cifar10.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import PIL.Image
import psutil
import yaml

from bench import cifar10_sized, orchestration, workspace
from bench import convert as bench_convert
from bench import report as bench_report
from tasks.common import files

CLASSES = 20
SETTINGS = {
    "dataset.name": "imagefolder",
    "dataset.image_size": [224, 224],
    "train.model": "keras_cnn",
    "train.image_size": [64, 64],
    "train.epochs": 1,
    "train.batch_size": 64,
    "train.cache_mb": 64,
    "register.min_precision": 0.0,
}
STAGES = ("download", "convert", "train", "evaluate", "register")
MIN_CONVERT_RATIO = 0.9
MAX_DVC_SHARE = 0.10
MAX_NOOP_REPRO_SECONDS = 3.0
MAX_DISK_OVER_SHARDS = 1.10
MAX_MEMORY_GROWTH = 1.3
# The goals of convert's rate and DVC's bookkeeping are set for a team's folder of this many photos; below it a
# stage's fixed costs (starting Python, importing TensorFlow and DVC: 5-10 s) weigh more, and both are shown
# without being checked. Peak memory is checked between two runs this factor apart in N (10,000 and 100,000).
GOAL_IMAGES = 100_000
MEMORY_STEP = 10
BROKEN_EVERY = 2000


def photo(index: int, seed: int) -> tuple[str, bytes]:
    """The `index`-th generated photo: (its path under the folder, its file's bytes).

    A smooth random field (a 6x6 grid of colours scaled up), tinted by its class, plus sensor-like noise:
    compresses like a photo, and the class shows at 64x64. Every `BROKEN_EVERY`-th file is broken.
    """
    random = np.random.default_rng([seed, index])
    label = index % CLASSES
    path = f"class_{label:03d}/photo_{index:07d}.jpg"
    if index % BROKEN_EVERY == BROKEN_EVERY - 1:
        return path, [b"", b"not an image at all", _encoded(random, label)[:2000]][index // BROKEN_EVERY % 3]
    return path, _encoded(random, label)


def _encoded(random: np.random.Generator, label: int) -> bytes:
    width, height = (int(side) for side in random.integers(300, 501, 2))
    grid = random.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    field = np.asarray(PIL.Image.fromarray(grid).resize((width, height), PIL.Image.Resampling.BICUBIC), np.float32)
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], np.float32)
    pixels = 0.5 * field + 0.5 * hue + random.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(random.integers(80, 96))
    )
    return buffer.getvalue()


def _write_photos(job: tuple[pathlib.Path, int, int, int]) -> None:
    folder, start, stop, seed = job
    for index in range(start, stop):
        relative, data = photo(index, seed)
        (folder / relative).write_bytes(data)


def make_photos(folder: pathlib.Path, count: int, seed: int = 0) -> pathlib.Path:
    """`count` photos in `folder`, made on every core; kept when a previous call made the same ones."""
    marker = folder.parent / f".{folder.name}-complete-{count}-{seed}"  # beside it: not a file of the data set
    if marker.exists():
        return folder
    for label in range(CLASSES):
        (folder / f"class_{label:03d}").mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(folder, start, min(start + chunk, count), seed) for start in range(0, count, chunk)]
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_write_photos, jobs)
    marker.touch()
    return folder


def _pillow_work(path: str) -> int:
    """What convert does to a photo, with Pillow alone (bench/convert.py's anchor at 224x224): the encoded size,
    sent back instead of the bytes, as nothing here writes them."""
    return len(bench_convert.encode_file(path, (224, 224)))


def pillow_rates(folder: pathlib.Path, scratch: pathlib.Path) -> tuple[float, float]:
    """Images per second of Pillow alone doing convert's work on the folder's files on every core: writing the
    results into a TFRecord file in `scratch` (removed after), as bench/convert.py's anchor does (the anchor);
    and without writing them (the per-image work alone, shown)."""
    output = scratch / "pillow-anchor.tfrecord"
    try:
        writing = bench_convert.pillow(folder, output, (224, 224), all_cores=True)
    finally:
        output.unlink(missing_ok=True)
    paths = sorted(str(path) for path in folder.rglob("*.jpg"))
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_pillow_work, paths[:50])  # each worker imports Pillow before the clock starts
        start = time.perf_counter()
        pool.map(_pillow_work, paths, chunksize=64)
        seconds = time.perf_counter() - start
    return writing.images_per_second, len(paths) / seconds


class StageWatch:
    """Samples a DVC process every 0.1 s: the highest sum of resident memory over it and all its descendants,
    and when the stage's command ran (while DVC had a child process: DVC itself hashes and caches in its own)."""

    def __init__(self, pid: int):
        self.root, self.peak, self.running = psutil.Process(pid), 0, True
        self.command_began: float | None = None
        self.command_ended: float | None = None
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            try:
                children = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now = time.perf_counter()
            if children:
                self.command_began = self.command_began or now
                self.command_ended = now
            total = 0
            for process in (self.root, *children):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def stop(self) -> tuple[int, float]:
        """(peak memory in bytes, seconds the command ran)."""
        self.running = False
        self.thread.join()
        if self.command_began is None:
            return self.peak, 0.0
        return self.peak, self.command_ended - self.command_began


def run_stage(copy: pathlib.Path, stage: str, variables: dict[str, str]) -> dict:
    """One stage through DVC: wall seconds, the stage command's own seconds, peak memory (bytes)."""
    command = ["dvc", "repro", "--single-item", stage]
    start = time.perf_counter()
    with subprocess.Popen(
        command, cwd=copy, env=variables, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        watch = StageWatch(process.pid)
        output = process.stdout.read()
    seconds = time.perf_counter() - start
    peak, command_seconds = watch.stop()
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{tail}")
    return {"seconds": seconds, "command_seconds": command_seconds, "peak_memory": peak}


def disk_usage(paths: list[pathlib.Path], seen: set[tuple[int, int]]) -> int:
    """Bytes on disk of the files under `paths` whose inodes are not in `seen` (which gets them added)."""
    files = []
    for root in paths:
        if root.is_file():
            files.append(str(root))
        for folder, _, names in os.walk(root):
            files.extend(os.path.join(folder, name) for name in names)
    total = 0
    for path in files:
        status = os.lstat(path)
        key = (status.st_dev, status.st_ino)
        if key not in seen:
            seen.add(key)
            total += status.st_blocks * 512
    return total


def shards_cache_files(copy: pathlib.Path) -> list[pathlib.Path]:
    """The files of DVC's cache that hold the convert stage's shards: their folder's listing (a .dir file)
    names each file's digest."""
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    out = next(out for out in lock["stages"]["convert"]["outs"] if out["path"].startswith("data/shards/"))
    objects = copy / ".dvc" / "cache" / "files" / "md5"
    listing = objects / out["md5"][:2] / out["md5"][2:]
    return [listing] + [objects / entry["md5"][:2] / entry["md5"][2:] for entry in json.loads(listing.read_text())]


def measure(folder: pathlib.Path, count: int, cifar10: bool = False) -> dict:
    copy = folder / "repository"
    if copy.exists():
        raise SystemExit(f"{copy} exists: remove it (the photos beside it are reused)")
    with contextlib.ExitStack() as stack:
        if cifar10:  # served to the cifar10 source for the download stage; Pillow's rate is no anchor for it
            source = cifar10_sized.make_archive(folder / "archive")
            url = stack.enter_context(cifar10_sized.serving(source.parent))
            settings = {**cifar10_sized.SETTINGS, "dataset.source": f"{url}/{source.name}"}
            settings["dataset.sha256"], anchors = files.sha256_of(source), []
        else:
            source = make_photos(folder / "photos", count)
            settings, anchors = {**SETTINGS, "dataset.source": str(source)}, [pillow_rates(source, folder)]
        workspace.copy_repository(copy)
        orchestration.write_params(copy, settings)
        variables = orchestration.environment()
        stages = {}
        for stage in STAGES:
            stages[stage] = run_stage(copy, stage, variables)
            if stage == "convert" and anchors:
                anchors.append(pillow_rates(source, folder))
    noop = orchestration.measure_noop_repro(copy, variables)
    unchanged = {
        stage: orchestration.measure_noop_repro(copy, variables, arguments=("--single-item", stage)) for stage in STAGES
    }
    seen: set[tuple[int, int]] = set()
    source_bytes = disk_usage([source], seen)
    shards_bytes = disk_usage([copy / "data" / "shards"], set())
    shards_cache = shards_cache_files(copy)
    added = {
        "data (raw, shards)": disk_usage([copy / "data"], seen),
        "DVC cache of the shards": disk_usage(shards_cache, seen),
        "DVC cache, the rest": disk_usage([copy / ".dvc" / "cache"], seen),
        "models, checkpoints, MLflow": disk_usage(
            [copy / name for name in ("models", "checkpoints", "mlruns", "mlartifacts", "mlflow.db")], seen
        ),
    }
    return {
        "images": count,
        "case": "cifar10" if cifar10 else "photos",
        "settings": settings,
        "pillow_images_per_second": max((writing for writing, _ in anchors), default=None),
        "pillow_runs_images_per_second": [writing for writing, _ in anchors],
        "pillow_without_writing_runs_images_per_second": [encoding for _, encoding in anchors],
        "stages": stages,
        "noop_repro_seconds": noop,
        "unchanged_stage_seconds": unchanged,
        "disk": {"source": source_bytes, "shards": shards_bytes, "added": added},
    }


def check(report: dict, smaller: dict | None) -> bool:
    """The goals, for a team's photos; the CIFAR-10-sized case is held to DVC's bookkeeping and the no-op repro only
    (its raw folder is PNGs extracted from the archive, and convert keeps them as they are: no Pillow anchor).
    Below GOAL_IMAGES photos, convert's rate and DVC's bookkeeping are shown, not checked."""
    count, stages, photos = report["images"], report["stages"], report["case"] == "photos"
    checked = not photos or count >= GOAL_IMAGES
    passed = []
    if photos:
        convert_rate = count / stages["convert"]["command_seconds"]
        ratio = convert_rate / report["pillow_images_per_second"]
        passed.append(bench_report.check("convert over Pillow alone", ratio, MIN_CONVERT_RATIO, enforced=checked))
        if report.get("pillow_without_writing_runs_images_per_second"):  # reports from before it have none
            bare = convert_rate / max(report["pillow_without_writing_runs_images_per_second"])
            bench_report.check("convert over Pillow writing nothing", bare, MIN_CONVERT_RATIO, enforced=False)
    for stage, result in stages.items():
        share = dvc_bookkeeping(result, report["unchanged_stage_seconds"][stage]) / result["seconds"]
        name = f"DVC's bookkeeping in {stage}"
        passed.append(bench_report.check(name, 100 * share, 100 * MAX_DVC_SHARE, False, "%", enforced=checked))
    if not checked:
        print(f"(convert's rate and DVC's bookkeeping: goals set at {GOAL_IMAGES:,} photos, not checked at {count:,})")
    noop = statistics.median(report["noop_repro_seconds"])
    passed.append(bench_report.check("no-op dvc repro", noop, MAX_NOOP_REPRO_SECONDS, False, " s"))
    disk = report["disk"]
    data_added = disk["added"]["data (raw, shards)"] + disk["added"]["DVC cache of the shards"]
    if photos:
        name = "data disk beyond the source, over the shards"
        passed.append(bench_report.check(name, data_added / disk["shards"], MAX_DISK_OVER_SHARDS, False))
    if smaller is not None:
        for stage, result in stages.items():
            growth = result["peak_memory"] / smaller["stages"][stage]["peak_memory"]
            name = f"{stage}'s peak memory over the {smaller['images']:,}-photo run's"
            passed.append(bench_report.check(name, growth, MAX_MEMORY_GROWTH, False))
    return all(passed)


def dvc_bookkeeping(result: dict, unchanged_seconds: list[float]) -> float:
    """Seconds of a stage's run that DVC spent outside the command beyond what the same `dvc repro` takes when
    the stage is unchanged (none below zero)."""
    outside = result["seconds"] - result["command_seconds"]
    return max(0.0, outside - statistics.median(unchanged_seconds))


def smaller_report(count: int, case: str) -> dict | None:
    """This benchmark's report of the same case for the largest N at most `count` / MEMORY_STEP in reports/bench/,
    if any: what peak memory is compared with (a run closer in N would hide a growth with N)."""
    reports = [json.loads(path.read_text()) for path in bench_report.REPORT_DIR.glob("scale-*.json")]
    below = [
        report for report in reports if report.get("case", "photos") == case and report["images"] * MEMORY_STEP <= count
    ]
    return max(below, key=lambda report: report["images"]) if below else None


def print_report(report: dict) -> None:
    count = report["images"]
    rows = []
    for stage, result in report["stages"].items():
        dvc_seconds = result["seconds"] - result["command_seconds"]
        unchanged = statistics.median(report["unchanged_stage_seconds"][stage])
        bookkeeping = dvc_bookkeeping(result, report["unchanged_stage_seconds"][stage])
        row = [stage, result["seconds"], dvc_seconds, unchanged, bookkeeping, count / result["seconds"]]
        rows.append([*row, result["peak_memory"] / 2**20])
    if report["case"] == "photos":
        runs = ", ".join(f"{rate:.0f}" for rate in report["pillow_runs_images_per_second"])
        bare = ", ".join(f"{rate:.0f}" for rate in report["pillow_without_writing_runs_images_per_second"])
        print(
            f"{count:,} photos; Pillow alone on every core, writing a TFRecord: {runs} images/s; writing nothing: "
            f"{bare} images/s (before the stages, after convert)"
        )
    else:
        print(f"{count:,} CIFAR-10-sized images, the binary archive served on 127.0.0.1 to the cifar10 source")
    columns = ["stage", "seconds", "of which DVC", "unchanged stage", "DVC's bookkeeping", "images/s"]
    columns.append("peak memory MiB")
    bench_report.print_table(columns, rows)
    disk = report["disk"]
    disk_rows = [["source folder", disk["source"] / 2**20], ["shards", disk["shards"] / 2**20]]
    disk_rows += [[f"added: {name}", value / 2**20] for name, value in disk["added"].items()]
    bench_report.print_table(["disk", "MiB"], disk_rows)
    print(f"no-op dvc repro: {', '.join(f'{seconds:.2f}' for seconds in report['noop_repro_seconds'])} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="photos to generate (default: %(default)s)")
    parser.add_argument("--keep", type=pathlib.Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument(
        "--cifar10", action="store_true", help="the CIFAR-10-sized case: 60,000 32x32 images through the cifar10 source"
    )
    arguments = parser.parse_args(argv)
    count = 6 * cifar10_sized.RECORDS_PER_BATCH if arguments.cifar10 else arguments.images
    if arguments.keep is not None:
        arguments.keep.mkdir(parents=True, exist_ok=True)
        report = measure(arguments.keep.resolve(), count, arguments.cifar10)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
            report = measure(pathlib.Path(folder), count, arguments.cifar10)
    print_report(report)
    passed = check(report, smaller_report(count, report["case"]))
    bench_report.write("scale-cifar10" if arguments.cifar10 else f"scale-{count}", report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
