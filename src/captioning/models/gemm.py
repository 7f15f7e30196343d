"""Matrix products for the hand-written core and loss: oneDNN's GEMM where it is faster than torch's BLAS.

On CPU, torch runs a float32 ``a @ b`` through its BLAS (MKL), while ``torch.nn.LSTM`` runs oneDNN's
kernels. On some processors the two differ by 2x: on an AMD EPYC with AVX-512 MKL (which runs its AVX2 code on
AMD) reaches ~190 GFLOP/s on 2 threads and oneDNN ~400, the same numbers to rounding (relative difference
~4e-7). There the products go to ``torch.ops.mkldnn._linear_pointwise`` (the oneDNN linear that torch's own
compiler uses on CPU), which takes transposed views without copies and can fuse the ``+ c`` of ``c + a @ b``.
On an x86 CPU without AVX-512 both run AVX2 code and MKL was the faster at every product of the model
(AMD EPYC Zen 3: 2-11%, the weight gradient's 384x768x1024 20%), so there they stay torch's.

Elsewhere (GPU, float64 — oneDNN has no float64 GEMM — other dtypes, or a torch built without oneDNN) the
functions are torch's ``@`` / ``addmm``. ``CAPTIONING_GEMM=torch`` in the environment forces torch's everywhere,
``CAPTIONING_GEMM=onednn`` oneDNN's wherever it has the dtype.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["addmm", "linear", "mm", "onednn_available"]

try:
    _LINEAR = torch.ops.mkldnn._linear_pointwise
    _LINEAR.default, _LINEAR.binary  # noqa: B018 - both overloads must exist
except (AttributeError, RuntimeError):  # a torch without oneDNN
    _LINEAR = None



def onednn_available() -> bool:
    """Whether CPU products go to oneDNN here (see the module's docstring)."""
    choice = os.environ.get("CAPTIONING_GEMM", "").lower()
    if _LINEAR is None or not torch.backends.mkldnn.is_available() or choice == "torch":
        return False
    return choice == "onednn" or torch.backends.cpu.get_cpu_capability() != "AVX2"


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear takes this dtype here: float32 always, bfloat16 only on CPUs with its instructions
    (AVX-512 / AMX; on an AVX2-only CPU oneDNN has no bf16 linear and refuses to build one)."""
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and _bf16_supported()


def _bf16_supported() -> bool:
    global _BF16
    if _BF16 is None:
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            _BF16 = bool(probe()) if probe is not None else False
        except RuntimeError:
            _BF16 = False
    return _BF16


_BF16: bool | None = None


def _onednn(*tensors: Tensor) -> bool:
    first = tensors[0]
    return (first.device.type == "cpu" and onednn_available() and onednn_dtype(first.dtype)
            and all(t.dtype == first.dtype and t.dim() == 2 for t in tensors))


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a (M, K), b (K, N) (either may be a transposed view)."""
    if _onednn(a, b):
        return _LINEAR(a, b.t(), None, "none", [], "")
    return a @ b


def addmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` as a new tensor: c (M, N), a (M, K), b (K, N)."""
    if _onednn(c, a, b) and c.is_contiguous():
        return _LINEAR.binary(a, c, b.t(), None, "add")
    return torch.addmm(c, a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``: x (M, K), weight (N, K), bias (N,) — ``nn.Linear``'s layout."""
    if _onednn(x, weight) and (bias is None or bias.dtype == x.dtype):
        return _LINEAR(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)
