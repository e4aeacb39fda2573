"""The incremental-convert benchmark's machinery on a small folder: its figures come from real conversions."""

import json

from bench import incremental_convert


def test_incremental_convert_benchmark_reports_both_conversions(workdir):
    incremental_convert.main(["--images", "300", "--added", "7", "--side", "64"])
    report = json.loads((workdir / "reports" / "bench" / "incremental_convert.json").read_text())
    assert report["benchmark"] == "incremental_convert" and report["goal"] == 0.05
    assert set(report["cases"]) == {"keep size", "resize to 224x224"}
    for case in report["cases"].values():
        assert case["images"] in (307, 314), "the second case adds 7 more to the same folder"
        assert case["decoded_incremental"] == 7 and case["decoded_full"] == case["images"]
        assert case["byte_identical"] is True
        assert len(case["incremental_runs"]) == len(case["full_runs"]) == 2, "two rounds by default"
        assert case["full_seconds"] == min(case["full_runs"])
        assert case["incremental_seconds"] == min(case["incremental_runs"])
        # The seconds are rounded to hundredths, the ratio is of the unrounded times.
        assert abs(case["ratio"] * case["full_seconds"] - case["incremental_seconds"]) < 0.01
