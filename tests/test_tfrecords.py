"""convert's records, written without TensorFlow, are what TensorFlow itself writes and reads."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tasks.common import errors
from tasks.data import records, tfrecords
from tests.conftest import REPOSITORY

CASES = [
    (b"\xff\xd8 a small JPEG", 0, "class_0/a.jpg"),
    (bytes(range(256)) * 700, 1, "class_1/café/日本語.png"),  # over 128 KB: lengths of three varint bytes
    (b"", 300, "c/empty"),  # a label of two varint bytes
    (b"x", 2**40, "c/\udcff-not-utf8.jpg"),  # a name whose bytes are not UTF-8, as os.fsencode keeps them
]


def _tensorflow_example(encoded: bytes, label: int, source: bytes) -> tf.train.Example:
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "image/source": tf.train.Feature(bytes_list=tf.train.BytesList(value=[source])),
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
        )
    )


@pytest.mark.parametrize("encoded, label, source", CASES)
def test_a_record_is_tensorflows_deterministic_example(encoded, label, source):
    expected = _tensorflow_example(encoded, label, os.fsencode(source)).SerializeToString(deterministic=True)
    assert tfrecords.serialize(encoded, label, source) == expected
    assert tfrecords.parse(expected) == (encoded, label, source)


def test_records_written_by_other_encoders_are_parsed():
    """Features in another order and a label list not packed: both valid encodings of the same Example."""
    shuffled = _tensorflow_example(b"pixels", -3, b"c/a.png").SerializeToString(deterministic=False)
    assert tfrecords.parse(shuffled) == (b"pixels", -3, "c/a.png")
    packed = tfrecords.serialize(b"p", 7, "s")
    label_entry = b"\x0a\x11image/class/label\x12\x05\x1a\x03\x0a\x01\x07"  # key; Feature.int64_list: packed [7]
    assert packed[4 : 4 + len(label_entry)] == label_entry
    unpacked_entry = b"\x0a\x11image/class/label\x12\x04\x1a\x02\x08\x07"  # the value 7 as a varint field
    rest = packed[4 + len(label_entry) :]
    entries = bytes([0x0A, len(unpacked_entry)]) + unpacked_entry + rest
    assert tfrecords.parse(bytes([0x0A, len(entries)]) + entries) == (b"p", 7, "s")


def test_a_shard_is_tensorflows_tfrecord_file_and_reads_back(tmp_path):
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "theirs.tfrecord"
    serialized = [tfrecords.serialize(*case) for case in CASES]
    with ours.open("wb") as stream:
        for record in serialized:
            tfrecords.write_record(stream, record)
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for record in serialized:
            writer.write(record)
    assert ours.read_bytes() == theirs.read_bytes()

    read = [record.numpy() for record in tf.data.TFRecordDataset(str(ours))]  # its CRCs checked
    assert read == serialized
    data = ours.read_bytes()
    found = list(tfrecords.iterate_records(data, ours))
    assert [(source, encoded) for _, _, source, encoded in found] == [(source, encoded) for encoded, _, source in CASES]
    assert [data[offset : offset + len(record)] for offset, record, _, _ in found] == serialized
    with pytest.raises(errors.BadInput, match="ends inside a record"):
        list(tfrecords.iterate_records(data[:-3], ours))


def test_convert_imports_no_tensorflow():
    """What writing the shards by hand is for: convert's process starts without TensorFlow's 5 s import."""
    code = "import sys, tasks.convert; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    assert records._FEATURES.keys() == {tfrecords.ENCODED, tfrecords.LABEL, tfrecords.SOURCE}
