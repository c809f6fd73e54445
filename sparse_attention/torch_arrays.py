"""The array functions that `Pattern.mask` calls, for torch tensors.

With them a pattern's mask runs as a PyTorch FlexAttention mask_mod (`lambda b, h, q, k: pattern.mask(q,
k)`), so the benchmark's FlexAttention peer attends exactly the pairs our kernels do. torch is imported
only when a mask is evaluated on torch tensors; the library does not depend on it.
"""

import torch

int32 = torch.int32


def asarray(x, dtype=None):
    return torch.as_tensor(x, dtype=dtype)


def _tensors(a, b):
    """Both as tensors; a Python scalar takes the other operand's dtype and device."""
    if not isinstance(a, torch.Tensor):
        a = torch.as_tensor(a, dtype=b.dtype, device=b.device)
    if not isinstance(b, torch.Tensor):
        b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    return a, b


def minimum(a, b):
    return torch.minimum(*_tensors(a, b))


def maximum(a, b):
    return torch.maximum(*_tensors(a, b))


def where(condition, a, b):
    return torch.where(condition, *_tensors(a, b))
