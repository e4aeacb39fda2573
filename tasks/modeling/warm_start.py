"""Where a training starts (`train.init_from`): random weights, or the weights of an earlier model.

A warm start copies every weight of the start model's network into the network train has just built:
it must be the same network (`train.model`) at the same input size, and its classes are matched by
name. A class the new data adds gets a new column of the output layer, which keeps its fresh
initialisation; the same classes in another order have their columns moved. A class of the start
model that the new data lacks is refused: its column would have nowhere to go, and a model that
silently stops knowing a class is worse than a slower retrain from scratch.

The start is the registered model's champion, a registry URI (models:/<name>/<version>,
models:/<name>@<alias>) or a model folder / .keras file. The line of warm starts is counted on each
MLflow run (tag warm_start.generation: 0 from random weights, the start's + 1 for a warm start): with
`train.from_scratch_every` N, the run whose generation would reach N starts from random weights
instead, so that a line of warm starts cannot drift forever from what a fresh training would learn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator

import keras
import mlflow
import mlflow.exceptions
import mlflow.models
import numpy as np

from tasks.common import config, contracts, errors, files, tracking
from tasks.modeling import architectures

GENERATION_TAG = "warm_start.generation"
# MLflow's error codes for a server or store that did not answer: waiting may help (errors.Outage).
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # no such version, alias or run
_UNAVAILABLE = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


@dataclasses.dataclass(frozen=True)
class Start:
    """What a training starts from: `source` (None: random weights), and why."""

    setting: str | None  # train.init_from
    source: str | None  # models:/<name>/<version>, another models:/ URI, or the model file
    run_id: str | None  # the start model's MLflow run, when known
    generation: int  # of the run that starts here: 0 from random weights, the start's + 1 for a warm start
    reason: str  # why random weights; empty for a warm start
    identity: str  # names the start exactly (version, file hash): part of the checkpoint folder's hash

    @property
    def warm(self) -> bool:
        return self.source is not None

    def tags(self) -> dict[str, str]:
        """The MLflow run's record of its start."""
        tags = {
            "init_from": str(self.setting),
            GENERATION_TAG: str(self.generation),
            "warm_start.from_scratch": str(not self.warm).lower(),
        }
        if self.warm:
            tags["warm_start.source"] = self.source
            if self.run_id:
                tags["warm_start.run_id"] = self.run_id
        else:
            tags["warm_start.reason"] = self.reason
        return tags

    def describe(self, epochs: int) -> str:
        if self.warm:
            return f"train: warm start from {self.source} (generation {self.generation}), {epochs} epochs"
        return f"train: random weights (generation 0), {epochs} epochs: {self.reason}"


def resolve(params: config.TrainParams, registered_model_name: str | None) -> Start:
    """The start `train.init_from` names, or random weights when there is none (no champion yet) or
    `train.from_scratch_every` says this run starts afresh. Loads no model: see copy_weights."""
    setting = params.init_from
    if setting is None:
        return _random(setting, "train.init_from is null")
    if setting == tracking.CHAMPION:
        if not registered_model_name:
            raise errors.BadInput("train.init_from: champion needs the registered model's name (register.model_name)")
        source = _champion(registered_model_name)
        if source is None:
            return _random(setting, f"no version of {registered_model_name} holds the alias {tracking.CHAMPION} yet")
    else:
        source = _registry_source(setting) if setting.startswith("models:/") else _model_file(setting)
    run_id = _run_of(source)
    start_generation = _generation(run_id)
    generation = start_generation + 1
    if params.from_scratch_every and generation >= params.from_scratch_every:
        return _random(
            setting,
            f"{source} is generation {start_generation}: the next would reach train.from_scratch_every = "
            f"{params.from_scratch_every}",
        )
    identity = f"{source} run {run_id}" if source.startswith("models:/") else f"{source} sha256 {_file_hash(source)}"
    return Start(setting, source, run_id, generation, "", identity)


def _random(setting: str | None, reason: str) -> Start:
    return Start(setting, None, None, 0, reason, "random")


def copy_weights(start: Start, model: keras.Model, class_names: list[str], params: config.TrainParams) -> None:
    """Loads the start model and copies its weights into `model` (built for `class_names`); refuses, naming
    both, a start of another network or input size, or one that knows a class the data lacks."""
    serving, start_classes = _load(start.source)
    network = architectures.network_of(serving)
    what = f"train.init_from {start.setting}" + ("" if start.setting == start.source else f" ({start.source})")
    start_size, size = tuple(network.input_shape[1:3]), tuple(params.input_size)
    if (network.name, start_size) != (params.model, size):
        raise errors.BadInput(
            f"{what} is a {network.name} at {_size(start_size)}, train.model is {params.model} at {_size(size)} "
            "(train.crop_size, else train.image_size): its weights cannot start this network; set "
            "train.init_from: null to train from scratch, or train.model and the size to the start's"
        )
    if network.output_shape[-1] != len(start_classes):
        raise errors.BadInput(
            f"{what}: its model has {network.output_shape[-1]} outputs but {len(start_classes)} class names; "
            "its labels do not belong to it: retrain it, or set train.init_from: null"
        )
    transfer(network, start_classes, model, class_names, what)


def transfer(
    start: keras.Model, start_classes: list[str], network: keras.Model, class_names: list[str], what: str = "the start"
) -> None:
    """Copies `start`'s weights into `network`, layer by layer; the output layer's columns go to the
    positions of their class names in `class_names` (new classes keep `network`'s initialisation)."""
    lost = [name for name in start_classes if name not in class_names]
    if lost:
        raise errors.BadInput(
            f"{what} knows the class(es) {', '.join(lost)}, which the data set no longer has "
            f"(it has {', '.join(class_names)}): a warm start cannot drop a class; set train.init_from: null "
            "to retrain from scratch, or bring the class's images back"
        )
    old_layers, new_layers = _weighted_layers(start), _weighted_layers(network)
    old_shapes = [_shapes(layer) for layer in old_layers]
    new_shapes = [_shapes(layer) for layer in new_layers]
    # The output layer's weights differ in their last axis only: one entry per class.
    if len(old_shapes) != len(new_shapes) or old_shapes[:-1] != new_shapes[:-1] or not new_shapes:
        differing = next(
            (layer.name for layer, old, new in zip(new_layers, old_shapes, new_shapes, strict=False) if old != new),
            new_layers[-1].name if new_layers else network.name,
        )
        raise errors.BadInput(
            f"{what} has other layers than the network train builds (first difference: {differing}, e.g. another "
            "train.resnet_n): set train.init_from: null to train from scratch"
        )
    for old, new in zip(old_layers[:-1], new_layers[:-1], strict=True):
        new.set_weights(old.get_weights())
    positions = [class_names.index(name) for name in start_classes]
    head = []
    for old, new in zip(old_layers[-1].get_weights(), new_layers[-1].get_weights(), strict=True):
        if old.shape[:-1] != new.shape[:-1]:
            raise errors.BadInput(f"{what}: its output layer does not fit the network train builds")
        new = np.array(new)
        new[..., positions] = old
        head.append(new)
    new_layers[-1].set_weights(head)


def _weighted_layers(network: keras.Model) -> list[keras.layers.Layer]:
    # Top-level layers: a pretrained base is one nested model, copied whole.
    return [layer for layer in network.layers if layer.weights]


def _shapes(layer: keras.layers.Layer) -> list[tuple]:
    return [tuple(weight.shape) for weight in layer.weights]


def _size(size: tuple) -> str:
    return "x".join(str(side) for side in size)


def _load(source: str) -> tuple[keras.Model, list[str]]:
    """The start's serving model and its class names."""
    if source.startswith("models:/"):
        with _mlflow_errors(source):
            metadata = mlflow.models.get_model_info(source).metadata or {}
            model = tracking.load_logged_model(source)
        if not metadata.get("class_names"):
            raise errors.BadInput(f"{source} carries no class_names metadata; was it logged by the train stage?")
        return model, list(metadata["class_names"])
    path = pathlib.Path(source)
    return tracking.load_model_file(path), contracts.read_labels(path.parent)


def _champion(model_name: str) -> str | None:
    """models:/<name>/<version> of the champion, or None when there is none yet."""
    with _mlflow_errors(f"the registered model {model_name}"):
        champion = tracking.version_with_alias(_client(), model_name, tracking.CHAMPION)
    return None if champion is None else f"models:/{model_name}/{champion.version}"


def _registry_source(uri: str) -> str:
    """models:/<name>/<version> for an alias (what it points at now); other models:/ URIs as they are."""
    reference = uri.removeprefix("models:/")
    if "@" not in reference:
        return uri
    name, alias = reference.rsplit("@", 1)
    missing = (
        f"train.init_from {uri}: no version of {name} holds the alias {alias}; name an existing version or alias, "
        "or set train.init_from: null"
    )
    with _mlflow_errors(uri, missing):
        version = _client().get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


def _model_file(setting: str) -> str:
    path = pathlib.Path(setting)
    model_file = path / contracts.MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise errors.MissingInput(
            f"train.init_from {setting}: no such model file or model folder (holding {contracts.MODEL_FILE}, "
            f"{contracts.LABELS_FILE}); give a folder the train stage wrote, a models:/ URI, champion or null"
        )
    return str(model_file)


def _run_of(source: str) -> str | None:
    """The MLflow run that trained the start: the registry's record, or run.json beside a model file."""
    if source.startswith("models:/"):
        missing = (
            f"train.init_from {source}: no such model in MLflow; name an existing version, or set train.init_from: null"
        )
        with _mlflow_errors(source, missing):
            return mlflow.models.get_model_info(source).run_id
    folder = pathlib.Path(source).parent
    return contracts.RunRecord.read(folder).run_id if (folder / contracts.RUN_FILE).is_file() else None


def _generation(run_id: str | None) -> int:
    """The start's place in its line of warm starts: 0 when unknown (a run older than warm starts, or one
    in another MLflow store)."""
    if run_id is None:
        return 0
    client = _client()
    with _mlflow_errors(f"the run {run_id}"):
        try:
            tags = client.get_run(run_id).data.tags
        except mlflow.exceptions.MlflowException as error:
            if error.error_code in _NOT_FOUND:
                return 0
            raise
    value = tags.get(GENERATION_TAG, "0")
    return int(value) if value.isdigit() else 0


def _client() -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.MlflowClient()


@contextlib.contextmanager
def _mlflow_errors(what: str, missing: str | None = None) -> Iterator[None]:
    """MLflow's server or store not answering becomes errors.Outage, naming what was asked for; with
    `missing`, asking for something that does not exist becomes errors.BadInput with that message."""
    try:
        yield
    except mlflow.exceptions.MlflowException as error:
        if missing is not None and error.error_code in _NOT_FOUND:
            raise errors.BadInput(missing) from None
        if error.error_code not in _UNAVAILABLE:
            raise
        raise errors.Outage(
            f"train.init_from: cannot read {what} from MLflow at "
            f"{errors.without_credentials(mlflow.get_tracking_uri())}: {error.message}"
        ) from error


def _file_hash(path: str) -> str:
    return files.sha256_of(pathlib.Path(path))
