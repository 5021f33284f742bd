"""What a loader says when a batch cannot be made, so that the advice fits the cause.

Re-converting ImageNet costs hours, so only a fault of the data says "convert again":
- a data fault (a missing, truncated or resized file, a JPEG that does not decode, an index that does not match
  its shard) is a DatasetError that names the file and gives manifest.RECONVERT;
- the device out of memory is a DeviceOutOfMemory that says what to lower (the batch, the loader's prefetch
  depth, DALI's decoder preallocation);
- anything else is raised as it was, with its own message and traceback.

Each loader decides what is a data fault where it can see it (its reader names the file); this module holds the
out-of-memory rule, which is the same for every loader.
"""
from __future__ import annotations

import re

# CUDA's, nvJPEG's, DALI's and the C++ runtime's ways of saying that an allocation failed.
_OUT_OF_MEMORY = re.compile(r"out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|std::bad_alloc|"
                            r"NVJPEG_STATUS_ALLOCATOR_FAILURE|allocation failed|Can't allocate memory",
                            re.IGNORECASE)


class DeviceOutOfMemory(RuntimeError):
    """A loader's allocation on the device (or in pinned host memory) failed; the message says what to lower."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, a MemoryError, or a library's RuntimeError whose text says the allocation
    failed."""
    import torch
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError, DeviceOutOfMemory)):
        return True
    return isinstance(error, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(error)))


def out_of_memory(where: str, error: BaseException, knobs: str) -> DeviceOutOfMemory:
    """The error to raise for `error` (is_out_of_memory) while reading `where`. `knobs`: the loader's own
    settings that hold memory, e.g. "data.options.batches_ahead (3)"."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    first = first if len(first) <= 200 else first[:200] + "..."
    return DeviceOutOfMemory(f"out of memory while reading {where} ({first}). The data is fine: lower "
                             f"data.batch_size, {knobs}, or free the GPU of other processes")
