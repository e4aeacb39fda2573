"""End to end: the README's default pipeline, from an empty data/ to a registered model.

    python -m bench.end_to_end

In a fresh copy of the repository (git and DVC, no data, no dvc.lock, no DVC cache, a new MLflow
store) in a temporary folder, runs `dvc repro` with the default params.yaml, as `make pipeline` does,
and times it. Prints where the time went (each stage from DVC's "Running stage" line to the next),
the test precision@1 from reports/metrics.json and the registry result from reports/registry.json;
writes reports/bench/end_to_end.json and exits non-zero when the run takes longer than 3 minutes or
precision@1 is below 0.99.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile

from bench import orchestration, workspace
from bench import report as bench_report

MAX_SECONDS = 180.0
MIN_PRECISION = 0.99


def stage_seconds(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Seconds from each "Running stage '<name>':" line to the next one (the last one: to the end)."""
    starts = [
        (arrived, match["name"])
        for arrived, line in lines
        if (match := re.match(r"Running stage '(?P<name>[^']+)'", line))
    ]
    ends = [arrived for arrived, _ in starts[1:]] + [total]
    # strict=False: with no stage line, starts is empty while ends still holds the total.
    return {name: end - begun for (begun, name), end in zip(starts, ends, strict=False)}


def measure(folder: pathlib.Path) -> dict:
    copy = workspace.copy_repository(folder / "repository")
    seconds, cpu_seconds, lines = orchestration.run_timed(["dvc", "repro"], copy, orchestration.environment())
    metrics = json.loads((copy / "reports" / "metrics.json").read_text())
    registry = json.loads((copy / "reports" / "registry.json").read_text())
    precision = metrics["precision_at_1"]
    return {
        "command": "dvc repro",
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "stages": {name: round(value, 2) for name, value in stage_seconds(lines, seconds).items()},
        "precision_at_1": precision,
        "test_images": metrics["images"],
        "registry": registry,
        "max_seconds": MAX_SECONDS,
        "min_precision": MIN_PRECISION,
        "passed": seconds <= MAX_SECONDS and precision >= MIN_PRECISION,
    }


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-end-to-end-") as folder:
        report = measure(pathlib.Path(folder))
    print("dvc repro with the default params.yaml, from an empty data/ and no DVC cache")
    rows = [[name, seconds, f"{100 * seconds / report['seconds']:.0f}%"] for name, seconds in report["stages"].items()]
    rows.append(["total (wall)", report["seconds"], "100%"])
    rows.append(["total (CPU, every process)", report["cpu_seconds"], ""])
    bench_report.print_table(["stage", "seconds", "share"], rows)
    registry = report["registry"]
    print(
        f"registry: {registry['model_name']} version {registry['version']}, "
        f"alias {registry['alias']}: {registry['reason']}"
    )
    time_met = bench_report.check(
        "end to end wall time", report["seconds"], MAX_SECONDS, higher_is_better=False, unit=" s"
    )
    precision_met = bench_report.check(
        f"test precision@1 ({report['test_images']} images)", report["precision_at_1"], MIN_PRECISION, unit=""
    )
    bench_report.write("end_to_end", report)
    return 0 if time_met and precision_met else 1


if __name__ == "__main__":
    sys.exit(main())
