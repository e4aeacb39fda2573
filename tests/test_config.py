import pathlib

import pytest

from tasks.common import config
from tests.conftest import REPOSITORY


def test_repository_params_are_valid():
    params = config.load_params(REPOSITORY / "params.yaml")
    assert params.dataset.name == "digits"
    assert params.train.model == "mnist_cnn"
    assert params.raw_dir == pathlib.Path("data/raw/digits")
    assert params.shards_dir == pathlib.Path("data/shards/digits")
    assert params.registered_model_name == "digits-mnist_cnn"


def test_dataset_sources_and_their_settings():
    params = config.load_params(
        REPOSITORY / "params.yaml",
        {
            "dataset.name": "imagefolder",
            "dataset.source": "https://example.org/pets.zip",
            "dataset.sha256": "AB" * 32,
            "dataset.image_size": [64, 48],
        },
    )
    assert params.dataset.sha256 == "ab" * 32, "digests are compared in lower case"
    assert params.dataset.image_size == (64, 48)
    assert params.raw_dir == pathlib.Path("data/raw/imagefolder")
    assert params.downloads_dir == pathlib.Path("data/downloads")
    assert config.load_params(REPOSITORY / "params.yaml", {"dataset.name": "cifar10"}).dataset.source is None


def test_overrides_are_applied_and_validated():
    params = config.load_params(REPOSITORY / "params.yaml", {"train.epochs": 3, "register.model_name": "mine"})
    assert params.train.epochs == 3
    assert params.registered_model_name == "mine"


def test_flatten_gives_every_setting_by_dotted_key():
    flat = config.flatten(config.as_dict(config.load_params(REPOSITORY / "params.yaml")))
    assert flat["train.epochs"] == config.load_params(REPOSITORY / "params.yaml").train.epochs
    assert flat["register.model_name"] is None
    assert flat["train.image_size"] == [28, 28]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.epochs": -1}, "train.epochs = -1: Input should be greater than or equal to 1"),
        ({"train.epochs": 2.5}, "train.epochs = 2.5"),
        ({"train.model": "alexnet"}, "train.model = 'alexnet': Input should be 'mnist_cnn', 'cifar10_tutorial'"),
        (
            {"dataset.name": "imagenet"},
            "dataset.name = 'imagenet': Input should be 'cifar10', 'digits', 'flowers' or 'imagefolder'",
        ),
        ({"train.epocs": 3}, "train.epocs: unknown key; allowed here: model, image_size, epochs"),
        ({"register.owner": "me"}, "register.owner: unknown key; allowed here: model_name"),
        ({"train.learning_rate": 0}, "train.learning_rate = 0: Input should be greater than 0"),
        ({"train.image_size": [2, 28]}, "train.image_size = [2, 28]: both sides must be at least 4 pixels"),
        ({"train.image_size": [28]}, "train.image_size"),
        ({"dataset.test_fraction": 0.95}, "dataset: validation_fraction + test_fraction must be below 1"),
        ({"dataset.shard_size_mb": 0}, "dataset.shard_size_mb = 0: Input should be greater than 0"),
        (
            {"dataset.name": "imagefolder"},
            "dataset: name 'imagefolder' needs dataset.source: a folder with one sub-folder per class",
        ),
        (
            {"dataset.source": "/data/pictures"},
            "dataset: name 'digits' is bundled with scikit-learn: dataset.source and dataset.sha256 must be null",
        ),
        (
            {"dataset.name": "cifar10", "dataset.sha256": "abc123"},
            "dataset.sha256 = 'abc123': a sha256 digest is 64 hexadecimal characters",
        ),
        ({"dataset.image_size": [0, 32]}, "dataset.image_size = [0, 32]: [height, width] in pixels, both at least 1"),
        ({"dataset.source": ""}, "dataset.source = '': String should have at least 1 character"),
        ({"base.seed": "forty-two"}, "base.seed = 'forty-two': Input should be a valid integer"),
    ],
)
def test_a_wrong_value_names_the_key_and_what_is_allowed(overrides, expected):
    with pytest.raises(config.ConfigError) as error:
        config.load_params(REPOSITORY / "params.yaml", overrides)
    assert expected in str(error.value)


def test_a_missing_key_is_named(tmp_path):
    text = (REPOSITORY / "params.yaml").read_text().replace("  epochs:", "  # epochs:")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(config.ConfigError, match=r"train\.epochs: missing"):
        config.load_params(tmp_path / "params.yaml")


def test_an_override_of_an_unknown_section_is_refused():
    with pytest.raises(config.ConfigError, match="'optimizer' is not a section"):
        config.load_params(REPOSITORY / "params.yaml", {"optimizer.name": "sgd"})


def test_a_file_that_is_not_yaml_or_missing_is_named(tmp_path):
    (tmp_path / "broken.yaml").write_text("train: [epochs: 3\n")
    with pytest.raises(
        config.ConfigError,
        match=r"broken.yaml, line 2, column 1: not valid YAML: while parsing a flow sequence \(line 1, column 8\)",
    ):
        config.load_params(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="must hold a mapping of sections"):
        config.load_params(tmp_path / "list.yaml")
    with pytest.raises(config.ConfigError, match="cannot read the params file .*absent.yaml"):
        config.load_params(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.crop_size": [32, 32]}, "crop_size [32, 32] must fit in image_size [28, 28]"),
        ({"train.model": "inception_v3"}, "inception_v3 needs an input of at least 75x75 pixels, got [28, 28]"),
        (
            {"train.model": "vgg16", "train.image_size": [64, 64], "train.crop_size": [24, 24]},
            "vgg16 needs an input of at least 32x32",
        ),
        ({"train.schedule": "piecewise"}, "the piecewise schedule needs boundaries: increasing positive steps, got []"),
        ({"train.schedule": "piecewise", "train.boundaries": [500, 100]}, "got [500, 100]"),
        (
            {"train.pretrained_weights": "imagenet"},
            "apply to inception_v3 only; mnist_cnn needs pretrained_weights: none",
        ),
        ({"train.augment": ["crop"]}, "augment lists crop, but there is nothing to crop"),
        ({"train.augment": ["flip", "flip"]}, "augment lists an augmentation twice"),
        (
            {"train.augment": ["rotate"]},
            "train.augment.0 = 'rotate': Input should be 'flip', 'crop', 'shift', 'brightness' or 'contrast'",
        ),
        ({"train.optimizer": "lbfgs"}, "train.optimizer = 'lbfgs': Input should be 'sgd', 'momentum', 'nesterov'"),
        (
            {"train.strategy": "tpu"},
            "train.strategy = 'tpu': Input should be 'auto', 'mirrored', 'multi_worker' or 'one_device'",
        ),
        ({"train.mixed_precision": "yes"}, "train.mixed_precision"),
        ({"train.cpu_devices": 0}, "train.cpu_devices = 0: Input should be greater than or equal to 1"),
        ({"train.label_smoothing": 1}, "train.label_smoothing = 1: Input should be less than 1"),
    ],
)
def test_a_wrong_training_setting_names_what_is_allowed(overrides, expected):
    with pytest.raises(config.ConfigError) as error:
        config.load_params(REPOSITORY / "params.yaml", overrides)
    assert expected in str(error.value)


def test_every_model_has_a_readme_row_whose_settings_are_valid():
    import re
    import shlex

    import yaml

    section = (REPOSITORY / "README.md").read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    rows = {match.group(1): line for line in section.splitlines() if (match := re.match(r"\| `(\w+)`", line))}
    assert set(config.MODELS) <= set(rows) | {"vgg19"}, "each model has a row (vgg19 shares vgg16's)"
    for model, row in rows.items():
        words = shlex.split(row.split("|")[3].replace("`", " "))
        overrides = {}
        # strict=False: each word paired with the next one, so words[1:] is one shorter.
        for flag, setting in zip(words, words[1:], strict=False):
            if flag == "-S":
                key, value = setting.split("=", 1)
                overrides[key] = yaml.safe_load(value)
        params = config.load_params(REPOSITORY / "params.yaml", overrides)
        assert params.train.model == model
