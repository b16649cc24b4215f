"""The source archive (sdist) carries what a build from it reads, and the version is written once.

The sdist is built for real, into a temporary directory (setuptools' PEP 517 hook; it compiles nothing
and imports no torch, about 2 s). scripts/check_sdist.sh goes further: it builds the extension from the
archive, installs it and runs a step. ``python python_tests/test_packaging.py ARCHIVE`` lists what
ARCHIVE lacks (exit status 1 when anything is missing); that script checks its archive this way.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tarfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Files at the top of the tree that a build from the archive (pip, CMake) or its metadata reads.
TOP_LEVEL = ("setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md", "LICENSE")
#: Build products never shipped in the archive (MANIFEST.in excludes them).
BUILD_PRODUCTS = (".so", ".o", ".pyc", ".pyo", ".pyd")


def source_version() -> str:
    """``sam_kernels.__version__`` read from sam_kernels/__init__.py as text, as the build reads it."""
    tree = ast.parse((ROOT / "sam_kernels" / "__init__.py").read_text())
    values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and any(getattr(target, "id", None) == "__version__" for target in node.targets)
              and isinstance(node.value, ast.Constant)]
    assert len(values) == 1, "sam_kernels/__init__.py must assign __version__ one string literal"
    return values[0]


def required_files() -> list[str]:
    """Paths, relative to the tree's root, that the archive must carry: the top-level build files, every
    file under csrc/ and every module of the package."""
    shipped = [path for pattern in ("csrc/**/*", "sam_kernels/**/*.py") for path in ROOT.glob(pattern)
               if path.is_file() and path.suffix not in BUILD_PRODUCTS and "__pycache__" not in path.parts]
    return [*TOP_LEVEL, *sorted(path.relative_to(ROOT).as_posix() for path in shipped)]


def archive_problems(archive: Path) -> list[str]:
    """What is wrong with the sdist ``archive``: files it lacks, build products it carries, metadata that
    disagrees with the tree (version, license). Empty when all is well."""
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        prefix = names[0].split("/")[0]
        members = {name.removeprefix(prefix + "/") for name in names}
        headers = HeaderParser().parsestr(tar.extractfile(f"{prefix}/PKG-INFO").read().decode())
        license_file = tar.extractfile(f"{prefix}/LICENSE") if "LICENSE" in members else None
        license_text = license_file.read().decode() if license_file else None
    problems = [f"missing {path}" for path in required_files() if path not in members]
    problems += [f"carries the build product {name}" for name in sorted(members)
                 if name.endswith(BUILD_PRODUCTS)]
    expected = {"Version": source_version(), "License-Expression": "Apache-2.0", "License-File": "LICENSE"}
    problems += [f"PKG-INFO {key}: {headers.get(key)!r}, expected {value!r}"
                 for key, value in expected.items() if headers.get(key) != value]
    if license_text is not None and license_text != (ROOT / "LICENSE").read_text():
        problems.append("LICENSE differs from the tree's")
    return problems


def build_sdist(out_dir: Path) -> Path:
    """Builds the sdist of the tree into ``out_dir`` and returns it. The build writes
    sam_kernels.egg-info/ into the tree; it is removed again when this build created it."""
    egg_info = ROOT / "sam_kernels.egg-info"
    had_egg_info = egg_info.exists()
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from setuptools import build_meta; "
             "print(build_meta.build_sdist(sys.argv[1]))", str(out_dir)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    finally:
        if not had_egg_info:
            shutil.rmtree(egg_info, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    return build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_carries_the_build_files_and_the_metadata(sdist):
    assert sdist.name == f"sam_kernels-{source_version()}.tar.gz"
    assert archive_problems(sdist) == []


def test_archive_problems_names_what_is_missing(sdist, tmp_path):
    """The check itself: an archive without the headers, the CMake file and the license fails it."""
    left_out = ("csrc/include/", "CMakeLists.txt", "LICENSE")
    broken = tmp_path / sdist.name
    with tarfile.open(sdist) as source, tarfile.open(broken, "w:gz") as target:
        for member in source.getmembers():
            if not member.name.partition("/")[2].startswith(left_out):
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
    problems = archive_problems(broken)
    assert "missing CMakeLists.txt" in problems and "missing LICENSE" in problems, problems
    assert "missing csrc/include/sam_kernels/philox.h" in problems, problems


def test_version_is_written_once():
    """pyproject.toml takes the version from sam_kernels/__init__.py instead of stating its own."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sam_kernels.__version__"}
    import sam_kernels

    assert sam_kernels.__version__ == source_version()


def main(argv: list[str]) -> int:
    """Prints what the sdist ``argv[1]`` lacks or should not carry; exit status 1 when anything."""
    problems = archive_problems(Path(argv[1]))
    for problem in problems:
        print(f"sdist: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
