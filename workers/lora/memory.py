"""Is a tensor's memory writable? (A read-only shared mapping must never be written.)

torch has no notion of read-only storage: writing into a tensor backed by a read-only
``mmap`` (how workers of one node share the frozen base) kills the process with SIGSEGV.
The kernel knows, so ask it: ``/proc/self/maps`` lists each mapping with its permissions.
"""

from __future__ import annotations

import torch


def is_read_only(tensor: torch.Tensor) -> bool:
    """True when the tensor's first byte lies in a mapping without write permission.

    Off Linux (no ``/proc/self/maps``), or for device memory, returns False.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    ptr = tensor.data_ptr()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                span, perms = line.split(maxsplit=2)[:2]
                lo, hi = (int(v, 16) for v in span.split("-"))
                if lo <= ptr < hi:
                    return perms[1] != "w"
    except OSError:
        return False
    return False
