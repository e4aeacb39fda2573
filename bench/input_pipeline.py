"""Input pipeline throughput: the training tf.data pipeline against Keras' ImageDataGenerator, same images.

    python -m bench.input_pipeline                 # 7,200 32x32 images (5,040 in the training split)
    python -m bench.input_pipeline --images 600    # quicker, noisier

The images (CIFAR-like 32x32 RGB PNGs: smooth gradients plus noise, ten classes) go through the convert
stage into TFRecord shards in a temporary folder. Then, in this process, alternating, twice each:
- ImageDataGenerator (the seed's anchor): `width_shift_range=0.1, height_shift_range=0.1,
  horizontal_flip=True`, `.flow(x, y, batch_size)` over the training split already decoded in memory
  as a NumPy array (it never reads a file). One pass over the split after a one-batch warm-up.
- The pipeline (`tasks.data.inputs.training_data`): shards -> parse, decode, cache, shuffle, batch, random
  crop (4 pixels of padding), flip, brightness, contrast -> uint8 batches, as the train stage reads
  them. Its first pass (cold: reading the shards, decoding every PNG, filling the in-memory cache)
  and the passes after it (warm: the cache hit, as in every epoch of training after the first) are
  timed separately, on a fresh dataset each time.
Each side's batches are pulled into this Python process as they would be by a training loop
(ImageDataGenerator: NumPy float32; tf.data: eager uint8 tensors) and nothing else is done with them.
Beside wall-clock images/s, images per CPU second of the process are reported: ImageDataGenerator
runs on one core, the pipeline on all of them, so when other work shares the cores the wall-clock
ratio drops while the CPU one, the work each image costs, stays.

The goal is checked on the warm passes: a training run reads its data once and then `epochs` times
from the cache (20 epochs by default), so the warm pass is what the pipeline costs per epoch, and the
anchor holds its images in memory too. The cold pass is reported beside it, with its own ratio,
because it is what a one-epoch run pays. Exits non-zero when the warm pipeline delivers less than
10 times as many images per second as ImageDataGenerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

from bench import convert as bench_convert
from bench import report as bench_report
from tasks import convert
from tasks.common import contracts
from tasks.data import inputs, records

REQUIRED_RATIO = 10.0
SIDE = 32
CLASSES = 10
AUGMENT = ("crop", "flip", "brightness", "contrast")
CROP_PADDING = 4  # the ResNet seed's random crop: pad by 4, take a 32x32 window


@dataclasses.dataclass(frozen=True)
class Timing:
    method: str
    images: int
    seconds: float
    cpu_seconds: float  # of this whole process, all its threads

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def images_per_cpu_second(self) -> float:
        return self.images / self.cpu_seconds


def make_shards(folder: pathlib.Path, image_count: int, side: int = SIDE) -> pathlib.Path:
    """`image_count` CIFAR-like PNGs (gradients plus noise, a colour per class) converted by the convert stage."""
    raw_dir = bench_convert.make_folder(folder / "raw", image_count, side, CLASSES, extension=".png")
    dataset = bench_convert.folder_dataset()
    shards_dir = folder / "shards"
    convert.convert(dataset, seed=0, raw_dir=raw_dir, shards_dir=shards_dir)
    return shards_dir


def in_memory(shards_dir: pathlib.Path, split: str = "train", side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """The split decoded into NumPy arrays, as a script holding its data set in memory has it (not timed)."""
    images, labels = [], []
    for image_batch, label_batch in records.read_split(shards_dir, split, (side, side)).batch(1024):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    return np.concatenate(images), np.concatenate(labels)


def image_data_generator(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Timing:
    """One pass of the seed's ImageDataGenerator over the in-memory images, after a one-batch warm-up."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator  # Keras 3 keeps it there, deprecated

    generator = ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True)
    flow = generator.flow(images, labels, batch_size=batch_size, shuffle=True, seed=0)
    with warnings.catch_warnings():
        # It calls SciPy by a deprecated module path, once per image: a warning per image, not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        next(flow)
        delivered, start, start_cpu = 0, time.perf_counter(), time.process_time()
        for _ in range(len(flow)):
            image_batch, _ = next(flow)
            delivered += len(image_batch)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return Timing("ImageDataGenerator: shift 0.1, flip (NumPy in memory)", delivered, seconds, cpu_seconds)


def training_pipeline(shards_dir: pathlib.Path, batch_size: int, warm_passes: int) -> tuple[Timing, Timing]:
    """(the cold first pass, the warm passes after it) of the train stage's input pipeline, on a fresh dataset."""
    data = inputs.training_data(
        shards_dir,
        image_size=(SIDE, SIDE),
        input_size=(SIDE, SIDE),
        crop_padding=CROP_PADDING,
        augment=AUGMENT,
        batch_size=batch_size,
        shuffle_buffer=20000,
        cache_mb=4096,
        seed=0,
    )
    timings = []
    for passes in (1, warm_passes):
        delivered, start, start_cpu = 0, time.perf_counter(), time.process_time()
        for _ in range(passes):
            for image_batch, _ in data:
                delivered += int(image_batch.shape[0])
        timings.append((delivered, time.perf_counter() - start, time.process_time() - start_cpu))
    return (
        Timing("pipeline, 1st pass (cold: read, decode, fill cache)", *timings[0]),
        Timing(f"pipeline, passes 2-{warm_passes + 1} (warm: from cache)", *timings[1]),
    )


def measure(shards_dir: pathlib.Path, batch_size: int, warm_passes: int) -> dict[str, list[Timing]]:
    images, labels = in_memory(shards_dir)
    runs: dict[str, list[Timing]] = {"anchor": [], "cold": [], "warm": []}
    for _ in range(2):  # alternating, so that a burst of other work hits both alike; the faster run counts
        runs["anchor"].append(image_data_generator(images, labels, batch_size))
        cold, warm = training_pipeline(shards_dir, batch_size, warm_passes)
        runs["cold"].append(cold)
        runs["warm"].append(warm)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=int,
        default=7200,
        help="32x32 images to convert; 70%% form the training split (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per batch, both sides (default: %(default)s)"
    )
    parser.add_argument(
        "--warm-passes", type=int, default=10, help="passes over the cached split timed as warm (default: %(default)s)"
    )
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-input-") as folder:
        shards_dir = make_shards(pathlib.Path(folder), arguments.images)
        train_count = contracts.Manifest.read(shards_dir).count("train")
        runs = measure(shards_dir, arguments.batch_size, arguments.warm_passes)
    fastest = {side: min(timings, key=lambda timing: timing.seconds / timing.images) for side, timings in runs.items()}
    anchor = fastest["anchor"].images_per_second
    ratios = {side: fastest[side].images_per_second / anchor for side in ("cold", "warm")}
    cheapest = {side: max(timing.images_per_cpu_second for timing in timings) for side, timings in runs.items()}
    cpu_ratios = {side: cheapest[side] / cheapest["anchor"] for side in ("cold", "warm")}
    print(
        f"{train_count} training images of {SIDE}x{SIDE}, batches of {arguments.batch_size}; "
        "faster of two alternating runs each"
    )
    bench_report.print_table(
        ["method", "images", "seconds", "images/s", "ratio", "images/CPU s", "CPU ratio"],
        [
            [
                timing.method,
                timing.images,
                timing.seconds,
                timing.images_per_second,
                None if side == "anchor" else f"{ratios[side]:.1f}x",
                cheapest[side],
                None if side == "anchor" else f"{cpu_ratios[side]:.1f}x",
            ]
            for side, timing in fastest.items()
        ],
    )
    report = {
        "images": arguments.images,
        "train_images": train_count,
        "side": SIDE,
        "batch_size": arguments.batch_size,
        "augment": list(AUGMENT),
        "warm_passes": arguments.warm_passes,
        "required_ratio": REQUIRED_RATIO,
        "image_data_generator_images_per_second": round(anchor, 1),
        "pipeline_cold_images_per_second": round(fastest["cold"].images_per_second, 1),
        "pipeline_warm_images_per_second": round(fastest["warm"].images_per_second, 1),
        "ratio_cold": round(ratios["cold"], 2),
        "ratio_warm": round(ratios["warm"], 2),
        "images_per_cpu_second": {side: round(value, 1) for side, value in cheapest.items()},
        "cpu_ratio_cold": round(cpu_ratios["cold"], 2),
        "cpu_ratio_warm": round(cpu_ratios["warm"], 2),
        "runs": {side: [dataclasses.asdict(timing) for timing in timings] for side, timings in runs.items()},
    }
    report["passed"] = bench_report.check("warm pipeline over ImageDataGenerator", ratios["warm"], REQUIRED_RATIO)
    print(f"cold pipeline over ImageDataGenerator: {ratios['cold']:.3g}x (shown, not a goal: the first epoch only)")
    bench_report.write("input_pipeline", report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
