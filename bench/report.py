"""What every benchmark shares: the machine it ran on, its table, its JSON report and its verdict.

Each benchmark measures its anchor and the pipeline in the same process, prints one table, writes
reports/bench/<name>.json (with the machine, so that a figure is never read without it) and exits
non-zero when a goal is missed.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess

from tasks.common.machine import usable_cores

REPORT_DIR = pathlib.Path("reports/bench")


def machine() -> dict:
    """The facts that limit a figure: cores this process may use, processor, Python and TensorFlow versions."""
    facts = {
        "cores": usable_cores(),
        "processor": _processor_name(),
        "python": platform.python_version(),
        "load_average": _load_average(),
    }
    try:
        import tasks  # noqa: F401, I001 - first: turns TensorFlow's start-up notices down
        import tensorflow as tf

        facts["tensorflow"] = tf.__version__
        facts["gpus"] = [device.name for device in tf.config.list_physical_devices("GPU")]
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):  # also where TensorFlow is not installed
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True
        )
        facts["nvidia_gpus"] = query.stdout.strip().splitlines()
    return facts


def _processor_name() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load_average() -> float | None:
    """The 1-minute load average when the run ends: above the core count, other work shared the machine."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain text table, columns as wide as their widest cell; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[index]) for row in cells)) for index, header in enumerate(headers)]
    numeric = [
        all(isinstance(row[index], (int, float)) or row[index] in ("", None) for row in rows)
        for index in range(len(headers))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        )

    print(line(headers))
    for row in cells:
        print(line(row))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def check(
    name: str, measured: float, required: float, higher_is_better: bool = True, unit: str = "x", enforced: bool = True
) -> bool:
    """Prints the goal's verdict and returns whether it was met; a goal not `enforced` here is shown with its
    verdict and counts as met."""
    passed = measured >= required if higher_is_better else measured <= required
    relation = ">=" if higher_is_better else "<="
    verdict = ("passed" if passed else "FAILED") if enforced else f"{'met' if passed else 'missed'}, not checked here"
    print(f"{name}: {measured:.4g}{unit}, goal {relation} {required:g}{unit}: {verdict}")
    return passed or not enforced


def write(name: str, report: dict) -> pathlib.Path:
    """reports/bench/<name>.json, with the machine added."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **report}, indent=2) + "\n")
    print(f"report: {path}")
    return path
