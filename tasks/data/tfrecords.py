"""The shards' records, written and read without TensorFlow: convert's side of the schema in tasks/data/records.py.

A shard is a TFRecord file of tf.train.Example records, each holding one image:
- a TFRecord file is a sequence of records, each framed as: its length (uint64, little-endian), the masked
  CRC-32C of those 8 bytes (uint32), the record, the masked CRC-32C of the record (uint32);
- a record is an Example protocol buffer (tensorflow/core/example/example.proto): a map from feature name to
  a list of bytes or of int64, here "image/encoded" (the JPEG or PNG), "image/class/label" (the index into
  the manifest's classes) and "image/source" (the path it came from, relative to the raw folder).

Not with tf.io.TFRecordWriter and tf.train.Example: convert would import TensorFlow for them alone, 5 s of every
run's start on 2 cores (longer than a nightly run's own work). The Example's generated classes ship only with
TensorFlow (importing them imports it), so the messages convert uses are declared here, field for field as
example.proto and feature.proto declare them, and protobuf's own runtime reads and writes them; the framing is
these few lines around google_crc32c. The bytes are those TensorFlow writes (tests/test_tfrecords.py compares
them), and train and evaluate read the shards with tf.data.
"""

from __future__ import annotations

import functools
import os
import pathlib
import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tasks.common import errors

ENCODED = "image/encoded"
LABEL = "image/class/label"
SOURCE = "image/source"
# A record's framing: its length and that length's CRC before it, the record's CRC after it.
FRAME_HEAD = 12
FRAME_TAIL = 4


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def serialize(encoded: bytes, label: int, source: str) -> bytes:
    """The Example record of one image. Deterministic: a map's entries in key order, as TensorFlow writes them
    when asked to; otherwise their order follows the process's string hash seed, and `dvc repro` in another
    process would write other shard bytes."""
    example = _example_class()()
    features = example.features.feature
    features[ENCODED].bytes_list.value.append(encoded)
    features[LABEL].int64_list.value.append(label)
    features[SOURCE].bytes_list.value.append(os.fsencode(source))
    return example.SerializeToString(deterministic=True)


def parse(serialized: bytes) -> tuple[bytes, int, str]:
    """(encoded image, label, source path) of an Example record."""
    features = _example_class().FromString(serialized).features.feature
    return (
        features[ENCODED].bytes_list.value[0],
        features[LABEL].int64_list.value[0],
        os.fsdecode(features[SOURCE].bytes_list.value[0]),
    )


def write_record(stream: BinaryIO, record: bytes) -> None:
    """Appends one record to an open TFRecord file, framed."""
    stream.write(frame(record))


def frame(record: bytes) -> bytes:
    """One record as a TFRecord file holds it: its length and that length's CRC, the record, the record's CRC."""
    length = struct.pack("<Q", len(record))
    return b"".join((length, struct.pack("<I", _masked_crc(length)), record, struct.pack("<I", _masked_crc(record))))


def iterate_records(data: bytes, path: pathlib.Path) -> Iterator[tuple[int, bytes, str, bytes]]:
    """(offset, serialized record, source path, encoded image) of every record in `data`, a shard's bytes.

    The CRCs are not checked: callers check the whole shard's sha256 first.
    """
    position = 0
    while position < len(data):
        (length,) = struct.unpack_from("<Q", data, position)
        start, end = position + FRAME_HEAD, position + FRAME_HEAD + length
        if end + FRAME_TAIL > len(data):
            raise errors.BadInput(f"shard {path} ends inside a record: it is cut off; run the convert stage again")
        serialized = data[start:end]
        encoded, _, source = parse(serialized)
        yield start, serialized, source, encoded
        position = end + FRAME_TAIL


def _masked_crc(data: bytes) -> int:
    """TFRecord's check value: the CRC-32C rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.cache
def _example_class() -> type:
    """tensorflow.Example's message class, declared with the fields the shards use: the same numbers and types
    give the same bytes. Feature's float_list (2), which no record here holds, is left out."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="tasks/example.proto", package="tensorflow", syntax="proto3")

    def add(message, name, number, kind, type_name=None, repeated=False, oneof=None):
        label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
        added = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            added.type_name = type_name
        if oneof is not None:
            added.oneof_index = oneof

    add(proto.message_type.add(name="BytesList"), "value", 1, field.TYPE_BYTES, repeated=True)
    add(proto.message_type.add(name="Int64List"), "value", 1, field.TYPE_INT64, repeated=True)  # packed in proto3
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    add(feature, "bytes_list", 1, field.TYPE_MESSAGE, ".tensorflow.BytesList", oneof=0)
    add(feature, "int64_list", 3, field.TYPE_MESSAGE, ".tensorflow.Int64List", oneof=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")  # map<string, Feature> feature = 1
    entry.options.map_entry = True
    add(entry, "key", 1, field.TYPE_STRING)
    add(entry, "value", 2, field.TYPE_MESSAGE, ".tensorflow.Feature")
    add(features, "feature", 1, field.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry", repeated=True)
    add(proto.message_type.add(name="Example"), "features", 1, field.TYPE_MESSAGE, ".tensorflow.Features")
    pool = descriptor_pool.DescriptorPool()  # its own pool: never in conflict with TensorFlow's, when loaded
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))
