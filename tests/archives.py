"""Small archives in the official CIFAR-10 binary and flowers formats, and hostile ones, built in memory."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import PIL.Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FLOWER_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def cifar_pixel(label: int, index: int) -> tuple[int, int, int]:
    """The colour of every pixel of record `index` of class `label`: red, green, blue all differ."""
    return (20 * label + 5, index % 256, 250 - 20 * label)


def cifar10_binary(train_per_class_per_batch: int = 2, test_per_class: int = 2) -> bytes:
    """cifar-10-binary.tar.gz in miniature: 1 label byte + 3072 bytes of channel-planar 32x32 RGB per record."""

    def batch(per_class: int) -> bytes:
        rows = []
        for index in range(per_class * len(CIFAR_CLASSES)):
            label = index % len(CIFAR_CLASSES)
            planes = np.zeros((3, 32, 32), dtype=np.uint8)
            for channel, value in enumerate(cifar_pixel(label, index)):
                planes[channel] = value
            rows.append(bytes([label]) + planes.tobytes())
        return b"".join(rows)

    members = {f"data_batch_{number}.bin": batch(train_per_class_per_batch) for number in range(1, 6)}
    members["test_batch.bin"] = batch(test_per_class)
    members["batches.meta.txt"] = ("\n".join(CIFAR_CLASSES) + "\n\n").encode()
    members["readme.html"] = b"<html>CIFAR-10</html>"
    return tar_gz({f"cifar-10-batches-bin/{name}": data for name, data in members.items()})


def jpeg(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def flower_photos(per_class: int = 10) -> bytes:
    """flower_photos.tgz in miniature: flower_photos/<class>/<n>.jpg and flower_photos/LICENSE.txt."""
    members = {"flower_photos/LICENSE.txt": b"All images in this archive are licensed under CC-BY 2.0.\n"}
    for label, name in enumerate(FLOWER_CLASSES):
        for index in range(per_class):
            members[f"flower_photos/{name}/{index:03d}.jpg"] = jpeg((40 * label + 10, 7 * index, 128))
    return tar_gz(members)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A tar.gz holding one good image, then `member`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        good = jpeg((1, 2, 3))
        info = tarfile.TarInfo("pets/cats/good.jpg")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()
