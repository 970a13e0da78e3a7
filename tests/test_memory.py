"""Memory: the L x S score matrix is never materialised."""

import os
import subprocess
import sys

# Peak RSS is read from /proc/self/status (VmHWM), not getrusage's ru_maxrss: Linux carries
# ru_maxrss over from the forking parent across exec, so in a child of a large pytest process it
# reports the parent's size. Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS.
SCRIPT = r"""
import numpy as np
import sdpa

def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

L = S = 65536
E = 16
rng = np.random.default_rng(0)
q = rng.standard_normal((1, L, E), dtype=np.float32)
k = rng.standard_normal((1, S, E), dtype=np.float32)
v = rng.standard_normal((1, S, E), dtype=np.float32)
out = np.ones((1, L, E), np.float32)  # ones, not zeros: its pages are resident already
sdpa.scaled_dot_product_attention(q[:, :64], k[:, :64], v[:, :64])  # start the pool
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:  # no reset: VmHWM still holds the peak of the setup above, a few MB more
    pass
before = status_kb("VmRSS")
sdpa.scaled_dot_product_attention(q, k, v, out=out)
growth_mb = (status_kb("VmHWM") - before) / 1024
rows = np.array([0, 1, 12345, L - 1])
expected = sdpa.reference.scaled_dot_product_attention(q[:, rows], k, v)
err = np.abs(out[:, rows] - expected).max() / np.abs(expected).max()
print(growth_mb, err, np.isfinite(out).all())
"""


def test_65536_tokens_peak_rss_growth():
    # 12 MB of inputs and 4 MB of output; the score matrix alone would be 16 GiB
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(__file__),
    )
    assert result.returncode == 0, result.stderr
    growth_mb, err, finite = result.stdout.split()
    assert float(growth_mb) < 64, f"peak RSS grew by {float(growth_mb):.1f} MB during the call"
    assert float(err) < 1e-5
    assert finite == "True"
