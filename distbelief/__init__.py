"""distbelief: asynchronous parameter-server training in the style of DistBelief."""

import os

__version__ = "0.1.0"

# Large CPU tensors (2 MiB and up) on transparent huge pages. torch reads the setting
# once, at its first allocation, so it is set here, before anything of ours imports
# torch. A fresh batch of 64 images at 224 px is 38 MB of float32: on 4 KiB pages each
# one costs about 9,000 page faults, which made turning a uint8 batch into floats 4×
# slower (bench/RESULTS.md, `input_pipeline`). Set THP_MEM_ALLOC_ENABLE=0 to opt out;
# where the kernel has huge pages off, it changes nothing.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
