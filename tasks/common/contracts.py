"""What the stages hand each other on disk: each file typed here, with one writer and one reader.

    raw folder      layout.json         download writes, convert reads         Layout
    shards folder   manifest.json       convert writes; train, evaluate read   Manifest
                    index.csv           convert writes; convert (its next run),
                                        train (logs it) and the report read    IndexEntry
    model folder    run.json, labels.json, preprocessing.json, model.keras
                                        train writes; evaluate, register,
                                        predict and the flow read              RunRecord, Preprocessing, MODEL_FILE ...
    metrics file    metrics.json        evaluate writes; register reads        Scores
    registry file   registry.json       register writes; the flow reads        Decision

The JSON keys are the ones `dvc metrics show`, MLflow and earlier releases know; a file that does not
hold what its reader needs stops the stage with a message naming it and the stage that writes it.
No stage imports another stage: what they share is here.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import operator
import pathlib
import re
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

import pydantic

from tasks.common import config, errors, files

# The raw folder (download -> convert).
LAYOUT_FILE = "layout.json"
# The shards folder (convert -> train, evaluate, register).
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.csv"
INDEX_FILE = "index.csv"
SPLITS = ("train", "validation", "test")
# The model folder (train -> evaluate, register, predict).
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
PREPROCESSING_FILE = "preprocessing.json"
HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"
RUN_FILE = "run.json"
# In <paths.evaluation>: one row per test image (file, actual, predicted, confidence); register compares
# a challenger with the champion image by image through it.
PREDICTIONS_FILE = "predictions.csv"
REVIEW_FILE = "review.csv"  # evaluate's images for a person to look at (likely label errors, then high loss)


class _Contract(pydantic.BaseModel):
    # Extra keys are kept, not refused: a file written by a newer release still reads.
    model_config = pydantic.ConfigDict(frozen=True, extra="allow")


Contract = TypeVar("Contract", bound=_Contract)


def _read(kind: type[Contract], path: pathlib.Path, remedy: str) -> Contract:
    value = files.read_json(path, remedy)
    try:
        return kind.model_validate(value)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors()[:3])
        raise errors.BadInput(f"{path} does not hold what it should ({problems}): {remedy}") from None


def _write(value: _Contract, path: pathlib.Path) -> None:
    files.write_json(path, value.model_dump(mode="json", exclude_none=True))


class Layout(_Contract):
    """Where the raw data came from and which split folders it brings."""

    source: str
    archive_sha256: str | None = None
    splits: tuple[str, ...] = ()
    fingerprint: str | None = None  # of a user's folder: download reruns when it changes

    def write(self, raw_dir: pathlib.Path) -> None:
        _write(self, raw_dir / LAYOUT_FILE)

    @classmethod
    def read(cls, raw_dir: pathlib.Path) -> Layout | None:
        """The layout, or None for a plain folder of class folders that no download stage wrote."""
        path = raw_dir / LAYOUT_FILE
        return _read(cls, path, "rerun the download stage") if path.is_file() else None


class Shard(_Contract):
    file: str
    records: int
    sha256: str
    image_bytes: int | None = None  # of its records' encoded images, which the shards are sized by; None: not recorded


class Split(_Contract):
    count: int
    per_class: dict[str, int]
    shards: list[Shard]
    # The power of two of shards its images are spread over by place (splits.shard_of); those that no image falls
    # in have no file. None: a release that filled shards in order wrote them.
    shard_slots: int | None = None


class Manifest(_Contract):
    """The data set as convert wrote it: classes, counts, shards with their checksums, data checks."""

    dataset: str
    classes: list[str]
    seed: int
    image_size: list[int] | None
    source_splits: list[str]
    files_seen: int
    accepted: int
    rejected: int
    encodings: dict[str, int]
    per_class: dict[str, int]
    imbalance: dict[str, Any]
    duplicates: dict[str, Any]
    splits: dict[str, Split]
    difference_hash_version: int = 1  # images.DIFFERENCE_HASH_VERSION of the index's hashes; 1 before it was recorded

    def write(self, shards_dir: pathlib.Path) -> None:
        # image_size null means "each image's own size": written even when None.
        files.write_json(shards_dir / MANIFEST_FILE, self.model_dump(mode="json"))

    @classmethod
    def read(cls, shards_dir: pathlib.Path) -> Manifest:
        return _read(cls, shards_dir / MANIFEST_FILE, "run the convert stage first")

    def count(self, split: str) -> int:
        return self.splits[split].count

    def shards(self) -> list[Shard]:
        """Every split's shards, split after split."""
        return [shard for split in self.splits.values() for shard in split.shards]


@dataclasses.dataclass(slots=True)
class IndexEntry:
    """One accepted image of the shards: where it came from, its class and split, and its hashes.

    A dataclass, not a pydantic model: a million rows read in a second, not in twenty; without a __dict__
    each (slots): 48 bytes less an image in convert, which holds every image's. Not frozen, whose __init__
    sets each field through object.__setattr__: reading a nightly run's 50,000 rows took 0.13 s, 0.065 s
    this way (a named tuple reads as fast, with 16 bytes more a row). Nothing changes a row once made.
    """

    path: str  # relative to the raw folder, "/"-separated, as named on disk
    class_name: str
    split: str
    sha256: str  # of the source file's bytes
    difference_hash: str  # images.difference_hash: 16 hex digits
    encoding: str  # how the record stores it: original, jpeg or png


_INDEX_COLUMNS = [field.name for field in dataclasses.fields(IndexEntry)]
# With a comma or a line feed (counted instead): what makes a row more than its fields joined.
_QUOTED = re.compile('["\r]')


def write_index(shards_dir: pathlib.Path, entries: Iterable[IndexEntry]) -> None:
    # Written row by row, not built in memory first: at 100,000 images the text and its encoded copy
    # were 40 MB, the largest part of convert's peak.
    # surrogateescape: a file name that is not valid UTF-8 is written back as the bytes it has on disk.
    with (
        files.staged_file(shards_dir / INDEX_FILE) as staged,
        staged.open("w", newline="", encoding="utf-8", errors="surrogateescape") as stream,
    ):
        files.write_csv_rows(stream, [_INDEX_COLUMNS])
        # Not dataclasses.astuple, which deep-copies every field: a tenth of a nightly conversion's time.
        rows = map(operator.attrgetter(*_INDEX_COLUMNS), entries)
        while chunk := list(itertools.islice(rows, 4096)):
            _write_rows(stream, chunk)


def _write_rows(stream: TextIO, rows: list[tuple[str, ...]]) -> None:
    """The rows as files.write_csv_rows writes them. The csv module quotes only a field holding a comma, a quote
    or a line feed; rows without any (nor a carriage return) are their fields joined, which is written here in a
    quarter of csv.writer's time (0.09 s for a nightly run's 50,000 rows), checked a chunk at a time: a chunk
    holding one such character anywhere goes through files.write_csv_rows."""
    text = "".join([",".join(row) + "\n" for row in rows])
    columns = len(_INDEX_COLUMNS)
    if text.count(",") == (columns - 1) * len(rows) and text.count("\n") == len(rows) and not _QUOTED.search(text):
        stream.write(text)
    else:
        files.write_csv_rows(stream, rows)


def read_index(path: pathlib.Path) -> list[IndexEntry]:
    """The rows of an index file (`path`: the file, or the shards folder holding it)."""
    path = path / INDEX_FILE if path.is_dir() else path
    remedy = "it is written by the convert stage: run it again"
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as stream:
            reader = csv.reader(stream)
            if next(reader, None) != _INDEX_COLUMNS:
                raise errors.BadInput(f"{path} does not start with the columns {','.join(_INDEX_COLUMNS)}: {remedy}")
            return [IndexEntry(*row) for row in reader]
    except FileNotFoundError:
        raise errors.MissingInput(f"{path} is missing: {remedy}") from None
    except TypeError:  # a row with too few or too many cells
        raise errors.BadInput(f"{path} holds a row that is not {len(_INDEX_COLUMNS)} cells: {remedy}") from None


class Preprocessing(_Contract):
    """How an image reaches the network: convert resized it to `stored_size` ([height, width]; None: kept
    its size), then it is resized to `image_size` and centre-cropped to `input_size`. The saved model does
    the last two itself; predict does the first as convert did."""

    stored_size: tuple[int, int] | None = None
    image_size: tuple[int, int]
    input_size: tuple[int, int]

    def write(self, model_dir: pathlib.Path) -> None:
        _write(self, model_dir / PREPROCESSING_FILE)

    @classmethod
    def read(cls, model_dir: pathlib.Path) -> Preprocessing:
        return _read(cls, model_dir / PREPROCESSING_FILE, "run the train stage first")


class RunRecord(_Contract):
    """The MLflow run of the model in the model folder; written last by train, so that a folder without
    it is never taken for a finished model."""

    run_id: str
    experiment_id: str
    tracking_uri: str  # never with a password: the file is a DVC output, cached and pushed
    model_uri: str
    dataset: str
    manifest_sha256: str

    def write(self, model_dir: pathlib.Path) -> None:
        _write(
            self.model_copy(update={"tracking_uri": errors.without_credentials(self.tracking_uri)}),
            model_dir / RUN_FILE,
        )

    @classmethod
    def read(cls, model_dir: pathlib.Path) -> RunRecord:
        return _read(cls, model_dir / RUN_FILE, "run the train stage first")


def write_labels(model_dir: pathlib.Path, class_names: list[str]) -> None:
    files.write_json(model_dir / LABELS_FILE, list(class_names))


def read_labels(model_dir: pathlib.Path) -> list[str]:
    labels = files.read_json(model_dir / LABELS_FILE, "the class names written beside the model by the train stage")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise errors.BadInput(f"{model_dir / LABELS_FILE} must hold a list of class names; rerun the train stage")
    return labels


class Averages(_Contract):
    precision: float
    recall: float
    f1: float


class Scores(_Contract):
    """metrics.json: the headline test metrics (`dvc metrics show` reads the same file)."""

    precision_at_1: float
    loss: float
    images: int
    top_5: float | None = None  # only with more than 5 classes
    macro_avg: Averages
    weighted_avg: Averages

    def write(self, metrics_path: pathlib.Path) -> None:
        _write(self, metrics_path)

    @classmethod
    def read(cls, metrics_path: pathlib.Path) -> Scores:
        return _read(cls, metrics_path, "run the evaluate stage first")

    def flat(self) -> dict[str, float]:
        """{"macro_avg_f1": 0.9, ...}: MLflow metrics and tags are flat."""
        return {key: float(value) for key, value in config.flatten(self.model_dump(exclude_none=True), "_").items()}


class Decision(_Contract):
    """registry.json: which version the run became and why it got its alias."""

    model_name: str
    version: str
    alias: str
    reason: str
    run_id: str
    model_uri: str
    evidence: str | None = None  # the gate's comparison with the champion, in words (none: no champion to compare)
    forced: str | None = None  # a person's promotion past the gate: who, when and why
    # The verified exports' table and the served-model check hold times measured at registration: they are in
    # the run's registration/gate.json, not here, so that registering again writes the same file.

    def write(self, registry_path: pathlib.Path) -> None:
        _write(self, registry_path)

    @classmethod
    def read(cls, registry_path: pathlib.Path) -> Decision:
        return _read(cls, registry_path, "run the register stage first")
