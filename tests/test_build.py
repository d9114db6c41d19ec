"""The C++ core's build: a missing compiler is reported as such."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_build_without_a_compiler_says_so(tmp_path):
    env = dict(os.environ, CXX="no-such-c++-compiler")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                        "--build-lib", str(tmp_path / "l")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "no C++ compiler found" in r.stderr and "no-such-c++-compiler" in r.stderr
    assert not (tmp_path / "l").exists()


def test_extension_is_built_from_csrc():
    from splitreason_engine import _C

    assert Path(_C.__file__).name.startswith("_C.")
    assert _C.Scheduler(4, 2, 8, 16, [16]).num_models == 1
