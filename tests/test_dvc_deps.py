"""dvc.yaml's code deps are exactly the project modules each stage runs, so `dvc repro` reruns a stage
when, and only when, code it imports has changed. Read with `ast`: fast, and no TensorFlow needed."""

from __future__ import annotations

import ast
import pathlib
import re

import yaml

from tests.conftest import REPOSITORY

PROJECT_PACKAGES = ("tasks", "flows")
STAGE_COMMAND = re.compile(r"python -m (tasks\.[\w.]+)")


def module_path(root: pathlib.Path, dotted_name: str) -> pathlib.Path | None:
    """The project file that `import <dotted_name>` runs, or None for the standard library and third parties."""
    if dotted_name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*dotted_name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: pathlib.Path, dotted_name: str) -> set[str]:
    """Every module a file may import, in functions too; `from a import b` names both a and a.b,
    since b may be a module or an object of a (the object's name finds no file and drops out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative: one dot is the file's own package, each further dot its parent
                package = dotted_name if path.name == "__init__.py" else dotted_name.rpartition(".")[0]
                package = ".".join(package.split(".")[: package.count(".") + 2 - node.level])
                base = f"{package}.{node.module}" if node.module else package
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return {".".join(name.split(".")[:end]) for name in names for end in range(1, name.count(".") + 2)}


def has_code(path: pathlib.Path) -> bool:
    """A package's __init__.py counts only when it holds more than a docstring: a docstring cannot change
    what a stage computes, and listing it would rerun every stage after an edit of the documentation."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def import_closure(root: pathlib.Path, module: str) -> set[str]:
    """The project files, relative to root, that `python -m <module>` may run."""
    closure, pending, seen = set(), [module], set()
    while pending:
        name = pending.pop()
        path = module_path(root, name)
        if name in seen or path is None:
            continue
        seen.add(name)
        if path.name != "__init__.py" or has_code(path):
            closure.add(path.relative_to(root).as_posix())
        pending.extend(imported_names(path, name))
    return closure


def folder_modules(root: pathlib.Path, folder: str) -> dict[str, str]:
    """{file: dotted name} of the modules in a dep folder: a package that loads its modules by name
    (tasks/data/sources), which no import statement names, so the folder stands for all of them."""
    return {
        path.relative_to(root).as_posix(): ".".join(path.relative_to(root).with_suffix("").parts)
        for path in sorted((root / folder).glob("*.py"))
    }


def dependency_problems(root: pathlib.Path) -> list[str]:
    """One line per stage and module where dvc.yaml's deps and the stage's import closure disagree."""
    problems = []
    for stage, definition in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        command = STAGE_COMMAND.fullmatch(str(definition.get("cmd", "")).strip())
        if command is None:
            continue
        deps = [str(dep) for dep in definition.get("deps", []) if str(dep).split("/")[0] in PROJECT_PACKAGES]
        code_deps = {dep for dep in deps if dep.endswith(".py")}
        closure = import_closure(root, command.group(1))
        in_folders: set[str] = set()
        for folder in [dep for dep in deps if (root / dep).is_dir()]:
            if f"{folder}/__init__.py" not in closure:
                problems.append(f"stage {stage}: {folder} is in deps but not imported")
                continue
            for file, name in folder_modules(root, folder).items():
                in_folders.add(file)
                closure |= import_closure(root, name.removesuffix(".__init__"))
        listed = code_deps | set(in_folders)
        problems += [f"stage {stage}: {module} is imported but not in deps" for module in sorted(closure - listed)]
        problems += [f"stage {stage}: {module} is in deps but not imported" for module in sorted(code_deps - closure)]
    return problems


def test_dvc_yaml_deps_match_each_stage_imports():
    problems = dependency_problems(REPOSITORY)
    assert not problems, "dvc.yaml deps disagree with the stages' imports:\n" + "\n".join(problems)


def test_checker_reports_a_missing_and_a_stale_dep(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text('"""Docstring only: not a dep."""\n')
    (tmp_path / "tasks" / "stage.py").write_text("def main():\n    from tasks import helper\n")
    (tmp_path / "tasks" / "helper.py").write_text("import json\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  stage:\n"
        "    cmd: python -m tasks.stage\n"
        "    deps:\n"
        "      - data/raw\n"
        "      - tasks/stage.py\n"
        "      - tasks/removed.py\n"
    )
    assert dependency_problems(tmp_path) == [
        "stage stage: tasks/helper.py is imported but not in deps",
        "stage stage: tasks/removed.py is in deps but not imported",
    ]


def test_closure_follows_packages_with_code_and_relative_imports(tmp_path):
    (tmp_path / "tasks" / "common").mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "common" / "__init__.py").write_text('"""Shared."""\nfrom . import errors\n')
    (tmp_path / "tasks" / "common" / "errors.py").write_text("from .files import write\n")
    (tmp_path / "tasks" / "common" / "files.py").write_text("")
    (tmp_path / "tasks" / "stage.py").write_text("from tasks.common.errors import Problem\n")
    assert import_closure(tmp_path, "tasks.stage") == {
        "tasks/stage.py",
        "tasks/common/__init__.py",
        "tasks/common/errors.py",
        "tasks/common/files.py",
    }


def test_a_folder_dep_stands_for_the_modules_a_package_loads_by_name(tmp_path):
    # tasks/sources/ loads its modules by name: the folder dep covers them, and what they import must be listed.
    (tmp_path / "tasks" / "sources").mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "sources" / "__init__.py").write_text("import importlib\nLOAD = importlib.import_module\n")
    (tmp_path / "tasks" / "sources" / "one.py").write_text("from tasks import shared\n")
    (tmp_path / "tasks" / "shared.py").write_text("")
    (tmp_path / "tasks" / "stage.py").write_text("from tasks import sources\n")
    (tmp_path / "tasks" / "other.py").write_text("")
    stage = (
        "stages:\n  stage:\n    cmd: python -m tasks.stage\n    deps:\n      - tasks/stage.py\n      - tasks/sources\n"
    )
    (tmp_path / "dvc.yaml").write_text(stage)
    assert dependency_problems(tmp_path) == ["stage stage: tasks/shared.py is imported but not in deps"]
    (tmp_path / "dvc.yaml").write_text(stage + "      - tasks/shared.py\n")
    assert dependency_problems(tmp_path) == []
    (tmp_path / "tasks" / "stage.py").write_text("from tasks import other\n")
    (tmp_path / "dvc.yaml").write_text(stage.replace("tasks/stage.py", "tasks/stage.py\n      - tasks/other.py"))
    assert dependency_problems(tmp_path) == ["stage stage: tasks/sources is in deps but not imported"]
