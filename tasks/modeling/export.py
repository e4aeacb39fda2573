"""Serving formats of a trained model, each run on test images and compared with the Keras model before
anyone attaches it.

    format          file                  holds
    saved_model     saved_model/          the whole serving model: uint8 RGB images of any size in, prepared
                                          inside (tasks/data/preprocessing.py), calibrated probabilities out
    tflite_float32  model_float32.tflite  the calibrated network (architectures.calibrated_network): uint8
                                          images of its input size in, calibrated probabilities out
    tflite_float16  model_float16.tflite  the same with float16 weights: half the file; CPUs without float16
                                          arithmetic compute in float32
    tflite_int8     model_int8.tflite     the same, fully integer: int8 weights and activations, ranges
                                          measured on CALIBRATION_IMAGES training images; uint8 images in (the
                                          converter takes them as they are), float32 probabilities out (the
                                          int8 softmax dequantized, so every file answers alike)
    onnx            model.onnx            the calibrated network through Keras' model.export(format="onnx")
                                          (tf2onnx); only when the `onnx` extra is installed

The TFLite and ONNX files hold the network without its preparation: neither TFLite nor tf2onnx has the
antialiased resize (TensorFlow's ScaleAndTranslate op), and apps on phones resize with their own image
APIs; the model's MLflow metadata (`preprocessing`) says how. ONNX is left out, with the reason, where
tf2onnx cannot express the network: the ResNet's channel-mean subtraction (a Keras Normalization layer)
becomes two unfed graph inputs ("Required inputs ... subtract_mean ... are missing"), tf2onnx 1.17.

Verification: every format runs the first VERIFICATION_IMAGES test images (shards hold images in a
seeded random order, so they are a uniform sample), the SavedModel through its `serve` signature on the
images at `image_size`, the others on their centre crops of `input_size`, and is compared with the Keras
serving model on the same images. An export beyond its TOLERANCES raises errors.BadInput:

    format          top-1 agreement  largest probability    measured: tiny test model (11 images);
                    at least         difference, at most    digits, mnist_cnn, 4 epochs (330 images)
    saved_model     1.0              1e-4                   0; 0          the same TensorFlow graph
    tflite_float32  1.0              1e-4                   9e-8; 2e-6    other kernels, same arithmetic
    onnx            1.0              1e-4                   6e-8; 1e-6
    tflite_float16  0.99             0.01                   6e-6; 3e-4    rounded weights
    tflite_int8     0.95             0.25                   0.004; 0.096  rounded weights and activations

Top-1 agreement counts only the images the Keras model decides: those whose top class leads the second by
at least DECIDED_MARGIN. A near-tie may fall either way in any honest export, and a model that has hardly
learned (probabilities near 1/classes) is made of them. The calibration in these files divides the logits
(architectures.calibrated_network): through the logarithm of the probabilities instead, a weakly trained
digits model's int8 file changed 31% of its top-1 answers; dividing the logits, none.

What a wrong preparation of the images does, measured on digits: inverted pixels, agreement 0 and
difference 1.0 in every format; halved pixels, difference 0.28 in the float formats, 0.27 in int8 (int8
cannot tell a mild scaling from its own rounding; the float32 file, made from the same network, catches
it). Swapped colour channels change nothing on grey images (digits, the tests' images), everything on
colour ones.

A model trained in mixed precision (train.mixed_precision, on by default with a GPU) computes in float16.
Its network is rebuilt in float32 for TFLite and ONNX (TFLite has no float16 kernel for most ops), and
those files are held to the float16 tolerance at least: they differ from the model by its own rounding
(measured: 7e-4 on the tiny test model). The comparison runs on the CPU, as TFLite and ONNX Runtime do.
About 4 to 8 s for the tiny test model on 2 cores, 7 s for digits' mnist_cnn (28x28, 330 test images).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tasks.common import console, contracts, disk, errors, tracking
from tasks.data import inputs, preprocessing
from tasks.modeling import architectures

SAVED_MODEL = "saved_model"
TFLITE_FLOAT32 = "tflite_float32"
TFLITE_FLOAT16 = "tflite_float16"
TFLITE_INT8 = "tflite_int8"
ONNX = "onnx"
FILES = {
    SAVED_MODEL: "saved_model",
    TFLITE_FLOAT32: "model_float32.tflite",
    TFLITE_FLOAT16: "model_float16.tflite",
    TFLITE_INT8: "model_int8.tflite",
    ONNX: "model.onnx",
}
VERIFICATION_IMAGES = 1000  # test images each format runs: agreement to 0.1%, seconds for the small networks
CALIBRATION_IMAGES = 300  # training images that set the int8 ranges (TensorFlow's guide: a few hundred)
LATENCY_IMAGES = 50  # images timed one at a time, after one untimed call
# A SavedModel's graph and signatures beside its variables: 0.14 MB for digits' mnist_cnn; more for deep networks.
_SAVED_MODEL_GRAPH_BYTES = 2_000_000
DECIDED_MARGIN = 0.01  # of probability: an image whose top two classes are closer is a near-tie


@dataclasses.dataclass(frozen=True)
class Tolerance:
    min_top1_agreement: float
    max_probability_difference: float


TOLERANCES = {
    SAVED_MODEL: Tolerance(1.0, 1e-4),
    TFLITE_FLOAT32: Tolerance(1.0, 1e-4),
    ONNX: Tolerance(1.0, 1e-4),
    TFLITE_FLOAT16: Tolerance(0.99, 0.01),
    TFLITE_INT8: Tolerance(0.95, 0.25),
}


@dataclasses.dataclass(frozen=True)
class ExportCheck:
    """One format, measured on the same test images as the Keras model."""

    format: str
    file: str  # in the export folder
    size_bytes: int  # all files of a folder
    precision_at_1: float  # against the labels
    keras_precision_at_1: float  # the Keras model's, on the same images
    top1_agreement: float  # share of the decided images with the Keras model's top-1 answer
    max_probability_difference: float  # largest |export - Keras| over every image and class
    latency_ms_per_image: float  # one image per call, mean wall time over LATENCY_IMAGES on this machine
    tolerance: Tolerance  # what it was held to

    def row(self) -> dict[str, str | int | float]:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "tolerance"}


@dataclasses.dataclass(frozen=True)
class Exports:
    checks: tuple[ExportCheck, ...]  # the formats written and verified, in FILES order
    left_out: dict[str, str]  # format -> why it was not written (only ONNX can be left out)


@dataclasses.dataclass(frozen=True)
class _TestImages:
    images: np.ndarray  # uint8, at image_size: what the SavedModel and Keras take
    crops: np.ndarray  # uint8, centre crops of input_size: what the network alone takes
    labels: np.ndarray
    keras_probabilities: np.ndarray
    batch_size: int


def export_verified(
    model_path: pathlib.Path,
    export_dir: pathlib.Path,
    shards_dir: pathlib.Path,
    preprocessing: contracts.Preprocessing,
    batch_size: int,
) -> Exports:
    """Writes every format of the model file `model_path` into `export_dir` and verifies each on the test
    split of `shards_dir` (`batch_size` images a step); raises errors.BadInput naming each format beyond
    its tolerance."""
    model = tracking.load_model_file(model_path)
    network, half_precision = _float32_network(model)
    disk.require(*space_needed(network, export_dir))
    export_dir.mkdir(parents=True, exist_ok=True)
    model.export(str(export_dir / FILES[SAVED_MODEL]), format="tf_saved_model", verbose=False)
    _write_tflite(network, export_dir, _calibration_images(shards_dir, preprocessing))
    onnx_problem = _write_onnx(network, export_dir / FILES[ONNX])
    left_out = {ONNX: onnx_problem} if onnx_problem else {}
    # Measured on the CPU, where TFLite and ONNX Runtime run too: a GPU computes float32 convolutions and
    # products in TensorFloat-32 by default (Ampere and later), which alone moves probabilities by about 1e-3.
    with tf.device("/CPU:0"):
        test = _test_images(model, shards_dir, preprocessing, batch_size)
        serve = tf.saved_model.load(str(export_dir / FILES[SAVED_MODEL])).signatures["serve"]
        checks = [_measure(SAVED_MODEL, export_dir, lambda batch: _run_saved_model(serve, batch), test.images, test)]
        for name in (TFLITE_FLOAT32, TFLITE_FLOAT16, TFLITE_INT8):
            checks.append(_measure(name, export_dir, _tflite_runner(export_dir / FILES[name]), test.crops, test))
        if ONNX not in left_out:
            checks.append(_measure(ONNX, export_dir, _onnx_runner(export_dir / FILES[ONNX]), test.crops, test))
    if half_precision:
        checks = [_held_to_half_precision(check) for check in checks]
    _raise_beyond_tolerance(checks)
    return Exports(checks=tuple(checks), left_out=left_out)


def space_needed(network: keras.Model, export_dir: pathlib.Path) -> list[disk.Need]:
    """The room the exports of `network` take, from W, the bytes of its float32 weights: in `export_dir` the
    serving model's SavedModel (2 W: Keras' export stores every variable twice, and the graph), the TFLite
    files (W, W/2, W/4) and ONNX (W, where it is installed); in the temporary folder, while the TFLite files
    are made, a SavedModel of the network (2 W and the graph). Measured on digits' mnist_cnn (W 13.1 MB):
    62.4 MB of exports estimated 64.2 MB; the temporary SavedModel 26.3 MB, estimated 28.2 MB."""
    weights = disk.variable_bytes(network.weights)
    saved_model = 2 * weights + _SAVED_MODEL_GRAPH_BYTES
    onnx = weights if all(importlib.util.find_spec(package) for package in ("tf2onnx", "onnxruntime")) else 0
    return [
        disk.Need(export_dir, saved_model + weights + weights // 2 + weights // 4 + onnx, "the exports"),
        disk.Need(pathlib.Path(tempfile.gettempdir()), saved_model, "the SavedModel the TFLite files are made from"),
    ]


def markdown_table(exports: Exports) -> str:
    """The checks as a Markdown table, with the tolerances and what was left out, for a README or a model card."""
    lines = [
        "| format | file | size (bytes) | precision@1 | top-1 agreement (min) | largest probability difference (max) "
        "| ms per image |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for check in exports.checks:
        tolerance = check.tolerance
        lines.append(
            f"| {check.format} | {check.file} | {check.size_bytes:,} | {check.precision_at_1:.4f} "
            f"| {check.top1_agreement:.4f} ({tolerance.min_top1_agreement:g}) "
            f"| {check.max_probability_difference:.2e} ({tolerance.max_probability_difference:g}) "
            f"| {check.latency_ms_per_image:.3f} |"
        )
    if exports.checks:
        lines.append(
            f"\nThe Keras model's precision@1 on the same images: {exports.checks[0].keras_precision_at_1:.4f}."
        )
    lines += [f"\n{name}: not exported: {reason}" for name, reason in exports.left_out.items()]
    return "\n".join(lines) + "\n"


def _test_images(model, shards_dir: pathlib.Path, settings: contracts.Preprocessing, batch_size: int) -> _TestImages:
    """The first VERIFICATION_IMAGES test images, their crops and labels, and the Keras model's answers."""
    image_size, input_size = tuple(settings.image_size), tuple(settings.input_size)
    # Uncropped: the serving model and the SavedModel prepare the images themselves.
    split = inputs.evaluation_data(shards_dir, "test", image_size, image_size, batch_size).unbatch()
    images, labels = [], []
    for image, label in split.take(VERIFICATION_IMAGES).batch(batch_size):
        images.append(image.numpy())
        labels.append(label.numpy())
    images = np.concatenate(images)
    probabilities = _in_batches(lambda batch: np.asarray(model.predict_on_batch(batch)), images, batch_size)
    crops = preprocessing.centre_crop(tf.constant(images), input_size).numpy()
    return _TestImages(images, crops, np.concatenate(labels), probabilities, batch_size)


def _calibration_images(shards_dir: pathlib.Path, settings: contracts.Preprocessing) -> np.ndarray:
    """The first CALIBRATION_IMAGES training images (a uniform sample), centre-cropped as a served image is."""
    split = inputs.evaluation_data(shards_dir, "train", tuple(settings.image_size), tuple(settings.input_size), 1)
    return np.concatenate([images.numpy() for images, _ in split.take(CALIBRATION_IMAGES)])


def _float32_network(model: keras.Model) -> tuple[keras.Model, bool]:
    """architectures.calibrated_network of `model` rebuilt to compute in float32, with its weights; and
    whether `model` computes in half precision. A model trained in mixed precision (train.mixed_precision,
    on by default with a GPU) keeps float16 layers, and TFLite has no float16 kernel for most ops: its
    conversion fails ("TF Select ops: BiasAdd, Conv2D, MatMul, ...")."""
    network = architectures.calibrated_network(model)
    config = network.get_config()
    float32_config = _float32_policies(config)
    if float32_config == config:
        return network, False
    copy = keras.Model.from_config(float32_config)
    copy.set_weights(network.get_weights())  # mixed precision keeps its variables in float32 already
    return copy, True


def _float32_policies(config):
    """`config` (a model's, nested) with every mixed_float16 or mixed_bfloat16 dtype policy made float32."""
    if isinstance(config, list):
        return [_float32_policies(item) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy" and str(config["config"].get("name")).startswith("mixed_"):
        return {**config, "config": {**config["config"], "name": "float32"}}
    return {key: _float32_policies(value) for key, value in config.items()}


def _held_to_half_precision(check: ExportCheck) -> ExportCheck:
    """`check` held to the float16 tolerance at least: a model that computes in float16 differs from its float32
    exports by its own rounding. Its SavedModel is the same graph, and held to its own."""
    if check.format == SAVED_MODEL:
        return check
    own, half = check.tolerance, TOLERANCES[TFLITE_FLOAT16]
    tolerance = Tolerance(
        min(own.min_top1_agreement, half.min_top1_agreement),
        max(own.max_probability_difference, half.max_probability_difference),
    )
    return dataclasses.replace(check, tolerance=tolerance)


def _write_tflite(network, export_dir: pathlib.Path, calibration: np.ndarray) -> None:
    """The three TFLite files of `network`, through one SavedModel of it (the checked path from Keras 3)."""
    with tempfile.TemporaryDirectory() as folder:
        network.export(folder, format="tf_saved_model", verbose=False)
        for name in (TFLITE_FLOAT32, TFLITE_FLOAT16, TFLITE_INT8):
            converter = tf.lite.TFLiteConverter.from_saved_model(folder)
            if name == TFLITE_FLOAT16:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            if name == TFLITE_INT8:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                # One image a sample: the converter runs each through the float model to record the ranges.
                converter.representative_dataset = lambda: ([image[np.newaxis]] for image in calibration)
                # Integer kernels only: a conversion that would fall back to float ops fails instead.
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.uint8
            with console.native_output_hidden():  # the int8 converter prints its settings ("fully_quantize: 0, ...")
                (export_dir / FILES[name]).write_bytes(converter.convert())


def _write_onnx(network, path: pathlib.Path) -> str | None:
    """Writes the ONNX file and loads it in ONNX Runtime; returns why it cannot be had, or None."""
    missing = [package for package in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(package) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install '.[onnx]')"
    import onnxruntime

    signature = [tf.TensorSpec((None, *network.input_shape[1:]), tf.uint8, name="image")]
    try:
        with warnings.catch_warnings():
            # Keras' patch of tf2onnx looks for np.object, which NumPy 2 answers with a FutureWarning.
            warnings.simplefilter("ignore", FutureWarning)
            network.export(str(path), format="onnx", verbose=False, input_signature=signature)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # tf2onnx writes a file even for ops it cannot convert; running one image shows whether it works.
        session.run(None, {session.get_inputs()[0].name: np.zeros((1, *network.input_shape[1:]), np.uint8)})
    except Exception as error:  # noqa: BLE001 - any failure of the optional converter: that format is left out
        path.unlink(missing_ok=True)
        return f"tf2onnx cannot convert this network: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return None


def _measure(name: str, export_dir: pathlib.Path, run, images: np.ndarray, test: _TestImages) -> ExportCheck:
    """Runs `run` (a batch of `images` -> probabilities) on every test image, then times it one image a call."""
    probabilities = _in_batches(run, images, test.batch_size)
    run(images[:1])  # untimed: the first call of a batch size allocates
    timed = images[:LATENCY_IMAGES]
    started = time.perf_counter()
    for index in range(len(timed)):
        run(timed[index : index + 1])
    latency_ms = (time.perf_counter() - started) * 1000 / len(timed)
    keras_probabilities = test.keras_probabilities
    ordered = np.sort(keras_probabilities, axis=1)
    decided = ordered[:, -1] - ordered[:, -2] >= DECIDED_MARGIN
    same = probabilities.argmax(axis=1) == keras_probabilities.argmax(axis=1)
    path = export_dir / FILES[name]
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
    return ExportCheck(
        format=name,
        file=FILES[name],
        size_bytes=sum(item.stat().st_size for item in files),
        precision_at_1=float(np.mean(probabilities.argmax(axis=1) == test.labels)),
        keras_precision_at_1=float(np.mean(keras_probabilities.argmax(axis=1) == test.labels)),
        # With no decided image there is nothing an export could get wrong.
        top1_agreement=float(same[decided].mean()) if decided.any() else 1.0,
        max_probability_difference=float(np.max(np.abs(probabilities - keras_probabilities))),
        latency_ms_per_image=latency_ms,
        tolerance=TOLERANCES[name],
    )


def _in_batches(run, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def _run_saved_model(serve, batch: np.ndarray) -> np.ndarray:
    (probabilities,) = serve(image=tf.constant(batch)).values()
    return probabilities.numpy()


def _tflite_runner(path: pathlib.Path):
    """A function of a uint8 batch -> probabilities, through TFLite's interpreter, for any batch size."""
    with warnings.catch_warnings():
        # "tf.lite.Interpreter is deprecated" in favour of the ai-edge-litert package: the same runtime,
        # still in TensorFlow 2.21, and one package fewer to install.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    with console.native_output_hidden():  # applying XNNPACK says so on stderr ("INFO: Created ... delegate")
        interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    allocated = {"shape": None}

    def run(batch: np.ndarray) -> np.ndarray:
        if batch.shape != allocated["shape"]:
            interpreter.resize_tensor_input(input_index, batch.shape)
            interpreter.allocate_tensors()
            allocated["shape"] = batch.shape
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        return interpreter.get_tensor(output_index).copy()

    return run


def _onnx_runner(path: pathlib.Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {input_name: batch})[0]


def _raise_beyond_tolerance(checks: list[ExportCheck]) -> None:
    problems = []
    for check in checks:
        tolerance = check.tolerance
        # `not <=`: a NaN fails too.
        if not check.top1_agreement >= tolerance.min_top1_agreement:
            problems.append(
                f"{check.format} ({check.file}): top-1 agreement with the Keras model {check.top1_agreement:.4f}, "
                f"at least {tolerance.min_top1_agreement} expected"
            )
        if not check.max_probability_difference <= tolerance.max_probability_difference:
            problems.append(
                f"{check.format} ({check.file}): largest probability difference from the Keras model "
                f"{check.max_probability_difference:.3g}, at most {tolerance.max_probability_difference:g} expected"
            )
    if problems:
        raise errors.BadInput(
            "an export answers differently from the model it was made from, on the same test images: "
            + "; ".join(problems)
            + ". Do not attach these exports; an export that prepares the images differently (scaling, channel "
            "order, crop) or a converter that mishandles a layer does this: see tasks/modeling/export.py"
        )
