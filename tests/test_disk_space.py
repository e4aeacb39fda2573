"""A full disk says where and how much: a stage whose estimate does not fit stops before writing, naming
the folder, the room it needs and the room free; a disk that fills up anyway names the folder or file
being written and the space free there now.

Free space is simulated in-process (shutil.disk_usage) for the checks made before writing; a full disk
met while writing is the kernel's own ENOSPC, from writes to /dev/full. One test runs convert on real
small file systems (tmpfs in a mount namespace of its own, no root needed) and skips where that is not
allowed.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tasks import convert, download
from tasks.common import config, disk, errors, files
from tasks.data import fetch, tfrecords
from tests.conftest import REPOSITORY, make_image_folder, write_params


def _one_line(stderr: str, program: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{program}: error: "), stderr
    return lines[0]


_Usage = collections.namedtuple("_Usage", "total used free")  # shutil.disk_usage's answer


def _free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Every disk reports `free` bytes free: the only part of the disk that is simulated."""
    real = shutil.disk_usage

    def usage(path):
        total, used, _ = real(path)
        return _Usage(total, used, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)


@pytest.fixture
def project(workdir: pathlib.Path) -> pathlib.Path:
    """A working folder whose params.yaml converts a small image folder (downloaded: hard links)."""
    folder = make_image_folder(workdir / "images", classes=3, per_class=12, size=32)
    write_params(workdir / "params.yaml", {"dataset.name": "imagefolder", "dataset.source": str(folder)})
    assert errors.run_main(download.main, []) == 0
    return workdir


def _estimate(monkeypatch: pytest.MonkeyPatch, shards: pathlib.Path) -> int:
    """convert's estimate for `shards`, caught on its way to the check, from a run that fits."""
    seen = []
    check = disk.require
    monkeypatch.setattr(disk, "require", lambda *needs: seen.extend(needs) or check(*needs))
    assert errors.run_main(convert.main, []) == 0
    monkeypatch.setattr(disk, "require", check)
    shutil.rmtree(shards)
    shutil.rmtree(pathlib.Path("reports"))
    (need,) = seen
    assert need.folder == shards.relative_to(pathlib.Path.cwd()) and need.setting == "paths.shards"
    return need.bytes


def test_convert_stops_before_writing_a_shard_when_its_estimate_does_not_fit(project, monkeypatch, capsys):
    shards = project / "data" / "shards" / "imagefolder"
    needed = disk.with_margin(_estimate(monkeypatch, shards))
    digests = project / "data" / "downloads" / "imagefolder-digests.sqlite"  # download's, which convert rewrites
    written = digests.stat().st_mtime_ns
    capsys.readouterr()

    _free_space(monkeypatch, needed - 1)
    code = errors.run_main(convert.main, [])
    line = _one_line(capsys.readouterr().err, "tasks.convert")

    assert code == 1
    assert line == (
        f"tasks.convert: error: data/shards/imagefolder: not enough disk space for the shards (and the spool they "
        f"are written from): needs about {disk.megabytes(needed)} with a safety margin, "
        f"{disk.megabytes(needed - 1)} free (stopped before writing it); free space on that disk, or point "
        "paths.shards in params.yaml at a disk with more room"
    )
    assert list((project / "data" / "shards").iterdir()) == [], "nothing written, not even a staging folder"
    assert digests.stat().st_mtime_ns == written, "the digests' record is not rewritten either"
    assert not (project / "reports").exists(), "no data-change report either"

    _free_space(monkeypatch, needed)  # just enough: the stage runs as it always does
    assert errors.run_main(convert.main, []) == 0
    assert (shards / "manifest.json").is_file()


FULL_DEVICE = pathlib.Path("/dev/full")  # Linux: every write to it fails with ENOSPC


def _framed_on_a_full_disk(record: bytes) -> bytes:
    """tfrecords.frame, as convert frames each record it writes, on a full disk: the record's write goes to
    /dev/full, whose kernel error is the one a full disk gives a write (it names no file)."""
    with FULL_DEVICE.open("wb", buffering=0) as full:
        full.write(record)
    return record


def test_a_disk_that_fills_up_while_convert_writes_names_the_folder_and_the_space_free(project, monkeypatch, capsys):
    if not FULL_DEVICE.exists():
        pytest.skip("no /dev/full here")
    monkeypatch.setattr(tfrecords, "frame", _framed_on_a_full_disk)
    code = errors.run_main(convert.main, [])
    line = _one_line(capsys.readouterr().err, "tasks.convert")

    assert code == 1
    pattern = (
        r"tasks\.convert: error: the disk filled up while writing data/shards/imagefolder \(No space left on device\); "
        r"(?P<free>[\d,.]+) MB free on the disk of data/shards/imagefolder now; free space on that disk, or point "
        r"paths\.shards in params\.yaml at a disk with more room"
    )
    match = re.fullmatch(pattern, line)
    assert match, line
    # Measured after the partial shards were removed; other programs write meanwhile: within 100 MB.
    assert abs(float(match["free"].replace(",", "")) * 1e6 - shutil.disk_usage(project).free) < 100e6
    assert list((project / "data" / "shards").iterdir()) == [], "the partial shards were removed"


def test_a_full_disk_a_file_names_is_named_with_its_folder_and_the_space_free_there(tmp_path):
    import tensorflow as tf

    # TensorFlow's writers say it in words, with no errno.
    shard = tmp_path / ".shards.123-abc.partial" / "train-00000-of-00001.tfrecord"
    full = tf.errors.ResourceExhaustedError(None, None, f"{shard}; No space left on device")
    assert errors.disk_full(full) and errors.exit_code(full) == 1 and errors.worth_retrying(full)
    message = errors.describe(full)
    assert message.startswith(f"{shard}; No space left on device; ")
    assert f"MB free on the disk of {tmp_path / 'shards'} now; free space there, or " in message

    # Python's own, with the file it was writing.
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.keras"))
    assert errors.describe(full).startswith(f"{tmp_path / 'model.keras'}: No space left on device; ")
    assert f"MB free on the disk of {tmp_path} now" in errors.describe(full)

    # Inside `writing`, the file named by the error is shown under the name it was to have.
    with pytest.raises(errors.DiskFull) as raised, disk.writing({"paths.shards": tmp_path / "shards"}):
        raise tf.errors.ResourceExhaustedError(None, None, f"{shard}; No space left on device")
    assert str(raised.value).startswith(
        f"the disk filled up while writing {tmp_path / 'shards' / 'train-00000-of-00001.tfrecord'} "
        "(No space left on device); "
    )
    assert str(raised.value).endswith("point paths.shards in params.yaml at a disk with more room")


def test_write_bytes_names_the_file_a_failed_write_was_for(tmp_path, monkeypatch):
    if not FULL_DEVICE.exists():
        pytest.skip("no /dev/full here")
    temporary = tmp_path / ".registry.json.1-abc.partial"
    monkeypatch.setattr(files.tempfile, "mkstemp", lambda **_: (os.open(FULL_DEVICE, os.O_WRONLY), str(temporary)))

    with pytest.raises(OSError) as raised:
        files.write_bytes(tmp_path / "registry.json", b"{}")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(temporary)
    assert errors.describe(raised.value).startswith(f"{temporary}: No space left on device; ")
    with pytest.raises(errors.DiskFull) as raised, disk.writing({"paths.registry": tmp_path / "registry.json"}):
        files.write_bytes(tmp_path / "registry.json", b"{}")
    assert str(raised.value).startswith(
        f"the disk filled up while writing {tmp_path / 'registry.json'} (No space left on device); "
    )
    assert str(raised.value).endswith("point paths.registry in params.yaml at a disk with more room")


def test_a_download_larger_than_the_free_space_is_not_started(http_server, workdir, monkeypatch):
    url = http_server.serve("/big.tgz", b"x" * 3_000_000)
    _free_space(monkeypatch, 10_000_000)

    with pytest.raises(errors.DiskFull) as raised:
        fetch.download(url, workdir / "downloads" / "big.tgz", None)

    assert str(raised.value).startswith(
        f"{workdir / 'downloads'}: not enough disk space for the download of big.tgz: needs about "
        f"{disk.megabytes(disk.with_margin(3_000_000))} with a safety margin, 10 MB free"
    )
    assert "point paths.downloads in params.yaml at a disk with more room" in str(raised.value)
    assert len(http_server.gets("/big.tgz")) == 1, "a full disk is not the network: no retries"
    assert [path.name for path in (workdir / "downloads").iterdir() if path.suffix == ".partial"] == []


def test_an_archive_that_would_not_fit_unpacked_is_not_unpacked(workdir, monkeypatch):
    archive = workdir / "images.tar"
    with tarfile.open(archive, "w") as tar:
        for index in range(3):
            member = tarfile.TarInfo(f"images/cats/{index}.png")
            member.size = 2_000_000
            tar.addfile(member, io.BytesIO(b"\0" * member.size))
    target = workdir / "raw" / ".pets.4242-abc.partial" / ".unpacked"
    target.mkdir(parents=True)
    _free_space(monkeypatch, 20_000_000)

    with pytest.raises(errors.DiskFull) as raised:
        fetch.extract(archive, target)

    # Named as the folder a person knows, not the staged one.
    assert str(raised.value).startswith(
        f"{workdir / 'raw' / 'pets'}: not enough disk space for the unpacked files of images.tar: needs about "
    )
    assert list(target.iterdir()) == []


def test_a_folder_copied_to_another_disk_needs_its_files_in_whole_blocks(tmp_path, monkeypatch):
    source = tmp_path / "source"
    (source / "cats").mkdir(parents=True)
    for name, size in (("a.png", 1), ("b.png", 4096), ("c.png", 5000)):
        (source / "cats" / name).write_bytes(b"\0" * size)
    block = disk.block_bytes(tmp_path)
    sizes = sorted(disk.folder_sizes(source))
    assert sizes == [1, 1, 4096, 5000]  # the class folder counts as one block
    assert disk.stored_bytes(sizes, tmp_path) == block * (2 + -(-4096 // block) + -(-5000 // block))

    dataset = config.load_params(REPOSITORY / "params.yaml").dataset
    dataset = dataset.model_copy(update={"name": "imagefolder", "source": str(source)})
    assert download._copy_needed(dataset, tmp_path / "raw") == [], "one disk: hard links, no room needed"
    real_stat = os.stat

    def on_another_disk(path, *args, **kwargs):
        status = real_stat(path, *args, **kwargs)
        if pathlib.Path(path) != source:
            return status
        return os.stat_result((*status[:2], status.st_dev + 1, *status[3:]))

    monkeypatch.setattr(os, "stat", on_another_disk)
    (need,) = download._copy_needed(dataset, tmp_path / "raw")
    assert need.bytes == disk.stored_bytes(sizes, tmp_path) and need.setting == "paths.raw"


def test_the_optimizer_slots_counted_for_train_are_those_keras_keeps():
    import keras

    from tasks.modeling import optimizers

    params = config.load_params(REPOSITORY / "params.yaml").train
    assert set(disk.OPTIMIZER_SLOTS) == set(optimizers.OPTIMIZERS)
    for name in optimizers.OPTIMIZERS:
        for ema in (None, 0.99):
            optimizer = optimizers.make_optimizer(
                params.model_copy(update={"optimizer": name, "ema_momentum": ema}), 10
            )
            weight = keras.Variable(np.zeros((3, 7), "float32"))
            optimizer.build([weight])
            kept = sum(1 for variable in optimizer.variables if tuple(variable.shape) == (3, 7))
            assert kept <= disk.OPTIMIZER_SLOTS[name] + (ema is not None), name
            assert kept >= disk.OPTIMIZER_SLOTS[name] + (ema is not None) - (name == "rmsprop"), name


def test_the_training_estimate_covers_what_keras_writes(tmp_path):
    import keras

    params = config.load_params(REPOSITORY / "params.yaml").train
    params = params.model_copy(update={"optimizer": "adam", "ema_momentum": 0.99, "restore_best": True})
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="mse")
    backups, model_file = disk.training_needs(model, params, tmp_path / "work", tmp_path / "models", chief=True)
    model.fit(np.zeros((4, 16)), np.zeros((4, 10)), verbose=0)
    model.save_weights(tmp_path / "backup.weights.h5")  # what BackupAndRestore and ModelCheckpoint write
    model.save(tmp_path / "model.keras")
    backup = (tmp_path / "backup.weights.h5").stat().st_size

    # Two backups while one replaces the other, and the best epoch's: within the file format's few kB.
    assert 0.9 * backups.bytes <= 3 * backup <= backups.bytes + 3 * 30_000
    assert 0.9 * model_file.bytes <= (tmp_path / "model.keras").stat().st_size <= model_file.bytes + 30_000
    # Another worker of a cluster keeps its own backups, but neither the best epoch's nor the model file.
    (worker_backups,) = disk.training_needs(model, params, tmp_path / "work", tmp_path / "models", chief=False)
    assert worker_backups.bytes == backups.bytes * 2 // 3


# --- real small disks --------------------------------------------------------------------------------

_ON_SMALL_DISKS = """
import os, sys
from tasks import convert
from tasks.common import disk, errors

refused, filled = sys.argv[1:3]
os.chdir(refused)  # its shards folder is on a 10 MB disk: less than the 20 MB every stage keeps free
print("exit", errors.run_main(convert.main, []), flush=True)

os.chdir(filled)  # its shards folder is on a 64 MB disk, which another program fills once the check passed
check = disk.require
def require(*needs):
    check(*needs)
    with open(os.path.join(filled, "shards", "filler"), "wb", buffering=0) as stream:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    stream.write(bytes(chunk))
            except OSError:
                pass
disk.require = require
print("exit", errors.run_main(convert.main, []), flush=True)
"""


def _small_disks_allowed(tmp_path: pathlib.Path) -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def test_convert_on_real_small_disks(tmp_path):
    if not _small_disks_allowed(tmp_path):
        pytest.skip("no tmpfs can be mounted here (unshare --user --mount not allowed)")
    for name in ("refused", "filled"):
        raw = make_image_folder(tmp_path / name / "raw" / "imagefolder", classes=3, per_class=12, size=32)
        settings = {
            "dataset.name": "imagefolder",
            "dataset.source": str(raw),
            "paths.raw": "raw",
            "paths.shards": "shards",
        }
        write_params(tmp_path / name / "params.yaml", settings)
        (tmp_path / name / "shards").mkdir()
    (tmp_path / "run.py").write_text(_ON_SMALL_DISKS)
    mounts = " && ".join(
        f"mount -t tmpfs -o size={size} tmpfs {tmp_path / name / 'shards'}"
        for name, size in (("refused", "10m"), ("filled", "64m"))
    )
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    environment.pop(errors.VERBOSE_VARIABLE, None)
    ran = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'{mounts} && exec "$0" "$@"']
        + [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "refused"), str(tmp_path / "filled")],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    errors_printed = [line for line in ran.stderr.splitlines() if line.startswith("tasks.convert: error:")]
    assert [line for line in ran.stdout.splitlines() if line.startswith("exit")] == ["exit 1", "exit 1"], ran.stderr
    refused, filled = errors_printed
    assert refused.startswith(
        "tasks.convert: error: shards/imagefolder: not enough disk space for the shards (and the spool they are "
        "written from): needs about 20"
    )
    assert "needs about 20 MB with a safety margin, 10 MB free (stopped before writing it)" in refused  # 10 MiB
    assert filled.startswith(
        "tasks.convert: error: the disk filled up while writing shards/imagefolder (No space left on device); "
        "0.0 MB free on the disk of shards/imagefolder now; "
    ), ran.stderr
    assert "Traceback" not in ran.stderr
