"""The data-change report: what changed since the data the champion was trained on, and the guard on it.

convert writes it (changes.json for programs, changes.md for people) to <paths.data_report>; train
logs both to its MLflow run and the flow shows the Markdown as a Prefect artifact before training.

- per class: images now and before, and the files added, removed and changed (same path, other bytes);
  new and vanished classes;
- images whose split differs from the baseline's (only a change of the fractions or dataset.split_seed moves
  one), and how many of them the champion trained on and are now test images;
- identical files and near-duplicates (difference hashes a few bits apart: the same photo resized or
  re-saved) that sit in two splits (leakage) or under two classes (label conflicts);
- class imbalance; how many files this conversion decoded and how many it took from the last one.

The baseline is the index of the champion's training data (an artifact of its MLflow run), else the
previous conversion's index, else none (a first conversion). The guard stops convert, before any shard
is replaced, when a class vanished or lost more than dataset.max_class_drop of its images: a bad sync,
not new data. dataset.accept_data_changes lets one run through.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from tasks.common import config, contracts, errors, files

CHANGES_JSON = "changes.json"
CHANGES_MARKDOWN = "changes.md"
INDEX_ARTIFACT = "data/index.csv"  # where train logs the shards' index in its MLflow run
NEAR_DUPLICATE_BITS = 3  # of 64; at most 3 lets 4 bands of 16 bits find every such pair (pigeonhole)
_LISTED = 10  # files per class and groups shown in the Markdown; the JSON lists all
_MOST_ALIKE = 20  # images of one difference hash paired: 1,000 blank images make 190 pairs, not 499,500
# Near-duplicate pairs the search keeps. A folder of look-alikes (products on white, generated pictures)
# has millions, which neither memory nor a report holds (60,000 such images took convert to 6.4 GB);
# the report says when the search stopped there.
MOST_NEAR_DUPLICATE_PAIRS = 10_000
_ROWS = 256  # hashes of a bucket compared with all of it at a time: memory grows with the bucket, not its square


@dataclasses.dataclass(frozen=True)
class Baseline:
    kind: str  # champion, previous (conversion) or none
    description: str
    entries: tuple[contracts.IndexEntry, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    values: dict[str, Any]  # what changes.json holds

    @property
    def problems(self) -> list[str]:
        return self.values["guard"]["problems"]

    def markdown(self) -> str:
        return _markdown(self.values)


def baseline(
    model_name: str | None, previous_entries: list[contracts.IndexEntry] | None, shards_dir: pathlib.Path
) -> Baseline:
    """The champion's training data, else the previous shards' index (`previous_entries`), else nothing."""
    champion = _champion_index(model_name) if model_name else None
    if champion is not None:
        return champion
    if previous_entries is not None:
        return Baseline("previous", f"the previous conversion in {shards_dir}", tuple(previous_entries))
    if (shards_dir / contracts.INDEX_FILE).is_file():
        return Baseline("none", f"nothing: the previous conversion in {shards_dir} is unreadable", ())
    return Baseline("none", "nothing: a first conversion", ())


def _champion_index(model_name: str) -> Baseline | None:
    """The index logged by the champion's training run, or None (no champion, no index, no store yet)."""
    import mlflow  # here: a first conversion or one without a model name never pays for importing MLflow

    from tasks.common import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not pathlib.Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # no local store yet: nothing was ever trained here
    client = mlflow.MlflowClient(uri)
    try:
        version = tracking.version_with_alias(client, model_name, tracking.CHAMPION)
        if version is None:
            return None
        with tempfile.TemporaryDirectory() as folder:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=INDEX_ARTIFACT, dst_path=folder, tracking_uri=uri
            )
            entries = contracts.read_index(pathlib.Path(path))
    except mlflow.exceptions.MlflowException as error:
        if error.get_http_status_code() == 404 or "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
            return None  # no such model yet, or a champion trained before the index was logged
        raise errors.Outage(f"MLflow at {errors.without_credentials(uri)}: {error.message}") from None
    description = f"the data champion {model_name} version {version.version} was trained on (run {version.run_id})"
    return Baseline("champion", description, tuple(entries))


def compare(
    base: Baseline,
    entries: list[contracts.IndexEntry],
    class_names: tuple[str, ...],
    dataset: config.DatasetParams,
    conversion: dict[str, int],
) -> Report:
    """The report of `entries` (the new index) against `base`; its guard problems under `dataset`'s limits.
    Only the baseline is indexed by path: the new index is walked, so that the report's memory at 100,000
    images is a few megabytes (a dict and a per-class dict of the new entries, and a list per perceptual
    hash, took 29 MB)."""
    before = {entry.path: entry for entry in base.entries}
    classes, moved = _class_changes(before, entries, class_names)
    into_test = [entry for entry in moved if entry.split == "test" and before[entry.path].split == "train"]
    moved = [entry.path for entry in moved]
    old_classes = {name for name, counts in classes.items() if counts["before"]}
    now_classes = {name for name, counts in classes.items() if counts["now"]}
    values = {
        "baseline": {"kind": base.kind, "description": base.description, "images": len(base.entries)},
        "images": len(entries),
        "conversion": conversion,
        "classes": classes,
        "new_classes": sorted(now_classes - old_classes) if base.entries else [],
        # Without an accepted image: its folder gone, emptied, or every file in it unreadable now.
        "vanished_classes": sorted(old_classes - now_classes),
        "moved_between_splits": {"count": len(moved), "into_test": len(into_test), "files": sorted(moved)},
        "identical": _groups(identical_groups(entries)),
        "near_duplicates": _near_duplicates(entries),
        "imbalance": _imbalance(entries, class_names),
    }
    values["guard"] = {
        "max_class_drop": dataset.max_class_drop,
        "accepted": dataset.accept_data_changes,
        "problems": _problems(values, dataset.max_class_drop),
    }
    return Report(values)


def _class_changes(
    before: dict[str, contracts.IndexEntry], now: list[contracts.IndexEntry], class_names: tuple[str, ...]
) -> tuple[dict[str, dict[str, Any]], list[contracts.IndexEntry]]:
    """(Per class, of the classes now and before: its images before and now, and the paths added, removed and
    changed; the images now in another split than before). One pass over each index: a path names its class
    folder, so the same path is the same class before and now."""
    class_of = operator.attrgetter("class_name")
    before_counts, now_counts = (
        collections.Counter(map(class_of, before.values())),
        collections.Counter(map(class_of, now)),
    )
    added, removed, changed = (collections.defaultdict(list) for _ in range(3))
    moved = []
    for entry in now:
        old = before.get(entry.path)
        if old is None:
            added[entry.class_name].append(entry.path)
        elif old is not entry:  # the very row of the previous index (convert keeps it): nothing changed
            if old.sha256 != entry.sha256:
                changed[entry.class_name].append(entry.path)
            if old.split != entry.split:
                moved.append(entry)
    now_paths = set(map(operator.attrgetter("path"), now))
    for path, old in before.items():
        if path not in now_paths:
            removed[old.class_name].append(path)
    classes = {
        name: {
            "before": before_counts[name],
            "now": now_counts[name],
            "added": sorted(added[name]),
            "removed": sorted(removed[name]),
            "changed": sorted(changed[name]),
        }
        for name in sorted(set(class_names) | set(before_counts))
    }
    return classes, moved


def _problems(values: dict[str, Any], max_class_drop: float) -> list[str]:
    problems = [f"class {name!r} vanished (no images left)" for name in values["vanished_classes"]]
    for name, counts in values["classes"].items():
        lost = len(counts["removed"])
        if counts["now"] and counts["before"] and lost / counts["before"] > max_class_drop:
            problems.append(
                f"class {name!r} lost {lost} of its {counts['before']} images "
                f"({lost / counts['before']:.0%}, more than dataset.max_class_drop {max_class_drop:.0%})"
            )
    return problems


def identical_groups(entries: list[contracts.IndexEntry]) -> list[list[contracts.IndexEntry]]:
    """The rows whose source files have the same bytes, a list of two or more a sha256, in the digests' order
    (convert's manifest lists them too)."""
    counts = collections.Counter(map(operator.attrgetter("sha256"), entries))
    repeated = {digest for digest, count in counts.items() if count > 1}
    if not repeated:
        return []
    by_digest = collections.defaultdict(list)
    for entry in entries:
        if entry.sha256 in repeated:
            by_digest[entry.sha256].append(entry)
    return [by_digest[digest] for digest in sorted(by_digest)]


def _near_duplicates(entries: list[contracts.IndexEntry]) -> dict[str, Any]:
    pairs = _near_duplicate_pairs(entries)
    return {**_groups(pairs), "search_stopped": len(pairs) >= MOST_NEAR_DUPLICATE_PAIRS}


def _near_duplicate_pairs(entries: list[contracts.IndexEntry]) -> list[list[contracts.IndexEntry]]:
    """Pairs of images whose difference hashes differ in at most NEAR_DUPLICATE_BITS bits, at most
    MOST_NEAR_DUPLICATE_PAIRS of them.

    Pairs, not groups: similar pictures chain (a ~ b ~ c), and a chain's ends need not look alike.
    By hand: no library here compares hashes this way. Candidates come from 4 bands of 16 bits (two
    hashes that close agree on a whole band), so the work grows with the images, not their square.
    Images too small for the hash (an empty one) are not compared.
    """
    hashed = [entry for entry in entries if entry.difference_hash]
    # The distinct hashes as numbers, in the order of their hex digits (all 16 long), and each image's among them.
    # From the hex digits of all at once: int() on each was a tenth of the report's time.
    codes = np.frombuffer(bytes.fromhex("".join(entry.difference_hash for entry in hashed)), dtype=">u8").astype(
        np.uint64
    )
    values, hash_of_image, images_per_hash = np.unique(codes, return_inverse=True, return_counts=True)
    close = {(index, index) for index in np.flatnonzero(images_per_hash > 1).tolist()}
    for band in range(4):
        for first, second in _close_in_band(values, band):
            close.update(zip(first.tolist(), second.tolist(), strict=True))
            if len(close) >= MOST_NEAR_DUPLICATE_PAIRS:
                break
    members = _images_of(hashed, hash_of_image, {index for pair in close for index in pair})
    pairs = []
    for first, second in sorted(close):
        left, right = members[first], members[second]
        if first == second:
            pairs += [[a, b] for a in left for b in left if a.path < b.path]
        else:  # each pair in path order, whichever hash sorts first
            pairs += [[a, b] if a.path < b.path else [b, a] for a in left for b in right]
        if len(pairs) >= MOST_NEAR_DUPLICATE_PAIRS:
            return pairs[:MOST_NEAR_DUPLICATE_PAIRS]
    return pairs


def _close_in_band(values: np.ndarray, band: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(first, second) indices of hashes in `values` at most NEAR_DUPLICATE_BITS apart that agree on bits
    16*band to 16*band+15, the smaller index first, a batch at a time.

    Sorted by that band, a bucket of equal keys is a run. Runs of up to _ROWS hashes are compared all at once,
    each hash with the one `offset` places on, offset by offset up to the longest run (about 6 for random
    hashes: a few array operations, not a Python loop per run); longer runs (look-alike pictures) block by block.
    """
    keys = (values >> np.uint64(16 * band)) & np.uint64(0xFFFF)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    boundaries = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts, ends = np.concatenate([[0], boundaries]), np.concatenate([boundaries, [len(order)]])
    short = ends - starts <= _ROWS
    in_short_run = np.repeat(short, ends - starts)
    for offset in range(1, _ROWS):
        same_run = np.flatnonzero(in_short_run[:-offset] & (sorted_keys[offset:] == sorted_keys[:-offset]))
        if not same_run.size:
            break  # no run is longer than `offset`
        first, second = order[same_run], order[same_run + offset]
        near = np.bitwise_count(values[first] ^ values[second]) <= NEAR_DUPLICATE_BITS
        yield np.minimum(first[near], second[near]), np.maximum(first[near], second[near])
    for start, end in zip(starts[~short].tolist(), ends[~short].tolist(), strict=True):
        for first_row in range(start, end - 1, _ROWS):
            rows, columns = order[first_row : min(first_row + _ROWS, end)], order[first_row:end]
            distances = np.bitwise_count(values[rows][:, None] ^ values[columns][None, :])
            row, column = np.nonzero(np.triu(distances <= NEAR_DUPLICATE_BITS, k=1))  # later in the run
            first, second = rows[row], columns[column]
            yield np.minimum(first, second), np.maximum(first, second)


def _images_of(
    hashed: list[contracts.IndexEntry], hash_of_image: np.ndarray, wanted: set[int]
) -> dict[int, list[contracts.IndexEntry]]:
    """The first _MOST_ALIKE images (in index order) of each wanted distinct hash: lists for these hashes
    only, not one for every image's."""
    members = collections.defaultdict(list)
    chosen = np.isin(hash_of_image, np.fromiter(wanted, dtype=np.int64, count=len(wanted)))
    for position in np.flatnonzero(chosen).tolist():
        index = int(hash_of_image[position])
        if len(members[index]) < _MOST_ALIKE:
            members[index].append(hashed[position])
    return members


def _groups(groups: list[list[contracts.IndexEntry]]) -> dict[str, Any]:
    """The groups (or pairs) that matter: in two splits (leakage) or under two classes (label conflicts)."""

    def listed(members):
        return [
            {"path": entry.path, "class": entry.class_name, "split": entry.split}
            for entry in sorted(members, key=lambda entry: entry.path)
        ]

    across_splits = [listed(members) for members in groups if len({entry.split for entry in members}) > 1]
    across_classes = [listed(members) for members in groups if len({entry.class_name for entry in members}) > 1]
    return {
        "groups": len(groups),
        "across_splits": sorted(across_splits, key=lambda group: group[0]["path"]),
        "across_classes": sorted(across_classes, key=lambda group: group[0]["path"]),
    }


def _imbalance(entries: list[contracts.IndexEntry], class_names: tuple[str, ...]) -> dict[str, Any]:
    counts = collections.Counter(map(operator.attrgetter("class_name"), entries))
    largest = max(class_names, key=lambda name: counts[name])
    smallest = min(class_names, key=lambda name: counts[name])
    ratio = round(counts[largest] / counts[smallest], 3) if counts[smallest] else None
    return {
        "largest": largest,
        "largest_images": counts[largest],
        "smallest": smallest,
        "smallest_images": counts[smallest],
        "ratio": ratio,
    }


def write(report: Report, report_dir: pathlib.Path | None) -> None:
    if report_dir is None:
        return
    files.make_folder(report_dir)
    files.write_json(report_dir / CHANGES_JSON, report.values)
    files.write_bytes(report_dir / CHANGES_MARKDOWN, report.markdown().encode("utf-8", "surrogateescape"))


def guard(report: Report, dataset: config.DatasetParams, report_dir: pathlib.Path | None) -> None:
    """Stops the run (BadInput) on the report's problems, unless dataset.accept_data_changes lets them through."""
    if not report.problems or dataset.accept_data_changes:
        return
    where = f"; the report is in {report_dir / CHANGES_MARKDOWN}" if report_dir else ""
    raise errors.BadInput(
        f"the data changed more than a nightly run should accept, since {report.values['baseline']['description']}: "
        + "; ".join(report.problems)
        + ". If the source folder lost these images by mistake, restore them; if the change is intended, "
        "set dataset.accept_data_changes: true for one run (then back to false)" + where
    )


def summary_line(report: Report) -> str:
    """One line for logs: what changed, against what."""
    values = report.values
    added = sum(len(counts["added"]) for counts in values["classes"].values())
    removed = sum(len(counts["removed"]) for counts in values["classes"].values())
    changed = sum(len(counts["changed"]) for counts in values["classes"].values())
    conversion = values["conversion"]
    moved = values["moved_between_splits"]
    return (
        f"{added} added, {removed} removed, {changed} changed since {values['baseline']['description']}; "
        f"{conversion['decoded']} file(s) decoded, {conversion['reused']} taken from the previous shards"
        + (
            f"; {moved['count']} moved between splits (a fraction or dataset.split_seed changed), "
            f"{moved['into_test']} of them from the baseline's training split into test"
            if moved["count"]
            else ""
        )
    )


def _markdown(values: dict[str, Any]) -> str:
    lines = [
        "# Data changes",
        "",
        f"Compared with {values['baseline']['description']} ({values['baseline']['images']:,} images). "
        f"Now {values['images']:,} images; "
        f"{values['conversion']['decoded']:,} file(s) decoded, {values['conversion']['reused']:,} taken from the "
        f"previous shards, {values['conversion']['rejected']:,} rejected.",
        "",
        "| class | before | now | added | removed | changed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, counts in values["classes"].items():
        lines.append(
            f"| {name} | {counts['before']:,} | {counts['now']:,} | {len(counts['added']):,} | "
            f"{len(counts['removed']):,} | {len(counts['changed']):,} |"
        )
    lines += ["", *_findings(values), "", *_listings(values)]
    return "\n".join(lines).rstrip() + "\n"


def _findings(values: dict[str, Any]) -> list[str]:
    guard = values["guard"]
    verdict = (
        "passed"
        if not guard["problems"]
        else ("let through by dataset.accept_data_changes: " if guard["accepted"] else "**stopped the run**: ")
        + "; ".join(guard["problems"])
    )
    moved = values["moved_between_splits"]
    imbalance = values["imbalance"]
    identical, near = values["identical"], values["near_duplicates"]
    return [
        f"- Guard (a class vanished or lost more than {guard['max_class_drop']:.0%}): {verdict}",
        f"- New classes: {', '.join(values['new_classes']) or 'none'}; "
        f"vanished: {', '.join(values['vanished_classes']) or 'none'}",
        f"- Moved between splits: {moved['count']:,}"
        + (f", {moved['into_test']:,} of them now test images the baseline trained on" if moved["into_test"] else ""),
        f"- Identical files in two splits: {len(identical['across_splits'])} group(s); "
        f"under two classes: {len(identical['across_classes'])}",
        f"- Near-duplicate pairs (difference hash within {NEAR_DUPLICATE_BITS} bits) in two splits: "
        f"{len(near['across_splits'])}; under two classes: {len(near['across_classes'])}"
        + (
            f" (the search stopped at {MOST_NEAR_DUPLICATE_PAIRS:,} pairs: many images look alike)"
            if near.get("search_stopped")
            else ""
        ),
        f"- Imbalance: largest {imbalance['largest']!r} {imbalance['largest_images']:,}, smallest "
        f"{imbalance['smallest']!r} {imbalance['smallest_images']:,}"
        + (f" ({imbalance['ratio']:g}x)" if imbalance["ratio"] else ""),
    ]


def _listings(values: dict[str, Any]) -> list[str]:
    lines = []
    for kind in ("added", "removed", "changed"):
        for name, counts in values["classes"].items():
            if counts[kind] and values["baseline"]["kind"] != "none":
                shown = ", ".join(f"`{path}`" for path in counts[kind][:_LISTED])
                more = f" and {len(counts[kind]) - _LISTED:,} more" if len(counts[kind]) > _LISTED else ""
                lines.append(f"- {kind} in {name}: {shown}{more}")
    for title, groups in (
        ("Near-duplicates in two splits", values["near_duplicates"]["across_splits"]),
        ("Near-duplicates under two classes", values["near_duplicates"]["across_classes"]),
    ):
        for group in groups[:_LISTED]:
            members = ", ".join(f"`{item['path']}` ({item['class']}, {item['split']})" for item in group)
            lines.append(f"- {title}: {members}")
    return lines + (["", f"Every file is listed in {CHANGES_JSON}."] if lines else [])
