"""Stage 2, convert: image folder -> validated, sharded TFRecord files and a manifest.

    python -m tasks.convert         # reads ./params.yaml, writes <paths.shards>/<dataset.name>/

Writes {train,validation,test}-NNNNN-of-NNNNN.tfrecord, manifest.json (classes in label order,
counts per split and class, shard names with record counts and sha256) and rejected.csv (files
that are not readable images, with the reason). The source folder is only read, never changed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib

import numpy as np
import PIL.Image
import tensorflow as tf

from tasks import config, files, records


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    shards_dir: pathlib.Path
    counts: dict[str, int]
    rejected_count: int


@dataclasses.dataclass(frozen=True)
class _Image:
    source: str  # relative to the raw folder, with "/" separators
    label: int
    png: bytes


def convert(dataset: config.DatasetParams, seed: int, raw_dir: pathlib.Path, shards_dir: pathlib.Path) -> ConvertResult:
    """Splits the images of `raw_dir` per class (stratified, seeded) and writes them as shards."""
    class_names = _class_names(raw_dir)
    images, rejected = _read_images(raw_dir, class_names)
    splits = _stratified_split(images, len(class_names), dataset, seed)
    shard_counts = dataset.shards.model_dump()
    manifest = {"dataset": dataset.name, "classes": list(class_names), "seed": seed, "splits": {}}
    with files.staged_directory(shards_dir) as staging:
        for split, split_images in splits.items():
            manifest["splits"][split] = _write_split(staging, split, split_images, shard_counts[split], class_names)
        _write_rejected(staging / records.REJECTED, rejected)
        manifest["rejected"] = len(rejected)
        files.write_json(staging / records.MANIFEST, manifest)
    counts = {split: len(split_images) for split, split_images in splits.items()}
    return ConvertResult(shards_dir=shards_dir, counts=counts, rejected_count=len(rejected))


def _class_names(raw_dir: pathlib.Path) -> tuple[str, ...]:
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir} is not a folder: run the download stage first")
    class_names = tuple(sorted(path.name for path in raw_dir.iterdir() if path.is_dir() and not path.name.startswith(".")))
    if len(class_names) < 2:
        raise ValueError(f"{raw_dir} must hold one sub-folder per class and at least 2 classes, found {list(class_names)}")
    return class_names


def _read_images(raw_dir: pathlib.Path, class_names: tuple[str, ...]) -> tuple[list[_Image], list[tuple[str, str]]]:
    images, rejected = [], []
    for label, class_name in enumerate(class_names):
        paths = sorted(path for path in (raw_dir / class_name).rglob("*") if path.is_file() and not path.name.startswith("."))
        if not paths:
            raise ValueError(f"class folder {raw_dir / class_name} holds no files; add images or remove the folder")
        for path in paths:
            source = path.relative_to(raw_dir).as_posix()
            try:
                images.append(_Image(source=source, label=label, png=_as_rgb_png(path)))
            except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
                rejected.append((source, f"{type(error).__name__}: {error}"))
    return images, rejected


def _as_rgb_png(path: pathlib.Path) -> bytes:
    with PIL.Image.open(path) as image:
        image.load()  # decodes the whole file: truncated data fails here, not in training
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def _stratified_split(images: list[_Image], class_count: int, dataset: config.DatasetParams, seed: int) -> dict[str, list[_Image]]:
    # Per class rather than sklearn's train_test_split: every class gets its exact share in each split
    # even when it has only a handful of images, and one class's images never move another's.
    random = np.random.default_rng(seed)
    splits: dict[str, list[_Image]] = {split: [] for split in records.SPLITS}
    for label in range(class_count):
        members = [image for image in images if image.label == label]
        order = random.permutation(len(members))
        test_count = round(len(members) * dataset.test_fraction)
        validation_count = round(len(members) * dataset.validation_fraction)
        for position, index in enumerate(order):
            split = "test" if position < test_count else "validation" if position < test_count + validation_count else "train"
            splits[split].append(members[index])
    for split, split_images in splits.items():
        if not split_images:
            raise ValueError(
                f"the {split} split is empty: {len(images)} images are too few for "
                f"validation_fraction={dataset.validation_fraction}, test_fraction={dataset.test_fraction}"
            )
        # Shards mix classes, so that reading one shard alone still sees every class.
        splits[split] = [split_images[index] for index in random.permutation(len(split_images))]
    return splits


def _write_split(folder: pathlib.Path, split: str, images: list[_Image], shard_count: int, class_names: tuple[str, ...]) -> dict:
    shard_count = min(shard_count, len(images))
    shards = []
    for index, shard_images in enumerate(np.array_split(np.arange(len(images)), shard_count)):
        name = records.shard_name(split, index, shard_count)
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for position in shard_images:
                image = images[position]
                writer.write(records.serialize(image.png, image.label, image.source))
        shards.append({"file": name, "records": len(shard_images), "sha256": files.sha256_of(folder / name)})
    per_class = {name: 0 for name in class_names}
    for image in images:
        per_class[class_names[image.label]] += 1
    return {"count": len(images), "per_class": per_class, "shards": shards}


def _write_rejected(path: pathlib.Path, rejected: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(rejected)
    files.write_bytes(path, buffer.getvalue().encode())


def main() -> None:
    params = config.load_params()
    result = convert(params.dataset, params.base.seed, params.raw_dir, params.shards_dir)
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    print(f"convert: {counts} images, {result.rejected_count} rejected, in {result.shards_dir}")


if __name__ == "__main__":
    main()
