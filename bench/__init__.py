"""Benchmarks: each measures the pipeline against what a team would use instead, in the same run.

Importing the package imports `tasks` first, which turns TensorFlow's console chatter down before any
benchmark module imports TensorFlow itself.
"""

import tasks  # noqa: F401
