"""The data sources `dataset.name` can name: one module each in this folder, found by its file name.

A source module has
    write(dataset, staging, downloads_dir) -> contracts.Layout
        fills `staging` (the raw folder being written) with [<split>/]<class>/<image> files;
    check(dataset) -> None
        raises errors.BadInput for settings the source cannot use (config calls it);
    changed(dataset, raw_dir) -> bool, optional
        whether the source may hold other data than the raw folder was made from, though no setting
        changed (a user's folder, a URL); without it, only a changed setting downloads again.
Its heavy imports (NumPy, Pillow, scikit-learn) go inside its functions: config reads this registry on
every command. Adding a source: a module here and its test; dvc.yaml's download stage depends on this
whole folder.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
from types import ModuleType

FOLDER = pathlib.Path(__file__).parent


def names() -> tuple[str, ...]:
    """Every source, by module name."""
    return tuple(
        sorted(module.name for module in pkgutil.iter_modules([str(FOLDER)]) if not module.name.startswith("_"))
    )


def load(name: str) -> ModuleType:
    """The module of source `name`."""
    if name not in names():
        raise ValueError(f"unknown data source {name!r}; the sources are {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")
