import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable is read when a
# kernel module is imported (at @triton.jit), so it must be set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
