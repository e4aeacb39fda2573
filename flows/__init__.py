"""The Prefect flow of the pipeline, its deployment and the folder watcher.

Importing tasks first turns the libraries' console chatter down before flows/ imports Keras or MLflow.
"""

import tasks  # noqa: F401 - see tasks/__init__.py
