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


def test_transformers_models_import_from_the_repository_root():
    """Standing in the checkout (sys.path[0] is the root, as under `python -m pytest`), nothing of
    ours shadows a package that transformers imports: a top-level `kernels/` once hid Hugging Face's
    `kernels` package and broke every transformers model import."""
    code = ("import sys, transformers; from transformers import Qwen2ForCausalLM, LlamaForCausalLM; "
            "import splitreason_engine.kernels.ops; print(transformers.__version__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert top_level == {"splitreason_engine"}, f"importable packages at the root: {sorted(top_level)}"
