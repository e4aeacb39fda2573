"""Getting archives: resumable, checksummed, retried HTTP downloads and safe extraction.

A download streams to `<name>.partial` beside its destination, is checked against the expected
sha256 and only then renamed into place, so a file under the final name is always complete and
verified. An interrupted download resumes with an HTTP Range request; transient failures (a dropped
connection, a 5xx, a timeout) are retried with growing waits. Extraction refuses any member that
could write outside the target folder and names it.

A server that asks for a user name and password (HTTP basic authentication) gets them from the
netrc file (the file named by NETRC, else ~/.netrc), as curl and pip read it, never from the URL:
dataset.source is committed with params.yaml and logged to MLflow. The file is read only when the
server asks, and only for the scheme, host and port of the URL asked for: a redirect elsewhere (to a
storage service, say) never gets them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import netrc
import os
import pathlib
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import tqdm

from tasks.common import disk, errors, files

ATTEMPTS = 5  # one try and four retries: rides out a restarting server, fails within a minute when down
BACKOFF_SECONDS = 2.0  # waits 2, 4, 8, 16 s between tries
TIMEOUT_SECONDS = 60  # per socket operation; a stalled transfer counts as a transient failure
_BLOCK = 1 << 20
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
NETRC_HINT = "~/.netrc (or the file named by NETRC), one line per host: machine <host> login <user> password <password>"


class DownloadError(errors.PipelineError, OSError):
    """A download that failed; the subclass says whether a later run may succeed."""


class DownloadOutage(DownloadError, errors.Outage):
    """The network or the server kept failing (dropped connections, timeouts, 5xx, 429): waiting may help."""


class DownloadRefused(DownloadError, errors.BadInput):
    """The server refused the request or has no such file (401, 403, 404, any status not known to be
    transient), or the netrc file is broken: dataset.source or the credentials must change."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def cached_name(url: str) -> str:
    """A file name for `url` in the downloads folder: its own name, prefixed so two URLs never collide."""
    basename = pathlib.PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{basename}"


def download(url: str, destination: pathlib.Path, sha256: str | None) -> pathlib.Path:
    """`destination`, downloaded from `url` unless already there and matching `sha256`.

    With no expected digest the server decides: a cached copy is revalidated with If-None-Match /
    If-Modified-Since, so an unchanged file is not fetched twice and a changed one is. A file the server
    announces larger than the room on the disk is not started (errors.DiskFull, as is a disk that fills).
    """
    with disk.writing({"paths.downloads": destination.parent}):
        return _download(url, destination, sha256)


def _download(url: str, destination: pathlib.Path, sha256: str | None) -> pathlib.Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    record_path = destination.with_name(destination.name + ".json")
    if destination.is_file():
        if sha256 is not None:
            if files.sha256_of(destination) == sha256:
                return destination
            destination.unlink()  # our own cache, not a user's file: a stale or damaged copy
        elif _still_current(url, record_path):
            return destination
    partial = destination.with_name(destination.name + ".partial")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            validators = _transfer(url, partial)
            break
        except DownloadError:
            raise
        except (OSError, http.client.HTTPException) as error:
            if _local(error):
                raise  # the downloads folder, not the network: a full disk or a file that cannot be written
            if attempt == ATTEMPTS:
                raise DownloadOutage(
                    f"{errors.redact(url)}: gave up after {ATTEMPTS} attempts: {_describe(error)}"
                ) from None
            wait = BACKOFF_SECONDS * 2 ** (attempt - 1)
            print(
                f"download: {errors.redact(url)}: {_describe(error)}; "
                f"retrying in {wait:g} s ({attempt}/{ATTEMPTS - 1})",
                file=sys.stderr,
            )
            time.sleep(wait)
    actual = files.sha256_of(partial)
    if sha256 is not None and actual != sha256:
        partial.unlink()  # resuming a wrong file would only repeat the mismatch
        raise errors.BadInput(
            f"{errors.redact(url)}: sha256 mismatch: expected {sha256}, got {actual}; the download was discarded. "
            "Check dataset.source and dataset.sha256 (a mirror may serve another version)."
        )
    os.replace(partial, destination)
    files.write_json(record_path, {"url": url, "sha256": actual, **validators})
    return destination


def _still_current(url: str, record_path: pathlib.Path) -> bool:
    record = _validators(record_path)
    headers = {}
    if record.get("etag"):
        headers["If-None-Match"] = record["etag"]
    if record.get("last_modified"):
        headers["If-Modified-Since"] = record["last_modified"]
    if record.get("url") != url or not headers:
        return False
    try:
        with _open(url, headers):
            return False  # 200: the server has something newer
    except urllib.error.HTTPError as error:
        return error.code == 304
    except (OSError, http.client.HTTPException):
        return True  # offline: the copy we have is the best there is; it was complete when kept


def _transfer(url: str, partial: pathlib.Path) -> dict[str, str]:
    """Appends the rest of `url` to `partial` (all of it when empty); the response's validators."""
    offset = partial.stat().st_size if partial.is_file() else 0
    validators_path = partial.with_name(partial.name + ".json")
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        # If-Range: the server sends the rest only if the file is still the one we started on.
        validator = _validators(validators_path)
        if validator.get("etag") or validator.get("last_modified"):
            headers["If-Range"] = validator.get("etag") or validator["last_modified"]
    try:
        response = _open(url, headers)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file is not a prefix of this resource
            partial.unlink()
            return _transfer(url, partial)
        if error.code in _TRANSIENT_STATUS:
            raise
        hint = (
            f"; the server wants credentials it accepts: put them in {NETRC_HINT}" if error.code in (401, 403) else ""
        )
        # Not a transient status: the same request would get the same answer, now or tomorrow.
        raise DownloadRefused(f"{errors.redact(url)}: HTTP {error.code} {error.reason}{hint}") from None
    with response:
        resumed = (
            offset
            and response.status == 206
            and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        )
        validators = {
            key: value
            for key, value in (
                ("etag", response.headers.get("ETag")),
                ("last_modified", response.headers.get("Last-Modified")),
            )
            if value
        }
        length = response.headers.get("Content-Length")  # what is still to come, resumed or not
        if length is not None:
            name = pathlib.PurePosixPath(urllib.parse.urlsplit(url).path).name or "the file"
            disk.require(disk.Need(partial.parent, int(length), f"the download of {name}", "paths.downloads"))
        if not resumed:
            offset = 0  # the server sent the whole file
            files.write_json(validators_path, validators)
        total = offset + int(length) if length is not None else None
        _append(response, partial, url, offset, total, resumed)
    validators_path.unlink(missing_ok=True)
    return validators


def _append(response, partial: pathlib.Path, url: str, offset: int, total: int | None, resumed: bool) -> None:
    """Writes the response's body after `offset` bytes of `partial` (over it when not resumed), with a progress bar."""
    progress = tqdm.tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=pathlib.PurePosixPath(urllib.parse.urlsplit(url).path).name,
        file=sys.stderr,
        leave=False,
    )
    with progress, partial.open("ab" if resumed else "wb") as stream:
        for block in iter(lambda: response.read(_BLOCK), b""):
            stream.write(block)
            progress.update(len(block))
        stream.flush()
        os.fsync(stream.fileno())
    if total is not None and partial.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - partial.stat().st_size)


def _validators(path: pathlib.Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _open(url: str, headers: dict[str, str]):
    request = urllib.request.Request(
        url, headers={"User-Agent": "image-pipeline", "Accept-Encoding": "identity", **headers}
    )
    # urllib's own basic-auth handler answers the server's challenge, and only for URLs under `url`'s
    # scheme, host and port; the passwords come from netrc.
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(_NetrcPasswords(url)))
    return opener.open(request, timeout=TIMEOUT_SECONDS)


class _NetrcPasswords(urllib.request.HTTPPasswordMgr):
    """The netrc file's login and password for the host of `url`, for a server of that scheme, host and port
    that asks."""

    def __init__(self, url: str):
        super().__init__()
        parts = urllib.parse.urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc}"

    def find_user_password(self, realm: str | None, authuri: str) -> tuple[str | None, str | None]:
        if not self.is_suburi(
            self.reduce_uri(self.origin, default_port=True), self.reduce_uri(authuri, default_port=True)
        ):
            return None, None
        named = os.environ.get("NETRC")
        path = pathlib.Path(named) if named else pathlib.Path.home() / ".netrc"
        if not path.is_file():
            return None, None
        try:
            # The default file is read with no path given, so that Python refuses it when other users can read it.
            hosts = netrc.netrc(str(path) if named else None)
        except netrc.NetrcParseError as error:
            # Not error.msg: it quotes the token it stumbled on, which may be a password.
            raise DownloadRefused(
                f"{path}, line {error.lineno}: not valid netrc; fix the file ({NETRC_HINT})"
            ) from None
        host = (urllib.parse.urlsplit(authuri).hostname or "").lower()
        entry = next(
            (entry for name, entry in hosts.hosts.items() if name.lower() == host), None
        ) or hosts.authenticators("default")
        return (entry[0], entry[2]) if entry else (None, None)


def _local(error: BaseException) -> bool:
    """Whether `error` concerns a file on this machine (it names one, or the disk is full) rather than the
    connection."""
    if errors.disk_full(error):
        return True
    return isinstance(error, OSError) and error.filename is not None and not isinstance(error, urllib.error.URLError)


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, http.client.IncompleteRead):
        return f"connection closed with {error.expected} bytes still to come"
    return f"{type(error).__name__}: {error}"


def extract(archive: pathlib.Path, target: pathlib.Path) -> None:
    """Unpacks a .zip, .tar, .tar.gz or .tgz into `target`, refusing members that could escape it."""
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target)
    else:
        raise errors.BadInput(f"{archive} is neither a zip nor a tar archive (.zip, .tar, .tar.gz, .tgz)")


def _require_room(archive: pathlib.Path, target: pathlib.Path, sizes: list[int]) -> None:
    """Stops before anything is unpacked when the members' sizes (in whole blocks) do not fit on the disk."""
    shown = files.destination_of(target)  # the folder a person knows: data/raw/flowers, not its staged name
    while shown.name.startswith(".") and shown != shown.parent:
        shown = shown.parent
    disk.require(disk.Need(shown, disk.stored_bytes(sizes, target), f"the unpacked files of {archive.name}"))


def _refuse(archive: pathlib.Path, member: str, why: str) -> errors.BadInput:
    return errors.BadInput(f"{archive}: refused to extract member {member!r}: {why}; nothing was extracted")


def _check_name(archive: pathlib.Path, name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _refuse(archive, name, "absolute path")
    if ".." in parts:
        raise _refuse(archive, name, "'..' component leads outside the target folder")


def _extract_tar(archive: pathlib.Path, target: pathlib.Path) -> None:
    if not hasattr(tarfile, "data_filter"):
        # Not the input's fault, and no retry installs another Python: a plain failure (exit 1).
        raise errors.PipelineError("safe tar extraction needs Python 3.10.12+, 3.11.4+ or 3.12 (tarfile.data_filter)")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:  # all checked before anything is written
            _check_name(archive, member.name)
            try:
                tarfile.data_filter(member, str(target))
            except tarfile.FilterError as error:
                raise _refuse(archive, member.name, f"{type(error).__name__}: {error}") from None
        _require_room(archive, target, [member.size if member.isfile() else 1 for member in members])
        tar.extractall(target, members=members, filter="data")


def _extract_zip(archive: pathlib.Path, target: pathlib.Path) -> None:
    with zipfile.ZipFile(archive) as zip_file:
        members = zip_file.infolist()
        for member in members:
            _check_name(archive, member.filename)
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                link = zip_file.read(member).decode("utf-8", "replace")
                inside = os.path.normpath(os.path.join(os.path.dirname(member.filename), link))
                if os.path.isabs(link) or inside == ".." or inside.startswith("../"):
                    raise _refuse(archive, member.filename, f"link to {link!r} points outside the target folder")
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise _refuse(archive, member.filename, "device, pipe or socket, not a regular file")
        _require_room(archive, target, [member.file_size or 1 for member in members])
        zip_file.extractall(target, members=members)
