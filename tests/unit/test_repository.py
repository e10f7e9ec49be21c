"""The repository itself: licensed as pyproject says, and free of committed binaries."""

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY_SUFFIXES = (".whl", ".so", ".o", ".a", ".dylib", ".dll", ".exe", ".pyc", ".tar.gz", ".zip", ".pt", ".bin")


def test_license_file_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_no_binaries_tracked():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tracked = [f for f in files.decode().split("\0") if f]
    binaries = [f for f in tracked if f.endswith(BINARY_SUFFIXES)]
    assert not binaries, f"binaries committed: {binaries}"
    large = [f for f in tracked if (ROOT / f).is_file() and (ROOT / f).stat().st_size > 1 << 20]
    assert not large, f"files over 1 MiB committed: {large}"
