"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported (Triton's
own standard-library functions are decorated at import time), so it is set here, when pytest
collects this directory, unless a CUDA device is present or the user already chose a value.
It stays set for the session: on a machine without a GPU Triton cannot run any other way.
"""

import os


def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
