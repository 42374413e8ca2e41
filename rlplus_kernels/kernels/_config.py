"""Fixed launch configurations per GPU family, and the few helpers every launcher shares.

Autotuning is off unless ``RLPLUS_AUTOTUNE=1``: a fixed configuration compiles once and behaves
the same on every run; the table below was chosen from register/spill reports
(``scripts/check_kernels.py``) and the tile shapes that run near cuBLAS speed on A100/H100.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch

import triton
import triton.language as tl

from .._environment import environment_flag, environment_variable
from ..backends import triton_interpreting as interpreting  # noqa: F401  (re-exported to the launchers)


# Every launch asks for multiply-adds fused into FMAs, as every GPU measurement and test so far compiled them:
# triton 3.10 turns fusion off by default, and 3.9 warns at each compile that a launch leaves it unsaid.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)


def autotune_enabled() -> bool:
    return environment_flag("RLPLUS_AUTOTUNE")


# Where each tile's logits come from: "fused" (tl.dot inside the forward and backward kernels),
# "tma" (the same tl.dot with its operands fetched by TMA descriptors on sm_90: no per-element
# addresses or masks, 20-45 registers fewer in the forward; elsewhere it is "fused")
# or "cublas" (torch.mm writes an fp32 product per chunk, then the same kernels read it: GEMM speed
# for the matmul, one extra fp32 pass over memory). Fused stays the default until the others are
# measured on a GPU (kernels/README.md, "The 1.5x bar"); RLPLUS_LOGITS selects one.
LOGITS_SOURCES = ("fused", "tma", "cublas")


def logits_source(choice: Optional[str] = None) -> str:
    source = choice or environment_variable("RLPLUS_LOGITS", "fused")
    if source not in LOGITS_SOURCES:
        raise ValueError(f"RLPLUS_LOGITS (logits source) must be one of {LOGITS_SOURCES}, got {source!r}")
    return source


DEFAULT_CHUNK_ELEMS = 1 << 26  # 128 MiB of bf16 dl: 16k tokens x 4k vocabulary columns


def chunk_budget(chunk_elems: Optional[int] = None) -> int:
    """The chunk bound in elements: `chunk_elems`, else env RLPLUS_CHUNK_ELEMS, else DEFAULT_CHUNK_ELEMS."""
    if chunk_elems:
        return chunk_elems
    raw = environment_variable("RLPLUS_CHUNK_ELEMS", None)
    if raw is None:
        return DEFAULT_CHUNK_ELEMS
    value = int(raw) if raw.strip().isdigit() else 0
    if value < 1:
        raise ValueError(f"RLPLUS_CHUNK_ELEMS (chunk elements) must be a positive integer, got {raw!r}")
    return value


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    GROUP_N: int = 8
    # one software pipeline across logits tiles, so the next tile's loads are in flight during a
    # tile's epilogue instead of the pipeline draining at every tile: the forward flattens its
    # vocabulary and D loops (tl.range(flatten=True)); the backward runs one program per SM over
    # its tiles, flattened likewise. Needs triton >= 3.3; spill-free on sm_80/sm_90 under 3.6 and
    # 3.9 (not 3.3.1); a candidate of benchmarks/sweep_configs.py, off until timed on a GPU.
    PIPELINE_TILES: bool = False


# (family, is_fp32) -> config, for rows that are 16-element aligned (every real LM head).
# half precision: 128x128x64 tiles, stages of (128 + 128) x 64 x 2 B = 32 KiB; 8 warps because
# the 128x128 fp32 accumulator plus the online-softmax epilogue spills at 4 (856-byte stack
# seen). Measured on H100: 4 stages 3-5% faster than 3 (then with 4 spilled registers in some
# forward flag sets; none since the forward takes the target logit first), so sm_90 takes 4 (128
# KiB, also the "tma" source's); sm_80 keeps 3 (not timed there). 128x256 / 256x128 tiles ~8%
# faster but spill hundreds, with descriptors too: not used.
# fp32 (IEEE FFMA or TF32 mma): 32x32x16, 4 warps, no software pipeline; the FFMA dot layout
# is register-hungry (64x64 spills at 8 warps, and at 3 stages ptxas caps 32x64 at 128
# registers and spills on sm_80, 32x64 spills at 96 on sm_80). fp32 LM heads are rare.
_TABLE = {
    ("sm90", False): KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    ("sm90", True): KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
    ("sm80", False): KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    ("sm80", True): KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
    # Blackwell (sm_100: tcgen05 MMA into tensor memory, then the epilogue in registers), chosen from
    # register reports alone, never timed there: the 128x128 forward spills on sm_100 with a bias (15-17
    # stores, triton 3.6 and 3.9) and, at 3 stages, with entropy (4, triton 3.9), so the forward takes
    # 128x64 (168-201 registers, no spill); the backward keeps 128x128 (_TABLE_BWD), spill-free there.
    ("sm100", False): KernelConfig(128, 64, 64, num_warps=8, num_stages=4),
    ("sm100", True): KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
    # consumer parts (sm_86/89: ~100 KiB shared memory per block): two stages
    ("other", False): KernelConfig(128, 128, 64, num_warps=8, num_stages=2),
    ("other", True): KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
    # interpreter (CPU tests): small tiles; the interpreter's cost grows with the program count
    ("interpret", False): KernelConfig(16, 64, 32, num_warps=1, num_stages=1, GROUP_N=2),
    ("interpret", True): KernelConfig(16, 64, 32, num_warps=1, num_stages=1, GROUP_N=2),
}

# The backward's dlogits kernel is a plain GEMM tile with an elementwise epilogue (no running
# softmax state), so it may take a wider tile than the forward; entries here override _TABLE.
_TABLE_BWD: dict = {
    ("sm100", False): KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
}

# Rows that are not 16-element aligned (D % 16 != 0, odd strides, column-major operands) get
# neither async copies nor wide loads: every element carries its own 64-bit address and the big
# tile spills. These shapes are rare (tests, toy models): a small tile.
# Keyed (is_fp32, kernel); the fp32 FFMA path spills at 64 rows, and the forward (running softmax
# state) also at 32 x 64 on sm_80 without entropy, while the backward spills at 32 x 32 on sm_90.
_UNALIGNED = {
    (False, "fwd"): KernelConfig(64, 64, 16, num_warps=4, num_stages=1),  # 64 rows: one warpgroup wgmma
    (False, "bwd"): KernelConfig(64, 64, 16, num_warps=4, num_stages=1),
    (True, "fwd"): KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
    (True, "bwd"): KernelConfig(32, 64, 16, num_warps=4, num_stages=1),
}

FAMILIES = ("sm80", "sm90")  # where the autotune candidates are compiled spill-free; not sm100 (they spill)
# The static check's compile targets (GPUTarget arch) and the family whose table each launches.
TARGET_FAMILIES = {80: "sm80", 90: "sm90", 100: "sm100"}

# RLPLUS_AUTOTUNE=1: candidates around the half-precision table tile, tried only where that tile
# applies (`autotune_applies`); scripts/check_kernels.py compiles each, spill-free. Elsewhere the
# table stands: for fp32 and unaligned rows every candidate spills (fp32's also exceed the shared
# memory of sm_86/89), 128x256 tiles spill on sm_80 and sm_90, and 128x64 at 4 warps on sm_80 (triton 3.6).
AUTOTUNE_CANDIDATES = (
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4, PIPELINE_TILES=True),
    KernelConfig(64, 128, 64, num_warps=4, num_stages=4),
)


def autotune_applies(device: torch.device, dtype: torch.dtype, aligned: bool, dim: int) -> bool:
    """Where RLPLUS_AUTOTUNE=1 autotunes the forward: sm_80/sm_90, float16/bfloat16, aligned rows, D % 64 == 0."""
    return (autotune_enabled() and family_of(device) in FAMILIES and dtype != torch.float32 and aligned
            and dim % 64 == 0)


def table_config(family: str, is_fp32: bool, aligned: bool = True, kernel: str = "fwd") -> KernelConfig:
    if not aligned and family != "interpret":
        return _UNALIGNED[(is_fp32, kernel)]
    if kernel == "bwd" and (family, is_fp32) in _TABLE_BWD:
        return _TABLE_BWD[(family, is_fp32)]
    return _TABLE[(family, is_fp32)]


def rows_aligned(*tensors) -> bool:
    """True when every 2-D operand has unit inner stride and 16-element-divisible row stride/width."""
    for t in tensors:
        if t.stride(1) != 1 or t.stride(0) % 16 or t.shape[1] % 16 or t.data_ptr() % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _device_family(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    if major == 9:
        return "sm90"
    if major == 10:  # B200, GB200, B300: tcgen05
        return "sm100"
    if (major, minor) == (8, 0) or major >= 11:  # sm_120 (consumer Blackwell) has sm_80's mma.sync
        return "sm80"
    return "other"


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def family_of(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpret"
    return _device_family(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def pipelining_supported() -> bool:
    """Whether this triton's tl.range takes `flatten` (3.3 on), which PIPELINE_TILES needs."""
    import inspect

    return "flatten" in inspect.signature(tl.range.__init__).parameters


def _with_override(cfg: KernelConfig, override: Optional[dict]) -> KernelConfig:
    """cfg with the KernelConfig fields of `override` (tests pass small tiles; other keys are ignored)."""
    if not override:
        return cfg
    if override.get("PIPELINE_TILES") and not pipelining_supported():
        raise ValueError(f"config: PIPELINE_TILES needs triton >= 3.3 (tl.range flatten), this is {triton.__version__}")
    return replace(cfg, **{k: v for k, v in override.items() if k in KernelConfig.__dataclass_fields__})


def pick_config(device: torch.device, dtype: torch.dtype, override: Optional[dict] = None,
                aligned: bool = True, dim: Optional[int] = None, kernel: str = "fwd",
                descriptors: bool = False) -> KernelConfig:
    fam = family_of(device)
    cfg = table_config(fam, dtype == torch.float32, aligned, kernel)
    if aligned and not descriptors and dim is not None and fam != "interpret":
        # aligned rows have D % 16 == 0: BLOCK_D = 16 when the table's does not divide D, so
        # the masked D tail (a second dot in the loop, which spills at the big tile) never
        # compiles (128x128x32 spilled 2 registers under triton 3.6; x16 does not). A TMA load
        # reads the tail as zeros, so descriptors need no such fallback.
        if dim % cfg.BLOCK_D:
            cfg = replace(cfg, BLOCK_D=16)
    return _with_override(cfg, override)


@functools.lru_cache(maxsize=None)
def tensor_descriptor_class():
    """triton's host-side TMA descriptor, or None on a triton too old to have one."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def descriptors_supported(device: torch.device) -> bool:
    """sm_90 (on sm_80 a descriptor load lowers to plain loads that spill) and the interpreter,
    which tests the path, with a triton that has host-side descriptors."""
    return family_of(device) in ("sm90", "interpret") and tensor_descriptor_class() is not None


def uses_descriptors(source: str, device: torch.device, *operands: torch.Tensor) -> bool:
    """Whether the "tma" logits source fetches these [rows, D] operands by TMA descriptors here:
    where supported, on rows that pass `rows_aligned` (16-element row stride and width: stricter
    than TMA's 16 bytes) and do not overlap (no stride-0 broadcast rows, D > 0)."""
    return (source == "tma" and descriptors_supported(device) and rows_aligned(*operands)
            and all(t.shape[1] > 0 and t.stride(0) >= t.shape[1] for t in operands))


def operand_descriptors(hidden: torch.Tensor, weight: torch.Tensor, cfg: KernelConfig):
    """Host-side TMA descriptors of the [N, D] and [V, D] operands, blocks as the kernels load them."""
    descriptor = tensor_descriptor_class()
    return (descriptor.from_tensor(hidden, [cfg.BLOCK_N, cfg.BLOCK_D]),
            descriptor.from_tensor(weight, [cfg.BLOCK_V, cfg.BLOCK_D]))


def _padded_row(cols: int, device: torch.device) -> int:
    """Row stride of a padded buffer: cols rounded up to 16 elements (the kernels' row strides), 32 on the CPU,
    where torch's bfloat16 GEMM (oneDNN's AMX kernel, uxlfoundation/oneDNN#5717) reads a row past its last
    column when that stride is no multiple of 32: into the next row, so a NaN token's row reached its neighbour's
    gradient, and into the padding, whose garbage (a NaN) then reached any row."""
    multiple = 32 if device.type == "cpu" else 16
    return -(-cols // multiple) * multiple


def padded_storage(rows: int, cols: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flat storage for `padded_matrix(storage, r, c)` with r <= rows and c <= cols. Zeroed on the CPU, whose
    bfloat16 GEMM reads the padding (`_padded_row`); nothing reads it on a GPU: no memset there."""
    allocate = torch.zeros if device.type == "cpu" else torch.empty
    return allocate(rows * _padded_row(cols, device), device=device, dtype=dtype)


def padded_matrix(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] view of flat `storage` whose row stride is cols rounded up to 16 elements (32 on the CPU:
    `_padded_row`). The kernels that read or write such buffers (the cuBLAS product, the dlogits chunk) are
    compiled for 16-divisible row strides; an odd one (a vocabulary or its last chunk not a multiple of 16) would
    launch a variant the static check never sees, which spills (98 stores in the product-reading forward)."""
    stride = _padded_row(cols, storage.device)
    return storage[: rows * stride].view(rows, stride)[:, :cols]


# Reading an fp32 product is a memory-bound elementwise pass: a tile for load throughput (BLOCK_D unused).
PRODUCT_CONFIG = KernelConfig(64, 128, 16, num_warps=8, num_stages=3)


def product_config(device: torch.device, override: Optional[dict] = None) -> KernelConfig:
    """Launch config of the forward/backward kernels when they read a cuBLAS product (FROM_PRODUCT)."""
    return _with_override(_TABLE[("interpret", True)] if family_of(device) == "interpret" else PRODUCT_CONFIG,
                          override)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 operands use TF32 only where torch itself would (its matmul flag); else exact IEEE."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _loop_from_program_id(out_ptr):
    for i in range(tl.program_id(0), 1):  # as the vocabulary kernels loop from their program's first tile
        tl.store(out_ptr, i)


@functools.lru_cache(maxsize=None)
def _interpreter_failure() -> Optional[str]:
    """Why this triton's interpreter cannot run a loop that starts at a program id, or None."""
    try:
        _loop_from_program_id[(1,)](torch.zeros(1, dtype=torch.int32))
    except Exception as exc:  # noqa: BLE001 - whatever the interpreter raised is the message
        return f"{type(exc).__name__}: {exc}"
    return None


def check_interpreter() -> None:
    """Under TRITON_INTERPRET=1, a clear error where the interpreter cannot run the vocabulary kernels,
    instead of one failure per launch deep inside it. Seen: triton 3.6's interpreter with numpy >= 2.4,
    which no longer converts a one-element array to an int (triton 3.9's squeezes it first)."""
    if interpreting() and _interpreter_failure() is not None:
        import numpy

        raise RuntimeError(
            f"TRITON_INTERPRET=1: triton {triton.__version__}'s interpreter cannot run these kernels with "
            f"numpy {numpy.__version__} ({_interpreter_failure()}); triton 3.6's needs numpy < 2.4, "
            "triton 3.9's takes numpy 2.4")


def device_context(x: torch.Tensor):
    """`x`'s CUDA device made current (a no-op context for CPU tensors)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(launcher):
    """Runs a launcher with its first argument's CUDA device current. Triton launches on the current device
    and stream, torch ops on their tensors' device: a head on cuda:1 while cuda:0 is current would hand
    Triton another device's pointers ("cannot be accessed from Triton"), or cuda:0's stream."""
    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        with device_context(first):
            return launcher(first, *args, **kwargs)

    return launch


def kernel_operand(x: torch.Tensor) -> torch.Tensor:
    # triton 3.9's interpreter returns garbage from tl.dot on bfloat16 operands (fp16/fp32 are
    # fine), so when interpreting, bf16 operands are upcast; compiled kernels read bf16 directly.
    if x.dtype == torch.bfloat16 and interpreting():
        return x.float()
    return x


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())
