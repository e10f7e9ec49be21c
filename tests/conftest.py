import os

import torch

# Triton kernels run in the CPU interpreter where there is no GPU; must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_free_memory(gib: float) -> None:
    """Skip (with the reason) a test that needs more free memory than this machine has now."""
    import pytest

    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration, ValueError):
        return
    if avail < gib:
        pytest.skip(f"needs {gib} GiB of free memory, {avail:.1f} GiB available")


# Hypothesis profiles: "ci" (default, bounded for the whole suite) and "nightly" (more examples);
# choose with HYPOTHESIS_PROFILE=nightly. Tests that set max_examples themselves keep theirs.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", deadline=None, max_examples=100)
    _hyp_settings.register_profile("nightly", deadline=None, max_examples=2000)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; the tests that need it skip
    pass
