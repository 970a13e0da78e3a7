"""The installed distribution (in CI: the repaired wheel): licence files, metadata, extras, stubs
and the public names."""

import ast
import importlib.metadata as md
import pathlib
import re
import sys

import pytest

import sdpa

TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def dist():
    return md.distribution("sdpa")


def extra_requirements(dist, extra):
    """{distribution name: specifier text} that ``pip install "sdpa[extra]"`` adds."""
    found = {}
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", marker):
            name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group()
            found[re.sub(r"[-_.]+", "-", name).lower()] = spec.strip()[len(name) :].strip()
    return found


def test_licence_files_are_installed(dist):
    meta = dist.metadata
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert sorted(meta.get_all("License-File")) == ["LICENSE", "THIRD_PARTY_NOTICES"]
    licence = dist.read_text("licenses/LICENSE")
    assert licence.startswith("BSD 3-Clause License") and "sdpa maintainers" in licence
    notices = dist.read_text("licenses/THIRD_PARTY_NOTICES")
    assert "Wenzel Jakob" in notices  # pybind11's copyright line
    assert "Mozilla Public License Version 2.0" in notices and "Exhibit B" in notices  # Eigen


def test_metadata_for_pypi(dist):
    meta = dist.metadata
    assert meta["Name"] == "sdpa" and meta["Version"] == sdpa.__version__
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["Author"] or meta["Author-email"]
    assert len(meta["Keywords"].split(",")) >= 5
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert "Homepage" in urls and all(u.startswith("https://") for u in urls.values())
    classifiers = meta.get_all("Classifier")
    for minor in range(9, 15):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    for prefix in ("Development Status", "Intended Audience", "Operating System", "Topic"):
        assert any(c.startswith(prefix + " :: ") for c in classifiers), prefix


def test_readme_is_the_long_description_and_opens_with_pip_install(dist):
    meta = dist.metadata
    assert meta["Description-Content-Type"] == "text/markdown"
    # (once importlib_metadata, the backport, is imported, as dask does, distributions come from
    # its finder, whose metadata carries the long description as "Description", not the body)
    text = meta.get_payload() or meta["Description"]
    first_block = re.search(r"```\w*\n(.*?)```", text, re.S).group(1)
    assert first_block.strip() == "pip install sdpa"
    assert "forward" in text[: text.index("## Build from source")].lower()


def test_extras(dist):
    extras = set(dist.metadata.get_all("Provides-Extra"))
    assert extras == {"test", "bf16", "plot", "transformers", "dask"}
    assert set(extra_requirements(dist, "bf16")) == {"ml-dtypes"}
    assert set(extra_requirements(dist, "plot")) == {"matplotlib"}
    assert set(extra_requirements(dist, "dask")) == {"dask", "distributed"}
    # torch is left to the user (which build is theirs to choose)
    assert extra_requirements(dist, "transformers") == {
        "transformers": ">=5.0",
        "ml-dtypes": extra_requirements(dist, "bf16")["ml-dtypes"],
    }
    # bfloat16 through the bf16 extra and the test extra is the same requirement
    assert (
        extra_requirements(dist, "bf16")["ml-dtypes"]
        == extra_requirements(dist, "test")["ml-dtypes"]
    )


def imported_modules(path):
    """Top-level names of the modules a test file imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.skipif(sys.version_info < (3, 10), reason="needs sys.stdlib_module_names")
def test_the_test_extra_holds_what_the_tests_import(dist):
    provided = set(extra_requirements(dist, "test"))
    provided |= {re.split(r"[^A-Za-z0-9._-]", r)[0].lower() for r in dist.requires or []}
    local = {p.stem for p in TESTS.glob("*.py")} | {"sdpa"}
    by_module = md.packages_distributions()
    for path in sorted(TESTS.glob("*.py")):
        for name in imported_modules(path) - set(sys.stdlib_module_names) - local:
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in by_module.get(name, [name])}
            assert dists & provided, f"{path.name} imports {name}, which sdpa[test] lacks"


def test_stubs_and_compiled_modules_are_installed(dist):
    files = {str(f) for f in dist.files}
    if any(f.startswith("_editable") for f in files):  # (pip install -e: files stay in the tree)
        pytest.skip("an editable install records no package files")
    for name in ("sdpa/py.typed", "sdpa/_core.pyi", "sdpa/_isas.pyi", "sdpa/_isas.py"):
        assert name in files
    compiled = [f for f in files if re.match(r"sdpa/_(core|kernel_\w+)\..*(so|pyd)$", f)]
    # _core and one module per ISA variant that CMakeLists.txt listed in sdpa/_isas.py
    assert len(compiled) == 1 + len(sdpa._config.ISAS), compiled


def test_dir_shows_the_public_names_only():
    assert dir(sdpa) == sorted(sdpa.__all__)
    assert "annotations" not in dir(sdpa)
    for name in sdpa.__all__:
        assert hasattr(sdpa, name), name
