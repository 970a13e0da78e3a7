"""Check what sdpa's wheel and sdist hold: `python .ci/check_dists.py WHEEL SDIST`.

The wheel: the package's Python files, its stubs and py.typed, the compiled modules (_core and
exactly the kernel variants that its sdpa/_isas.py lists) and the dist-info with both licence
files; nothing else (no grafted libraries, no sources, no tests). The sdist: what a build and the
test suite need, with both licence files, and none of the build's or CI's leftovers.
"""

from __future__ import annotations

import ast
import re
import sys
import tarfile
import zipfile

LICENCES = ("LICENSE", "THIRD_PARTY_NOTICES")
SDIST_NEEDS = (
    "PKG-INFO",
    "pyproject.toml",
    "CMakeLists.txt",
    "README.md",
    *LICENCES,
    "python/sdpa/__init__.py",
    "python/sdpa/py.typed",
    "cpp/bindings/core_module.cpp",
    "cpp/src/kernels/attention.cpp",
    "tests/conftest.py",
)
SDIST_FORBIDS = re.compile(r"(^|/)(build|dist|\.venv|\.ci|\.git|__pycache__)(/|$)|\.(so|pyd|whl)$")


def fail(message: str) -> None:
    sys.exit(f"check_dists: {message}")


def kernel_isas(zf: zipfile.ZipFile) -> list[str]:
    """The ISA names of the ISAS dict literal in the wheel's generated sdpa/_isas.py."""
    tree = ast.parse(zf.read("sdpa/_isas.py").decode())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Dict):
            return [ast.literal_eval(key) for key in node.value.keys if key is not None]
    fail("sdpa/_isas.py holds no ISAS dict")
    return []


def check_wheel(path: str) -> None:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]  # auditwheel lists folders
        isas = kernel_isas(zf)
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL"))
        metadata = zf.read(f"{info}/METADATA").decode()
    allowed = [
        r"sdpa/(integrations/)?[A-Za-z_]\w*\.pyi?",
        r"sdpa/py\.typed",
        *(rf"sdpa/_(core|kernel_{isa})\.[\w.-]+\.(so|pyd)" for isa in isas),
        rf"{re.escape(info)}/(METADATA|WHEEL|RECORD)",
        *(rf"{re.escape(info)}/licenses/{name}" for name in LICENCES),
    ]
    stray = [n for n in names if not any(re.fullmatch(p, n) for p in allowed)]
    if stray:
        fail(f"{path} holds files it should not: {', '.join(stray)}")
    compiled = [n for n in names if re.search(r"\.(so|pyd)$", n)]
    if len(compiled) != 1 + len(isas):
        fail(f"{path}: compiled modules {compiled}, expected _core and {isas}")
    needed = ["sdpa/__init__.py", "sdpa/_core.pyi", "sdpa/py.typed", "sdpa/_version.py"]
    needed += ["sdpa/integrations/__init__.py", "sdpa/integrations/transformers.py"]
    needed += [f"{info}/licenses/{name}" for name in LICENCES]
    missing = [n for n in needed if n not in names]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}")
    if sorted(re.findall(r"^License-File: (.+)$", metadata, re.M)) != sorted(LICENCES):
        fail(f"{path}: METADATA does not list {LICENCES} as License-File")
    print(f"check_dists: wheel ok: {len(names)} files, kernels {', '.join(isas)}, licences")


def check_sdist(path: str) -> None:
    with tarfile.open(path) as tf:
        members = [m.name for m in tf.getmembers() if m.isfile()]
        root = members[0].split("/")[0]
        pkg_info = tf.extractfile(f"{root}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    names = [m[len(root) + 1 :] for m in members]
    missing = [n for n in SDIST_NEEDS if n not in names]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}")
    stray = [n for n in names if SDIST_FORBIDS.search(n)]
    if stray:
        fail(f"{path} holds build or CI leftovers: {', '.join(stray)}")
    if sorted(re.findall(r"^License-File: (.+)$", metadata, re.M)) != sorted(LICENCES):
        fail(f"{path}: PKG-INFO does not list {LICENCES} as License-File")
    print(f"check_dists: sdist ok: {len(names)} files, licences")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: python .ci/check_dists.py WHEEL SDIST")
    check_wheel(sys.argv[1])
    check_sdist(sys.argv[2])
