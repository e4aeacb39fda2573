import PIL.Image

from tasks import config, download
from tests.conftest import REPOSITORY


def test_digits_are_written_as_an_image_folder(workdir):
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    result = download.download(dataset, workdir / "raw" / "digits", workdir / "downloads")

    assert result.file_count == 1797
    assert result.class_names == tuple(str(digit) for digit in range(10))
    folders = sorted(path.name for path in (workdir / "raw" / "digits").iterdir() if path.is_dir())
    assert folders == list(result.class_names)
    assert result.splits == ()
    images = sorted((workdir / "raw" / "digits").rglob("*.png"))
    assert len(images) == 1797
    with PIL.Image.open(images[0]) as image:
        assert image.size == (8, 8)
        assert image.mode == "L"
        assert image.getextrema()[1] > 200  # 0..16 stretched to 0..255


def test_a_second_download_replaces_the_first_and_leaves_nothing_partial(workdir):
    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    target = workdir / "raw" / "digits"
    download.download(dataset, target, workdir / "downloads")
    (target / "0" / "stray.png").write_bytes(b"left over")
    download.download(dataset, target, workdir / "downloads")

    assert not (target / "0" / "stray.png").exists()
    assert sorted(path.name for path in (workdir / "raw").iterdir()) == ["digits"]
    assert len(list(target.rglob("*.png"))) == 1797
