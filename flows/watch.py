"""Start the nightly deployment when new images arrive: watch the source image folder, announce each change once.

    export PREFECT_API_URL=http://127.0.0.1:4200/api      # the server that serves the deployment
    python -m flows.watch                                  # dataset.source of ./params.yaml (imagefolder)
    python -m flows.watch --folder /data/photos --quiet-seconds 300
    python -m flows.watch --once                           # from cron: check, announce if changed, exit

Every --interval seconds the watcher takes the folder's fingerprint: the names, sizes and modification
times of all its files, no file read (the digest download records in layout.json). When it differs
from the one announced last and then stays the same for --quiet-seconds, the watcher emits one Prefect
event, `image-pipeline.source.changed` about `image-pipeline.folder.<absolute path>`, and the
deployment (flows/deploy.py, prefect.yaml) starts a run on it. The quiet period is what makes a copy
of 10,000 files one run, not 10,000: a copy that pauses longer than it gives two.

What was announced last is kept in a small state file outside the folder (by default under
$XDG_STATE_HOME or ~/.local/state: image-pipeline/watch/), so a restarted watcher stays quiet about a
folder it announced before. Its first look at a folder only records it; the nightly schedule covers
what changed before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import sys
import time

from tasks.common import config, errors, files
from tasks.data import fetch

EVENT = "image-pipeline.source.changed"
RESOURCE_PREFIX = "image-pipeline.folder."


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one look at the folder saw."""

    fingerprint: str  # sha256 of every file's relative path, size and modification time
    files: int
    bytes: int


def resource_id(folder: str | os.PathLike) -> str:
    """The Prefect resource a change of `folder` is about; the deployment's trigger matches it."""
    return RESOURCE_PREFIX + str(pathlib.Path(folder).resolve())


def source_folder(params: config.Params) -> pathlib.Path | None:
    """The local folder the pipeline reads its images from: dataset.source of imagefolder; None for
    the built-in data sets, archives and URLs (nothing to watch)."""
    source = params.dataset.source
    if params.dataset.name != "imagefolder" or not source or fetch.is_url(source):
        return None
    path = pathlib.Path(source)
    return None if path.is_file() else path.resolve()


def snapshot(folder: pathlib.Path) -> Snapshot:
    """The fingerprint of `folder` from one os.scandir walk. Symbolic links to folders are not followed;
    a file removed while the walk passes is left out (the next look sees the folder as it is then)."""
    entries: list[tuple[tuple[str, ...], int, int]] = []
    pending = [(folder, ())]
    while pending:
        directory, parts = pending.pop()
        try:
            with os.scandir(directory) as listing:
                for entry in listing:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append((pathlib.Path(entry.path), (*parts, entry.name)))
                        elif entry.is_file():
                            status = entry.stat()
                            entries.append(((*parts, entry.name), status.st_size, status.st_mtime_ns))
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            if directory == folder:
                raise errors.MissingInput(f"{folder} does not exist: {_WHAT_TO_GIVE}") from None
        except NotADirectoryError:
            if directory == folder:
                raise errors.BadInput(f"{folder} is a file, not a folder: {_WHAT_TO_GIVE}") from None
    digest = hashlib.sha256()
    for parts, size, modified in sorted(entries):  # by path components, as sorted pathlib paths are
        digest.update(f"{'/'.join(parts)}\t{size}\t{modified}\n".encode())
    return Snapshot(digest.hexdigest(), len(entries), sum(size for _, size, _ in entries))


_WHAT_TO_GIVE = "give the image folder with --folder, or set dataset.source in params.yaml to it"


def default_state_path(folder: pathlib.Path) -> pathlib.Path:
    """Where the watcher of `folder` keeps what it announced: a per-user state folder, never the image folder."""
    root = pathlib.Path(os.environ.get("XDG_STATE_HOME") or pathlib.Path.home() / ".local" / "state")
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    return root / "image-pipeline" / "watch" / f"{folder.name or 'root'}-{key}.json"


def read_state(state_path: pathlib.Path, folder: pathlib.Path) -> str | None:
    """The fingerprint announced last for `folder`; None when nothing was recorded (or the file is unusable)."""
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        say(f"{state_path} is unreadable ({error}): starting afresh")
        return None
    if not isinstance(state, dict) or state.get("folder") != str(folder):
        return None
    return state.get("fingerprint")


def write_state(state_path: pathlib.Path, folder: pathlib.Path, seen: Snapshot, announced: bool) -> None:
    files.write_json(
        state_path,
        {
            "folder": str(folder),
            "fingerprint": seen.fingerprint,
            "files": seen.files,
            "announced": announced,  # false: the first look, recorded without an event
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def announce(folder: pathlib.Path, seen: Snapshot) -> None:
    """Emits the change event to the Prefect API; an Outage when the API cannot be reached."""
    import prefect.events
    import prefect.settings
    import websockets.exceptions

    event = prefect.events.Event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(folder), "prefect.resource.name": folder.name},
        payload={"folder": str(folder), "files": seen.files, "bytes": seen.bytes, "fingerprint": seen.fingerprint},
    )

    # The events client itself, not emit_event: emit_event hands the event to a background worker that
    # only logs a failure, and a change lost while the server is down would never be announced again.
    async def send() -> None:
        async with prefect.events.get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    try:
        asyncio.run(send())
    except (OSError, websockets.exceptions.WebSocketException) as error:
        url = prefect.settings.get_current_settings().api.url
        raise errors.Outage(f"could not send {EVENT} to the Prefect API at {url}: {error}") from error


def watch(folder: pathlib.Path, state_path: pathlib.Path, interval: float, quiet_seconds: float, once: bool) -> None:
    """Announces each change of `folder` once it has been quiet for `quiet_seconds`; with `once`, at most
    one (waiting for quiet if a change is under way), then returns."""
    announced = read_state(state_path, folder)
    if announced is None:
        first = snapshot(folder)
        write_state(state_path, folder, first, announced=False)
        say(f"{folder}: first look, {_files(first)} recorded in {state_path}; a change from now on starts a run")
        if once:
            return
        announced = first.fingerprint
    pending, since = None, 0.0
    while True:
        current, now = snapshot(folder), time.monotonic()
        if current.fingerprint == announced:
            if once:
                say(f"{folder}: unchanged since last recorded ({_files(current)}); nothing sent")
                return
            pending = None
        elif pending is None or current != pending:
            pending, since = current, now  # still changing: the quiet period starts again
        elif now - since >= quiet_seconds:
            try:
                announce(folder, current)
            except errors.Outage as error:
                if once:
                    raise
                say(f"{error}; trying again in {interval:g} s")
            else:
                write_state(state_path, folder, current, announced=True)
                say(f"{folder}: {_files(current)}, quiet for {quiet_seconds:g} s: sent {EVENT}")
                if once:
                    return
                announced, pending = current.fingerprint, None
        time.sleep(interval)


def _files(seen: Snapshot) -> str:
    return f"{seen.files:,} file{'' if seen.files == 1 else 's'}"


def say(line: str) -> None:
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} flows.watch: {line}", flush=True)


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start the pipeline's deployment when the image folder changes.")
    parser.add_argument("--params", default="params.yaml", help="dataset.source is the folder (default: %(default)s)")
    parser.add_argument("--folder", help="the folder to watch instead of dataset.source")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between looks (default: %(default)g)")
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=60.0,
        help="a change is announced once the folder stayed the same this long (default: %(default)g)",
    )
    parser.add_argument("--once", action="store_true", help="look once, announce a change if any, exit (for cron)")
    parser.add_argument("--state", help="the state file (default: under $XDG_STATE_HOME or ~/.local/state)")
    options = errors.add_verbose_option(parser).parse_args(arguments)
    if options.interval <= 0 or options.quiet_seconds < 0:
        raise errors.BadInput(
            f"--interval {options.interval:g} and --quiet-seconds {options.quiet_seconds:g}: "
            "expected an interval above 0 and quiet seconds of 0 or more"
        )
    folder = _folder(options.params, options.folder)
    state_path = pathlib.Path(options.state).resolve() if options.state else default_state_path(folder)
    if state_path.is_relative_to(folder):
        raise errors.BadInput(f"--state {state_path} lies inside {folder}: writing it would change the folder")
    _require_api_url()
    watch(folder, state_path, options.interval, options.quiet_seconds, options.once)


def _folder(params_file: str, folder: str | None) -> pathlib.Path:
    if folder is not None:
        path = pathlib.Path(folder).resolve()
    else:
        params = config.load_params(params_file)
        path = source_folder(params)
        if path is None:
            raise errors.BadInput(
                f"{params_file}: dataset.name {params.dataset.name!r} with dataset.source "
                f"{params.dataset.source!r} is no local image folder: nothing to watch; {_WHAT_TO_GIVE}"
            )
    if not path.exists():
        raise errors.MissingInput(f"the image folder {path} does not exist: {_WHAT_TO_GIVE}")
    if not path.is_dir():
        raise errors.BadInput(f"{path} is a file, not a folder: {_WHAT_TO_GIVE}")
    return path


def _require_api_url() -> None:
    # Without an API URL Prefect would start a private, temporary server: the event would reach no deployment.
    import prefect.settings

    if not prefect.settings.get_current_settings().api.url:
        raise errors.BadInput(
            "PREFECT_API_URL is not set: the watcher announces changes to the Prefect server that serves the "
            "deployment; export PREFECT_API_URL=http://<host>:4200/api (or set it in the Prefect profile)"
        )


if __name__ == "__main__":
    sys.exit(errors.run_main(main))
