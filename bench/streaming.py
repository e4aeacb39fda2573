"""Training from data larger than memory: the train stage streaming its split from the shards against the same
stage with the split cached in memory.

    python -m bench.streaming                  # keras_cnn at 32x32, 4,000 images, 2 runs of 12 epochs each side
    python -m bench.streaming --images 600 --epochs 3 --runs 1    # quicker, noisier

The shards are bench/input_pipeline.py's CIFAR-like 32x32 PNGs (70% form the training split). Both sides
are `tasks.train.train` with `keras_cnn` and the seed's settings (bench/train_throughput.py), one with
`train.cache_mb` far above the decoded split (cached after the first epoch), one with `train.cache_mb: 0`
(every epoch reads, parses and decodes the shards again, interleaved and prefetched: what a split larger
than memory gets). Both sides run at once on two threads taking their epochs in turns, one epoch of each
after the other (bench/turns.py), so that both meet the same minutes of this machine, whose speed moves;
an epoch is timed by the same callback as train_throughput's, the first and the last left out; each side's
images/s is that of its median epoch. Exits non-zero when streaming delivers less than 0.9x the cached
images/s.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import tempfile

from bench import input_pipeline, train_throughput
from bench import report as bench_report
from bench.turns import Turns
from tasks.common import config, contracts

REQUIRED_RATIO = 0.9
MODEL = "keras_cnn"
SIDES = {"cached": 1_000_000, "streaming": 0}  # train.cache_mb


def measure(shards_dir: pathlib.Path, folder: pathlib.Path, epochs: int, runs: int) -> tuple[dict[str, list], list]:
    """Each side's steady epochs, (wall s, CPU s, matmul rate per wall s, per CPU s) each; the side that ended each
    epoch, in order."""
    matmul = train_throughput.MatmulRate()
    epochs_of, turns_taken = {side: [] for side in SIDES}, []
    for run in range(runs):
        turns = Turns(tuple(SIDES))  # epochs in turns, so that a burst of other work on the host hits both alike
        epoch_ends = {side: train_throughput.EpochEnds(matmul, turns, index) for index, side in enumerate(SIDES)}
        stages = []
        for side, cache_mb in SIDES.items():
            overrides = {
                "train.model": MODEL,
                "train.image_size": [32, 32],
                "train.epochs": epochs,
                "train.cache_mb": cache_mb,
                **train_throughput.MODEL_SETTINGS[MODEL],
            }
            params = config.load_params(train_throughput.PARAMS, overrides)
            stages.append(
                functools.partial(
                    train_throughput.train_stage,
                    params.train,
                    shards_dir,
                    folder / f"{side}-{run}",
                    params.base.seed,
                    epoch_ends[side],
                )
            )
        with train_throughput.quiet_stdout():
            turns.run(*stages)
        for side in SIDES:
            epochs_of[side] += epoch_ends[side].steady_epochs()
        turns_taken += turns.epochs
    return epochs_of, turns_taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="32x32 images to convert (default: %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=12, help="per run, at least 3: ten steady epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--runs", type=int, default=2, help="of each side, each with its epochs in turns (default: %(default)s)"
    )
    arguments = parser.parse_args(argv)
    if arguments.epochs < 3:
        parser.error("--epochs must be at least 3: the first and the last epoch are not timed")
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as folder:
        folder = pathlib.Path(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        try:
            shards_dir = input_pipeline.make_shards(folder, arguments.images)
            train_images = contracts.Manifest.read(shards_dir).count("train")
            epochs_of, turns_taken = measure(shards_dir, folder, arguments.epochs, arguments.runs)
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
    rate = {side: train_images / statistics.median(epoch[0] for epoch in epochs) for side, epochs in epochs_of.items()}
    cpu = {side: statistics.median(epoch[1] for epoch in epochs) / train_images for side, epochs in epochs_of.items()}
    ratio = rate["streaming"] / rate["cached"]
    print(f"{MODEL}, {train_images} training images of 32x32; images/s and CPU of the median epoch")
    bench_report.print_table(
        ["side", "train.cache_mb", "images/s", "CPU ms/image", "ratio"],
        [[side, SIDES[side], rate[side], 1000 * cpu[side], f"{rate[side] / rate['cached']:.3f}x"] for side in SIDES],
    )
    report = {
        "model": MODEL,
        "train_images": train_images,
        "epochs": arguments.epochs,
        "runs": arguments.runs,
        "required_ratio": REQUIRED_RATIO,
        **{f"{side}_images_per_second": round(rate[side], 1) for side in SIDES},
        "ratio": round(ratio, 3),
        "epochs_wall_cpu_matmul": epochs_of,
        "epochs_in_turns": turns_taken,
    }
    report["passed"] = bench_report.check("streaming over cached", ratio, REQUIRED_RATIO)
    bench_report.write("streaming", report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
