"""The distribution installs passes/, lowering/ and tools/ under ``mxfp8_compile.`` only.

Both the wheel and the editable install are built offline from a copy of the sources and
imported from a neutral directory, so that nothing on the test's own ``sys.path`` can answer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "mxfp8_compile", "passes", "lowering", "tools"]
SUBPACKAGES = ["passes", "lowering", "tools"]

PROBE = """
import importlib.util, json, mxfp8_compile, mxfp8_compile.ops
import mxfp8_compile.passes, mxfp8_compile.lowering, mxfp8_compile.tools
import mxfp8_compile.examples.moe, mxfp8_compile.tools.dump
print(json.dumps({
    "files": {n: getattr(mxfp8_compile, n).__file__ for n in ("passes", "lowering", "tools")},
    "package": mxfp8_compile.__file__,
    "top_level": {n: importlib.util.find_spec(n) is not None for n in ("passes", "lowering", "tools")},
}))
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    return src


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _probe(python: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    import json

    return json.loads(_run([python, "-c", PROBE], cwd, env).strip().splitlines()[-1])


def test_wheel_holds_only_the_mxfp8_compile_namespace(source_copy: Path, tmp_path: Path) -> None:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist"), str(source_copy)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mxfp8_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mxfp8_compile"}
    for sub in SUBPACKAGES:
        assert f"mxfp8_compile/{sub}/__init__.py" in names
    for module in ("examples/moe.py", "examples/clients.py", "tools/dump.py", "tools/_render.py"):
        assert f"mxfp8_compile/{module}" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mxfp8-dump = mxfp8_compile.tools.dump:main" in text
    assert "mxfp8 = mxfp8_compile.backend:mxfp8_backend" in text

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path)
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    result = _probe(sys.executable, neutral, env)
    assert result["package"].startswith(str(site))
    for sub in SUBPACKAGES:
        assert result["files"][sub] == str(site / "mxfp8_compile" / sub / "__init__.py")
    assert result["top_level"] == {sub: False for sub in SUBPACKAGES}


def test_editable_install_maps_root_folders_into_the_namespace(source_copy: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # Not the base interpreter's site packages: they hold whatever that machine has (no torch, a
    # setuptools too old for PEP 639's license string). This interpreter's own site packages
    # supply torch, pip and setuptools as a plain path entry, so that none of their .pth files (an
    # editable install of this project among them) runs; the venv's own editable install answers.
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    own_site = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    (Path(venv_site) / "test_packaging_parent_site.pth").write_text("\n".join(own_site) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(source_copy)], tmp_path)
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    result = _probe(python, neutral)
    assert result["package"] == str(source_copy / "mxfp8_compile" / "__init__.py")
    for sub in SUBPACKAGES:
        assert result["files"][sub] == str(source_copy / sub / "__init__.py")
    assert result["top_level"] == {sub: False for sub in SUBPACKAGES}
