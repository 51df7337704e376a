"""The Triton kernel module as the tests use it: interpreted on CPU tensors (TRITON_INTERPRET=1,
the default here), or compiled on CUDA with ``TRITON_INTERPRET=0`` on a GPU machine.

Triton decides at decoration time whether a kernel is interpreted, so the variable is set before
`nnpq.kernels.triton_int8` is imported (or reloaded, if another module imported it in the other
mode) and then restored, so other test modules see the environment as it was. Triton reads it
again at launch: a test module keeps it set while its tests run (``os.environ[...] = mode``).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch


def triton_kernels():
    """``(module, device, mode)``: `nnpq.kernels.triton_int8` in the requested mode, the device its
    tensors live on, and the TRITON_INTERPRET value to keep while the tests run. Skips the calling
    module without triton, or when compiled kernels are asked for without CUDA."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from nnpq.kernels import triton_int8

    if triton_int8.INTERPRETED != (os.environ["TRITON_INTERPRET"] == "1"):
        triton_int8 = importlib.reload(triton_int8)
    mode = os.environ["TRITON_INTERPRET"]
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    if not triton_int8.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need CUDA (unset TRITON_INTERPRET to use the interpreter)",
                    allow_module_level=True)
    return triton_int8, "cpu" if triton_int8.INTERPRETED else "cuda", mode
