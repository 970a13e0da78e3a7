"""Runtime CPU dispatch: the variants, SDPA_ISA, show_config."""

import os
import subprocess
import sys

import numpy as np
import pytest

import sdpa
from sdpa import _config, _isas


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_available_isas_are_ordered_best_first():
    avail = _config.available_isas()
    assert avail, "no kernel variant available"
    order = list(_isas.ISAS)  # the build's list, best first (CMakeLists.txt, sdpa_add_kernel)
    assert avail == sorted(avail, key=order.index)
    assert avail[-1] == order[-1] and not _isas.ISAS[order[-1]]  # the last needs nothing


def test_every_variant_of_the_build_is_present():
    assert _config._built_isas() == list(_isas.ISAS)


def test_default_is_the_best_available():
    result = run_python("import sdpa; print(sdpa._config.isa())", SDPA_ISA="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _config.available_isas()[0]


@pytest.mark.parametrize("name", _config.available_isas())
def test_sdpa_isa_forces_a_variant(name):
    code = "import sdpa; print(sdpa._config.isa(), sdpa.show_config()['isa'])"
    result = run_python(code, SDPA_ISA=name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == [name, name]


def test_sdpa_isa_unknown_is_a_clear_error():
    result = run_python("import sdpa", SDPA_ISA="sse9")
    assert result.returncode != 0
    assert "unknown isa 'sse9'" in result.stderr


def test_set_isa_rejects_bad_names():
    with pytest.raises(ValueError, match="unknown isa"):
        _config.set_isa("neon9")
    with pytest.raises(TypeError, match="isa must be a str"):
        _config.set_isa(3)


def test_show_config_reports_the_build(capsys):
    config = sdpa.show_config()
    printed = capsys.readouterr().out
    for key in ("version", "isa", "available_isas", "num_threads", "kernel_build"):
        assert key in config and key in printed
    assert config["version"] == sdpa.__version__
    assert config["isa"] == _config.isa()
    assert "Eigen 3.4" in config["kernel_build"]


def test_every_variant_gives_the_same_answer_to_rounding(rng):
    q = rng.standard_normal((2, 3, 70, 32))
    k = rng.standard_normal((2, 3, 300, 32))
    v = rng.standard_normal((2, 3, 300, 16))
    before = _config.isa()
    results = []
    try:
        for name in _config.available_isas():
            _config.set_isa(name)
            results.append(sdpa.scaled_dot_product_attention(q, k, v, is_causal=True))
    finally:
        _config.set_isa(before)
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-12, atol=1e-12)
