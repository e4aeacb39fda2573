"""The input pipeline and training throughput benchmarks run end to end on tiny sizes and write their reports.

Only that they run and report sane figures: their goals are checked by running them on full sizes
(docs/benchmarks.md), never in the test suite.
"""

import json
import statistics

import pytest

from bench import input_pipeline, streaming, train_throughput


def test_input_pipeline_benchmark_reports_both_sides(workdir):
    input_pipeline.main(["--images", "300", "--batch-size", "32", "--warm-passes", "1"])
    report = json.loads((workdir / "reports" / "bench" / "input_pipeline.json").read_text())
    assert report["benchmark"] == "input_pipeline" and report["machine"]["cores"] >= 1
    assert 180 <= report["train_images"] <= 240, "about 70% of the images form the training split"
    sides = ("anchor_cold", "anchor_warm", "cold", "warm")
    for side in sides:
        assert report[f"{side}_images_per_second"] > 0
    assert report["cpu_ratio_warm"] > 0
    assert report["ratio_warm"] == round(report["warm_images_per_second"] / report["anchor_warm_images_per_second"], 2)
    assert [len(report["runs"][side]) for side in sides] == [2, 2, 2, 2]
    for run in report["runs"]["anchor_cold"]:
        # Keras takes 70% of all files, convert 70% of each class: a few images apart.
        assert abs(run["images"] - report["train_images"]) <= 0.1 * report["train_images"], run
    assert isinstance(report["passed"], bool)


def test_train_throughput_benchmark_reports_ratio_and_flop_fraction(workdir):
    train_throughput.main(
        ["--images", "100", "--epochs", "4", "--runs", "1", "--models", "cifar10_tutorial", "--batch-size", "32"]
    )
    report = json.loads((workdir / "reports" / "bench" / "train_throughput.json").read_text())
    assert report["benchmark"] == "train_throughput"
    figures = report["models"]["cifar10_tutorial"]
    assert figures["matmul_flops_per_second"] > 1e8 and figures["matmul_flops_per_cpu_second"] > 1e8
    # conv1 24x24x64x(5x5x3) + conv2 12x12x64x(5x5x64) + local3 2304x384 + local4 384x192 + logits 192x10
    # multiply-adds, x2
    assert figures["forward_flops_per_image"] == 2 * (
        24 * 24 * 64 * 75 + 12 * 12 * 64 * 1600 + 2304 * 384 + 384 * 192 + 192 * 10
    )
    assert figures["training_flops_per_image"] == 3 * figures["forward_flops_per_image"]
    stage, bare = figures["stage_epochs_wall_cpu_matmul"], figures["bare_epochs_wall_cpu_matmul"]
    assert len(stage) == len(bare) == 2, "of 4 epochs, the first and the last are not timed"
    assert figures["epochs_in_turns"] == ["bare", "stage"] * 4, "one epoch of each side after the other"
    # The median epoch of each side, not the fastest one: about 70 of the 100 images form the training split.
    assert 55 <= report["train_images"] <= 85
    assert figures["stage_images_per_second"] == pytest.approx(
        report["train_images"] / statistics.median(epoch[0] for epoch in stage), rel=1e-3
    )
    assert figures["ratio"] == pytest.approx(
        statistics.median(epoch[0] for epoch in bare) / statistics.median(epoch[0] for epoch in stage), abs=1e-3
    )
    assert figures["throughput_ratio"] == pytest.approx(
        sum(epoch[0] for epoch in bare) / sum(epoch[0] for epoch in stage), abs=1e-3
    )
    assert 0 < figures["flop_fraction"] < 1 and 0 < figures["cpu_flop_fraction"] < 1.5
    assert isinstance(report["passed"], bool)


def test_streaming_benchmark_compares_the_stage_with_and_without_its_cache(workdir):
    streaming.main(["--images", "100", "--epochs", "3", "--runs", "1"])
    report = json.loads((workdir / "reports" / "bench" / "streaming.json").read_text())
    assert report["benchmark"] == "streaming" and 55 <= report["train_images"] <= 85
    epochs = report["epochs_wall_cpu_matmul"]
    assert [len(epochs["cached"]), len(epochs["streaming"])] == [1, 1], "of 3 epochs, the first and last are not timed"
    assert report["epochs_in_turns"] == ["cached", "streaming"] * 3, "one epoch of each side after the other"
    assert report["streaming_images_per_second"] == pytest.approx(
        report["train_images"] / epochs["streaming"][0][0], rel=1e-3
    )
    assert report["ratio"] == pytest.approx(epochs["cached"][0][0] / epochs["streaming"][0][0], abs=1e-3)
    assert isinstance(report["passed"], bool)
