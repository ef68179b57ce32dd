"""The import layers hold: `lint-imports` checks pyproject's contracts (train → actors | serve → core)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_imports_flow_one_way(tmp_path):
    lint = shutil.which("lint-imports", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if lint is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    # grimp finds subpackages inside their parent's folder; setuptools maps train/, actors/ and serve/
    # into sip from the top level, so the check reads a tree of links that puts them there.
    tree = tmp_path / "sip"
    tree.mkdir()
    for item in [*(REPO / "sip").glob("*.py"), *(REPO / role for role in ("train", "actors", "serve"))]:
        (tree / item.name).symlink_to(item)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([lint, "--no-cache", str(REPO / "pyproject.toml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout, done.stdout[-2000:]
