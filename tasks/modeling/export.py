"""Serving formats of a trained model: a TensorFlow SavedModel and a TFLite file.

The SavedModel is the whole saved model: uint8 RGB images of any size in, class probabilities out,
prepared inside (tasks/data/preprocessing.py). The TFLite file holds the network alone, taking uint8
images of its input size: TFLite has no kernel for the antialiased resize, and apps on phones resize
with their own image APIs; the model's MLflow metadata (`preprocessing`) says how.
"""

from __future__ import annotations

import pathlib
import tempfile

import tensorflow as tf

from tasks.common import tracking
from tasks.modeling import architectures

SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"


def export_model(model_path: pathlib.Path, export_dir: pathlib.Path, tflite_float16: bool) -> list[pathlib.Path]:
    """Writes <export_dir>/saved_model/ and <export_dir>/model.tflite (weights in float16 if asked)."""
    model = tracking.load_model_file(model_path)
    saved_model = export_dir / SAVED_MODEL_DIR
    model.export(str(saved_model), format="tf_saved_model", verbose=False)
    with tempfile.TemporaryDirectory() as folder:
        # Through a SavedModel of the network alone: the checked path from a Keras 3 model to TFLite.
        architectures.network_of(model).export(folder, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        if tflite_float16:
            # Halves the file; TFLite computes in float32 on CPUs that lack float16 arithmetic.
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        (export_dir / TFLITE_FILE).write_bytes(converter.convert())
    return [saved_model, export_dir / TFLITE_FILE]
