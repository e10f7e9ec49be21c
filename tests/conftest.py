import os

import torch

# Triton kernels run in the CPU interpreter where there is no GPU; must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
