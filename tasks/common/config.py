"""params.yaml, parsed and validated into typed, frozen objects: the one place settings are read.

Each stage receives only its own section. A wrong key or value stops the run with a message that
names the key, what was received and what would be right. Pydantic does the type and range checks;
this module only declares the sections and turns pydantic's errors into one readable message.
"""

from __future__ import annotations

import pathlib
import re
import urllib.parse
from typing import Annotated, Any, Literal

import pydantic
import yaml

from tasks.common import errors
from tasks.data import sources
from tasks.modeling import networks, optimizers, strategies

# The names a user picks come from the registries that build them.
DATASETS = sources.names()
MODELS = tuple(networks.NETWORKS)
OPTIMIZERS = tuple(optimizers.OPTIMIZERS)
SCHEDULES = tuple(optimizers.SCHEDULES)
STRATEGIES = tuple(strategies.STRATEGIES)
AUGMENTATIONS = ("flip", "crop", "shift", "brightness", "contrast")


def _integer_as_float(value: Any) -> Any:
    # YAML reads 1 and 0 as integers; a strict float setting would refuse them.
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# A float setting: a number, never a string or a boolean; written as an integer it is taken as a float.
Real = Annotated[float, pydantic.BeforeValidator(_integer_as_float)]


class ConfigError(errors.BadInput):
    """params.yaml (or an override of it) holds a key or value the pipeline cannot use."""


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)


class BaseParams(_Section):
    seed: int = pydantic.Field(ge=0)


class PathsParams(_Section):
    raw: str
    downloads: str
    shards: str
    data_report: str
    models: str
    metrics: str
    evaluation: str
    registry: str
    checkpoints: str


class DatasetParams(_Section):
    name: Literal[DATASETS]  # type: ignore[valid-type]
    source: str | None = pydantic.Field(min_length=1)
    sha256: str | None
    image_size: tuple[int, int] | None
    split_seed: int = pydantic.Field(ge=0)
    validation_fraction: Real = pydantic.Field(gt=0, lt=1)
    test_fraction: Real = pydantic.Field(gt=0, lt=1)
    shard_size_mb: Real = pydantic.Field(gt=0)
    max_class_drop: Real = pydantic.Field(ge=0, le=1)
    accept_data_changes: bool

    @pydantic.field_validator("image_size", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @pydantic.field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(
                f"[height, width] in pixels, both at least 1, or null to keep each image's size; got {list(value)}"
            )
        return value

    @pydantic.field_validator("source")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if (
            value is not None
            and value.startswith(("http://", "https://"))
            and urllib.parse.urlsplit(value).username is not None
        ):
            raise ValueError(
                "a user name, password or token in the URL would be committed to git with params.yaml and logged "
                "to MLflow; "
                "give the URL without it and put the credentials in ~/.netrc (or the file named by NETRC): "
                "machine <host> login <user> password <password>"
            )
        return value

    @pydantic.field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(
                "a sha256 digest is 64 hexadecimal characters (`sha256sum FILE` prints it), "
                f"got {len(value)} characters"
            )
        return value.lower() if value else value

    @pydantic.model_validator(mode="after")
    def _source_fits_the_name(self) -> DatasetParams:
        sources.load(self.name).check(self)  # each source says which dataset.source and sha256 it takes
        return self

    @pydantic.model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DatasetParams:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction + test_fraction must be below 1 so that images remain for "
                f"training, got {self.validation_fraction} + {self.test_fraction}"
            )
        return self


class TrainParams(_Section):
    model: Literal[MODELS]  # type: ignore[valid-type]
    image_size: tuple[int, int]
    epochs: int = pydantic.Field(ge=1)
    batch_size: int = pydantic.Field(ge=1)
    optimizer: Literal[OPTIMIZERS]  # type: ignore[valid-type]
    learning_rate: Real = pydantic.Field(gt=0, allow_inf_nan=False)
    momentum: Real = pydantic.Field(ge=0, lt=1)
    schedule: Literal[SCHEDULES]  # type: ignore[valid-type]
    decay_steps: int = pydantic.Field(ge=1)
    decay_rate: Real = pydantic.Field(gt=0, le=1)
    staircase: bool
    boundaries: tuple[int, ...]
    warmup_steps: int = pydantic.Field(ge=0)
    weight_decay: Real = pydantic.Field(ge=0)
    label_smoothing: Real = pydantic.Field(ge=0, lt=1)
    ema_momentum: Real | None = pydantic.Field(ge=0, lt=1)
    crop_size: tuple[int, int] | None
    crop_padding: int = pydantic.Field(ge=0)
    augment: tuple[Literal[AUGMENTATIONS], ...]  # type: ignore[valid-type]
    shuffle_buffer: int = pydantic.Field(ge=1)
    shuffle_mb: int = pydantic.Field(ge=1)
    cache_mb: int = pydantic.Field(ge=0)
    resnet_n: int = pydantic.Field(ge=1)
    pretrained_weights: str = pydantic.Field(min_length=1)
    fine_tune_epochs: int = pydantic.Field(ge=0)
    fine_tune_learning_rate: Real = pydantic.Field(gt=0)
    monitor: Literal["val_loss", "val_accuracy"]
    restore_best: bool
    backup_every_seconds: Real = pydantic.Field(ge=0)
    strategy: Literal[STRATEGIES]  # type: ignore[valid-type]
    cpu_devices: int = pydantic.Field(ge=1)
    mixed_precision: Literal["auto"] | bool
    jit_compile: Literal["auto"] | bool
    deterministic: bool
    log_every_steps: int = pydantic.Field(ge=1)
    histogram_freq: int = pydantic.Field(ge=0)
    experiment_name: str = pydantic.Field(min_length=1)
    init_from: str | None = pydantic.Field(min_length=1)
    warm_start_epochs: int = pydantic.Field(ge=1)
    from_scratch_every: int = pydantic.Field(ge=0)
    class_weight: Literal["balanced"] | dict[str, Real] | None

    @pydantic.field_validator("class_weight")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, dict) and (not value or min(value.values()) <= 0):
            raise ValueError(
                "null (unweighted), balanced, or a mapping of class name to a positive weight, e.g. {cat: 2.0}; "
                f"got {value}"
            )
        return value

    @pydantic.field_validator("init_from")
    @classmethod
    def _known_start(cls, value: str | None) -> str | None:
        if (
            value is not None
            and value != "champion"
            and value.startswith("models:")
            and not value.startswith("models:/")
        ):
            raise ValueError(f"a registry URI is models:/<name>/<version> or models:/<name>@<alias>, got {value!r}")
        return value

    @pydantic.field_validator("image_size", "crop_size", "boundaries", "augment", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @pydantic.field_validator("image_size", "crop_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 4:
            raise ValueError(f"both sides must be at least 4 pixels (the network pools twice), got {list(value)}")
        return value

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        input_size = self.input_size
        if input_size[0] > self.image_size[0] or input_size[1] > self.image_size[1]:
            raise ValueError(f"crop_size {list(input_size)} must fit in image_size {list(self.image_size)}")
        network = networks.NETWORKS[self.model]
        smallest = network.min_input_side
        if min(input_size) < smallest:
            raise ValueError(
                f"{self.model} needs an input of at least {smallest}x{smallest} pixels, "
                f"got {list(input_size)} (crop_size, else image_size)"
            )
        if self.schedule == "piecewise" and (
            not self.boundaries or list(self.boundaries) != sorted(set(self.boundaries)) or self.boundaries[0] < 1
        ):
            raise ValueError(
                f"the piecewise schedule needs boundaries: increasing positive steps, got {list(self.boundaries)}"
            )
        if not network.pretrained and (self.pretrained_weights != "none" or self.fine_tune_epochs):
            pretrained = [name for name, entry in networks.NETWORKS.items() if entry.pretrained]
            raise ValueError(
                f"pretrained_weights and fine_tune_epochs apply to {', '.join(pretrained)} only; "
                f"{self.model} needs pretrained_weights: none and fine_tune_epochs: 0"
            )
        if "crop" in self.augment and input_size == self.image_size and not self.crop_padding:
            raise ValueError(
                "augment lists crop, but there is nothing to crop: "
                "set crop_size below image_size or crop_padding above 0"
            )
        if len(set(self.augment)) != len(self.augment):
            raise ValueError(f"augment lists an augmentation twice: {list(self.augment)}")
        return self

    @property
    def input_size(self) -> tuple[int, int]:
        """[height, width] the network sees: the crop, or the whole image."""
        return self.crop_size or self.image_size


class EvaluateParams(_Section):
    batch_size: int = pydantic.Field(ge=1)


class RegisterParams(_Section):
    model_name: str | None = pydantic.Field(min_length=1)
    min_precision: Real = pydantic.Field(ge=0, le=1)
    min_improvement: Real = pydantic.Field(ge=-1, le=1)
    significance: Real = pydantic.Field(gt=0, lt=1)
    max_class_drop: Real = pydantic.Field(ge=0, le=1)
    serve_check: bool


class StageMinutes(_Section):
    download: Real = pydantic.Field(gt=0)
    convert: Real = pydantic.Field(gt=0)
    train: Real = pydantic.Field(gt=0)
    evaluate: Real = pydantic.Field(gt=0)
    registration: Real = pydantic.Field(gt=0, alias="register")  # alias: see Params.registration


class FlowParams(_Section):
    cron: str
    timeout_minutes: StageMinutes

    @pydantic.field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError('a cron schedule has 5 fields (minute hour day month weekday), e.g. "0 2 * * *"')
        return value


class Params(_Section):
    base: BaseParams
    paths: PathsParams
    dataset: DatasetParams
    train: TrainParams
    evaluate: EvaluateParams
    flow: FlowParams
    # "register" would shadow pydantic's BaseModel.register, hence the alias.
    registration: RegisterParams = pydantic.Field(alias="register")

    @property
    def raw_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.raw) / self.dataset.name

    @property
    def downloads_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.downloads)

    @property
    def digests_file(self) -> pathlib.Path:
        return digests_file(self.downloads_dir, self.dataset.name)

    @property
    def shards_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.shards) / self.dataset.name

    @property
    def data_report_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.data_report)

    @property
    def model_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.models)

    @property
    def metrics_path(self) -> pathlib.Path:
        return pathlib.Path(self.paths.metrics)

    @property
    def evaluation_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.evaluation)

    @property
    def checkpoints_dir(self) -> pathlib.Path:
        return pathlib.Path(self.paths.checkpoints)

    @property
    def registry_path(self) -> pathlib.Path:
        return pathlib.Path(self.paths.registry)

    @property
    def registered_model_name(self) -> str:
        return self.registration.model_name or f"{self.dataset.name}-{self.train.model}"


def load_params(path: str | pathlib.Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Reads, overrides ("train.epochs": 3) and validates a params file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"cannot read the params file {path}: no such file; "
            "run from the folder that holds params.yaml (the repository's root)"
            + ("" if path.name == "params.yaml" else " or name an existing file")
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read the params file {path}: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(_describe_yaml_error(path, error)) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (base, dataset, train, ...), got {type(raw).__name__}"
        )
    for dotted_key, value in (overrides or {}).items():
        _set_dotted(raw, dotted_key, value, path)
    return parse_params(raw, source=str(path))


def digests_file(downloads_dir: pathlib.Path, dataset_name: str) -> pathlib.Path:
    """Each raw file's sha256 by its size, time and inode, for download's listing and convert: beside the
    downloads, as file times and inodes differ from one checkout to the next."""
    return downloads_dir / f"{dataset_name}-digests.sqlite"


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(_describe(error, raw, source)) from None


def as_dict(params: Params) -> dict[str, Any]:
    """The validated settings as plain YAML/JSON data, keyed like params.yaml."""
    return params.model_dump(mode="json", by_alias=True)


def flatten(settings: dict[str, Any], separator: str = ".") -> dict[str, Any]:
    """{"train": {"epochs": 12}} -> {"train.epochs": 12}: settings as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{separator}{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", settings)
    return flat


def _set_dotted(raw: dict[str, Any], dotted_key: str, value: Any, path: pathlib.Path) -> None:
    *parents, leaf = dotted_key.split(".")
    node = raw
    for index, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            where = ".".join(parents[: index + 1])
            raise ConfigError(f"override {dotted_key!r}: {where!r} is not a section of {path}")
        node = child
    node[leaf] = value


def _describe_yaml_error(path: pathlib.Path, error: yaml.YAMLError) -> str:
    """One line: where in the file (line, column: what an editor shows) and what the parser expected there."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark.line != getattr(mark, "line", None):
        problem = f"{context} (line {context_mark.line + 1}, column {context_mark.column + 1}), {problem}"
    return (
        f"{where}: not valid YAML: {problem}; "
        "fix the file there (a missing quote, bracket or colon, or wrong indentation)"
    )


def _describe(error: pydantic.ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            section_model = _section_model(item["loc"][:-1])
            allowed = ", ".join(_keys(section_model)) if section_model else "?"
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"  {key}: missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            received = _received(raw, item["loc"])
            # Redacted here, not only where it is printed: the message also goes to Prefect's flow run state.
            shown = "" if isinstance(received, dict) else f" = {errors.redact(repr(received))}"
            lines.append(f"  {key}{shown}: {message}")
    if len(lines) == 2:  # one invalid setting: one line, as an error in a log should be
        return f"{source}: invalid setting {lines[1].strip()}"
    return "\n".join(lines)


def _section_model(location: tuple[Any, ...]) -> type[pydantic.BaseModel] | None:
    model: type[pydantic.BaseModel] = Params
    for part in location:
        field = {key: field for key, field in zip(_keys(model), model.model_fields.values(), strict=True)}.get(
            str(part)
        )
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)):
            return None
        model = annotation
    return model


def _keys(model: type[pydantic.BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _received(raw: Any, location: tuple[Any, ...]) -> Any:
    for part in location:
        in_mapping = isinstance(raw, dict) and part in raw
        in_sequence = isinstance(raw, (list, tuple)) and isinstance(part, int) and part < len(raw)
        if in_mapping or in_sequence:
            raw = raw[part]
        else:
            return None
    return raw
