"""The lock files against pyproject.toml: made from today's dependency tables, and pinning each requirement.

`make lock` writes requirements.lock (dependencies + test + onnx) and requirements-gpu.lock (+ gpu) with uv
and stamps each with a digest of pyproject.toml's dependency tables (`python tests/test_lock.py --stamp`).
Run as a script, this module checks the stamps in a blink and offline: `make pipeline`, `make test` and
`make flow` do so once .venv is installed, and stop there with what to run when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
# Each lock file and the extras it holds besides the dependencies.
LOCKS = {"requirements.lock": ("test", "onnx"), "requirements-gpu.lock": ("test", "onnx", "gpu")}
STAMP = "# pyproject.toml's dependency tables, sha256: "
# The lock is universal: each Python release the project allows, on the platforms people train on.
PLATFORMS = [("linux", "Linux", "x86_64"), ("linux", "Linux", "aarch64"), ("darwin", "Darwin", "arm64")]
PYTHONS = ["3.10.0", "3.10.99", "3.11.0", "3.11.99", "3.12.0", "3.12.99"]


def dependency_digest(pyproject: pathlib.Path = PYPROJECT) -> str:
    """sha256 of what a lock is made from: requires-python, dependencies and extras (not comments, not tools)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    tables = {key: project.get(key) for key in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def stamp_of(lock: pathlib.Path) -> str | None:
    """The digest a lock file was stamped with, or None."""
    for line in lock.read_text().splitlines():
        if line.startswith(STAMP):
            return line.removeprefix(STAMP).strip()
    return None


def stamp(lock: pathlib.Path, digest: str) -> None:
    """Writes the digest into the lock's header, after uv's own lines (uv drops it when it rewrites the file)."""
    lines = [line for line in lock.read_text().splitlines(keepends=True) if not line.startswith(STAMP)]
    header = next((index for index, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(header, f"{STAMP}{digest}\n")
    lock.write_text("".join(lines))


def stale_locks(root: pathlib.Path = ROOT) -> list[str]:
    """What is wrong with the lock files of root, one sentence each; empty when they match pyproject.toml."""
    digest = dependency_digest(root / "pyproject.toml")
    problems = []
    for name in LOCKS:
        lock = root / name
        if not lock.exists():
            problems.append(f"{name} is missing: run `make lock`")
        elif stamp_of(lock) != digest:
            problems.append(f"pyproject.toml's dependencies changed since {name} was made: run `make lock`")
    return problems


def pins(lock: pathlib.Path) -> list:
    """The lock's `name==version ; marker` lines as packaging Requirements (hashes and comments left out)."""
    from packaging.requirements import Requirement

    lines = lock.read_text().splitlines()
    return [Requirement(line.rstrip(" \\")) for line in lines if line and not line.startswith((" ", "#", "-"))]


def environments() -> list[dict[str, str]]:
    """Marker environments for each Python release and platform the lock must serve."""
    from packaging.markers import default_environment

    result = []
    for full_version in PYTHONS:
        for sys_platform, platform_system, machine in PLATFORMS:
            environment = dict(default_environment())
            environment.update(
                python_version=full_version.rsplit(".", 1)[0],
                python_full_version=full_version,
                sys_platform=sys_platform,
                platform_system=platform_system,
                platform_machine=machine,
                os_name="posix",
                implementation_name="cpython",
                platform_python_implementation="CPython",
            )
            result.append(environment)
    return result


# ---------------------------------------------------------------------------------------------------------


def test_locks_were_made_from_todays_pyproject():
    problems = stale_locks()
    assert not problems, "\n".join(problems)


def test_a_changed_dependency_makes_the_lock_stale(tmp_path):
    for name in LOCKS:
        (tmp_path / name).write_text((ROOT / name).read_text())
    text = PYPROJECT.read_text()
    (tmp_path / "pyproject.toml").write_text(text)
    assert stale_locks(tmp_path) == []

    # A comment or a tool's setting is not a dependency; a new requirement is.
    (tmp_path / "pyproject.toml").write_text(text + "\n# a note\n[tool.example]\nsetting = 1\n")
    assert stale_locks(tmp_path) == []
    (tmp_path / "pyproject.toml").write_text(text.replace("dependencies = [", 'dependencies = [\n    "six",', 1))
    assert stale_locks(tmp_path) == [
        "pyproject.toml's dependencies changed since requirements.lock was made: run `make lock`",
        "pyproject.toml's dependencies changed since requirements-gpu.lock was made: run `make lock`",
    ]

    (tmp_path / "requirements-gpu.lock").unlink()
    assert "requirements-gpu.lock is missing: run `make lock`" in stale_locks(tmp_path)


def test_each_requirement_is_pinned_once_to_a_version_it_allows():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wrong: dict[str, list[str]] = {}  # what is wrong -> where (Python release and platform)
    for name, extras in LOCKS.items():
        locked = pins(ROOT / name)
        texts = project["dependencies"] + [text for extra in extras for text in project["optional-dependencies"][extra]]
        for environment in environments():
            platform = f"{environment['sys_platform']} {environment['platform_machine']}"
            where = f"Python {environment['python_full_version']} on {platform}"
            for requirement in map(Requirement, texts):
                if requirement.marker and not requirement.marker.evaluate(environment):
                    continue
                versions = [
                    next(iter(pin.specifier)).version
                    for pin in locked
                    if canonicalize_name(pin.name) == canonicalize_name(requirement.name)
                    and (pin.marker is None or pin.marker.evaluate(environment))
                ]
                if len(versions) != 1:
                    wrong.setdefault(f"{name}: {len(versions)} pins of {requirement.name}", []).append(where)
                elif not requirement.specifier.contains(versions[0], prereleases=True):
                    problem = f"{name}: {requirement.name}=={versions[0]} does not satisfy {requirement}"
                    wrong.setdefault(problem, []).append(where)
    report = [f"{problem} ({places[0]} and {len(places) - 1} more)" for problem, places in sorted(wrong.items())]
    assert not wrong, "run `make lock`:\n" + "\n".join(report)


def test_the_gpu_lock_is_the_cpu_lock_plus_cuda():
    cpu = {str(pin) for pin in pins(ROOT / "requirements.lock")}
    gpu = {str(pin) for pin in pins(ROOT / "requirements-gpu.lock")}
    assert cpu <= gpu, f"pinned otherwise in requirements-gpu.lock, run `make lock`: {sorted(cpu - gpu)}"
    assert not [pin for pin in cpu if pin.startswith("nvidia-")]
    added = {pin.split("==")[0] for pin in gpu - cpu}
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-ml-py"} <= added


def main(arguments: list[str]) -> int:
    if arguments == ["--stamp"]:
        for name in LOCKS:
            stamp(ROOT / name, dependency_digest())
        return 0
    problems = stale_locks()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
