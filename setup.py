"""Builds the C++ core (csrc/) into splitreason_engine._C with pybind11, compiled by ninja.

Package metadata lives in pyproject.toml; this file only knows how to compile the extension.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
CXXFLAGS = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]
# SPLITREASON_SANITIZE=1 builds _C with AddressSanitizer + UndefinedBehaviorSanitizer (.ci/sanitize runs
# the tests on it). Python does not carry the ASan runtime: importing such a build needs it in
# LD_PRELOAD (docs/development.md, "Sanitized build").
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-g", "-O1"]


def mode_flags() -> list[str]:
    """Flags given to both the compile and the link commands: -O3, or the sanitizers' set."""
    return SANITIZE_FLAGS if os.environ.get("SPLITREASON_SANITIZE", "0") not in ("", "0") else ["-O3"]


def find_compiler() -> str:
    """The C++ compiler to use: $CXX, else the first of c++, g++, clang++ on PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(shlex.split(name)[0])
        if path:
            return name
    sys.exit(
        "splitreason-engine: no C++ compiler found (looked for "
        + ", ".join(candidates)
        + "). The C++ scheduler needs a C++17 compiler: install g++ "
        "(Debian/Ubuntu: apt-get install g++) or set CXX, then install again."
    )


def ninja_binary() -> str:
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            sys.exit("splitreason-engine: ninja is required to build the C++ core (pip install ninja)")
        return found


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the extension and runs ninja (parallel, incremental builds)."""

    def build_extension(self, ext: Extension) -> None:
        cxx = find_compiler()  # first: a missing compiler is the likeliest failure on a fresh machine
        import pybind11

        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
        mode = mode_flags()
        cflags = " ".join(CXXFLAGS + mode + [f"-I{shlex.quote(i)}" for i in includes])
        # The flags are part of each command, so ninja rebuilds everything when they change.
        lines = [
            f"cxx = {cxx}",
            f"cflags = {cflags}",
            f"ldflags = {' '.join(mode)}",
            "rule compile",
            "  command = $cxx $cflags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cxx -shared $ldflags $in -o $out",
        ]
        objects = []
        for source in ext.sources:
            obj = build_dir / (Path(source).stem + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: compile {ROOT / source}")
        lines.append(f"build {output}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.run([ninja_binary(), "-C", str(build_dir)], check=True)


setup(
    ext_modules=[Extension("splitreason_engine._C", SOURCES)],
    cmdclass={"build_ext": NinjaBuildExt},
    )
