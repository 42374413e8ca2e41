"""cuBLAS GEMMs with a float32 result from half-precision operands (torch >= 2.8 on CUDA: `out_dtype`).

The product of two bf16/fp16 values is exact in fp32 and cuBLAS accumulates in fp32, so an fp32
result carries no rounding beyond fp32 accumulation. Where `out_dtype` is unavailable the operands
are upcast (CPU, the interpreter tests) or, on an older CUDA torch, the product is rounded once.
"""

from __future__ import annotations

import torch

_OUT_DTYPE_OK: dict = {}
_ACCUMULATE_ROWS = 2048


def _where_accepted(key, call):
    """call(), or None where this torch refused it before or refuses it now (remembered per key).
    Running out of memory and CUDA errors are raised: they are not refusals of the form."""
    if not _OUT_DTYPE_OK.get(key, True):
        return None
    try:
        result = call()
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        if "CUDA error" in str(exc):
            raise
        _OUT_DTYPE_OK[key] = False
        return None
    _OUT_DTYPE_OK[key] = True
    return result


def _half_mm_fp32(a: torch.Tensor, b: torch.Tensor, out=None):
    """a @ b with an fp32 result on CUDA half operands (into `out` if given), or None where this
    torch cannot (each form, with or without `out`, is remembered per dtype)."""
    if out is None:
        return _where_accepted((a.dtype, True), lambda: torch.mm(a, b, out_dtype=torch.float32))
    return _where_accepted((a.dtype, False), lambda: torch.mm(a, b, out_dtype=torch.float32, out=out))


def _half_addmm_fp32(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """acc32 += a @ b in one cuBLAS call whose epilogue reads and writes the fp32 acc32 (torch
    versions whose addmm takes `out_dtype` with an fp32 `self`); False where this torch cannot."""
    return _where_accepted(("addmm", a.dtype),
                           lambda: torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)) is not None


def fp32_products_supported(device: torch.device) -> bool:
    """Whether half-precision GEMMs leave cuBLAS in fp32 on `device` without upcasting their operands
    (on CUDA: mm's out_dtype, torch >= 2.8). The CPU upcasts, which costs little at interpreter sizes."""
    return device.type != "cuda" or "dtype_out" in torch.ops.aten.mm.overloads()


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32, unit column stride, any row stride) = a @ b."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        if _half_mm_fp32(a, b, out) is not None:
            return out
        product = _half_mm_fp32(a, b)  # a torch with out_dtype but without its out= form
        if product is not None:
            return out.copy_(product)
    return torch.mm(a.float(), b.float(), out=out)


def mm_accumulate_fp32(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc32 += a @ b with an fp32 result from half-precision operands where the platform allows."""
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
        return
    if a.is_cuda:
        if _half_addmm_fp32(acc32, a, b):
            return
        # a separate product, then an add: row blocks bound the fp32 product that out_dtype
        # allocates (an [N, D] one is 256 MiB at 16k x 4096, twice what the dl chunk itself costs)
        for r0 in range(0, a.shape[0], _ACCUMULATE_ROWS):
            rows = slice(r0, r0 + _ACCUMULATE_ROWS)
            product = _half_mm_fp32(a[rows], b)
            if product is None:  # older torch: product rounded to the input dtype once per chunk
                product = torch.mm(a[rows], b)
            acc32[rows].add_(product)
        return
    acc32.addmm_(a.float(), b.float())  # CPU (interpreter tests): upcast is cheap at test sizes


def addmm_rounded_once(row: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = row + a @ b (`row`, one value per column of out, added to every row), accumulated in
    fp32 and rounded to out's dtype once: one cuBLAS call (its bias epilogue, or beta = 1 on a copy
    of `row`). Elsewhere (CPU: the interpreter tests; operands the interpreter upcast) the same sum
    in fp32, rounded by the copy into out."""
    if a.is_cuda and a.dtype == b.dtype == row.dtype == out.dtype:
        return torch.addmm(row, a, b, out=out)
    return out.copy_(torch.addmm(row.float(), a.float(), b.float()))
