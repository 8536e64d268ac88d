"""The fused CPU RMSProp step: loader and Python wrapper of the C kernel in ``cpu.c``.

The kernel is a plain C library (no Python or torch headers, so one build serves every Python
and torch version) called through :mod:`ctypes` once per step with tables of data pointers.
It is normally compiled when the package is installed (``setup.py`` puts ``_cpu*.so`` next
to this file). If that copy is missing or was built from another version of ``cpu.c``, the
first use compiles ``cpu.c`` with the system C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``) into a cache directory (``$RMSPROP_CACHE_DIR``, else ``$XDG_CACHE_HOME/rmsprop``,
else ``~/.cache/rmsprop``) and reuses it afterwards. Without a compiler, :func:`available`
is False and :func:`unavailable_reason` says why. ``RMSPROP_CPU_KERNEL=0`` disables it;
``RMSPROP_CPU_ISA=base`` forces the baseline x86-64 code path (the default picks AVX2/FMA/F16C
code at load time when the CPU has it).

Writes go through raw pointers, so autograd's version counters are not bumped: call under
``torch.no_grad()`` on tensors autograd does not need, as optimizers do.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import state_flags

__all__ = ["available", "unavailable_reason", "fused_step", "fused_step_quantized",
           "QBLOCK", "quant_encode", "quant_decode", "first_nonfinite", "floor",
           "floor_call",
           "stream_copy", "stream_triad", "isa", "set_isa", "library_path", "build"]

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "cpu.c"
#: Every file the build reads: cpu.c and the template headers it includes.
SOURCES = ("cpu.c", "cpu_isa.h", "cpu_step.h", "cpu_step16.h")
_ABI_VERSION = 1  # must match RMS_ABI_VERSION in cpu.c

#: Flags every build uses; -fno-math-errno is what lets sqrt vectorise (see cpu.c);
#: -fopenmp-simd only enables `omp simd` loop pragmas (no OpenMP runtime: cpu.c has its own
#: thread pool); -ffp-contract=off keeps every multiply and add not written as a fused
#: multiply-add separately rounded, as torch's kernels round them: otherwise gcc fuses them
#: differently in differently specialised loops, and collecting statistics (or the AVX2 build
#: against the baseline) would change results by an ulp.
CFLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp-simd",
          "-pthread", "-fPIC", "-shared")

_DT_F32, _DT_F64, _DT_F16, _DT_BF16 = 0, 1, 2, 3
_FL_CENTERED, _FL_MOMENTUM, _FL_WD_COUPLED, _FL_NESTEROV = 1, 2, 4, 8
_FL_EPS_IN_SQRT, _FL_LR_IN_MOMENTUM, _FL_DECOUPLED, _FL_MAXIMIZE = 32, 64, 128, 256
_QF_U8, _QF_S8, _QF_U4, _QF_S4 = 4, 5, 6, 7
#: Elements per float32 scale of the 8-bit state formats (``rmsprop.codecs.FORMATS``).
QBLOCK = 256
#: ``state_dtype`` -> (format codes of v, m, b; elements per scale; elements per code byte)
_QFORMATS = {"8bit": ((_QF_U8, _QF_S8, _QF_S8), 256, 1),
             "4bit": ((_QF_U4, _QF_S4, _QF_S4), 128, 2)}

_IS_CPU = operator.attrgetter("is_cpu")
_DTYPE = operator.attrgetter("dtype")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_reason: str | None = None
_tried = False


def source_hash() -> str:
    """SHA-256 (first 16 hex digits) of the kernel's sources (:data:`SOURCES`, in order)
    plus the compile flags: the build identity."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((_HERE / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    env = os.environ.get("RMSPROP_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rmsprop"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def build(out: Path, *, cc: str | None = None, source_id: str | None = None) -> str:
    """Compile ``cpu.c`` into the shared library ``out`` (atomically), retrying without
    ``-fopenmp-simd`` for compilers that lack it. Returns the compiler command used; raises
    RuntimeError with the compiler's message on failure."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc/clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    sid = source_id or source_hash()
    errors = []
    for flags in (CFLAGS, tuple(f for f in CFLAGS if f != "-fopenmp-simd")):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [*cc.split(), *flags, f'-DRMS_SOURCE_HASH="{sid}"', str(_SOURCE),
               "-o", tmp, "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            r = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if r is not None and r.returncode == 0:
            os.replace(tmp, out)
            return " ".join(cmd)
        if r is not None:
            errors.append(f"{' '.join(cmd)}: {r.stderr.strip()[-500:]}")
        try:
            os.unlink(tmp)
        except OSError:
            pass
    raise RuntimeError("compiling the CPU kernel failed: " + " | ".join(errors))


def _open(path: Path, want: str) -> ctypes.CDLL | str:
    try:
        lib = ctypes.CDLL(str(path))
        lib.rms_abi_version.restype = ctypes.c_int
        lib.rms_source_hash.restype = ctypes.c_char_p
        if lib.rms_abi_version() != _ABI_VERSION:
            return f"{path}: ABI version {lib.rms_abi_version()} != {_ABI_VERSION}"
        got = lib.rms_source_hash().decode()
        if got != want:
            return f"{path}: built from another cpu.c ({got} != {want})"
    except (OSError, AttributeError) as e:
        return f"{path}: {e}"
    return lib


def _setup(lib: ctypes.CDLL) -> None:
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rms_fused_step.argtypes = [i64, vp, vp, vp, vp, vp, vp, i32, i32, vp, i32, vp, i32]
    lib.rms_fused_step.restype = i32
    lib.rms_fused_step_q.argtypes = [i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32, i32, i32,
                                     i32, vp, i32, vp, i32]
    lib.rms_fused_step_q.restype = i32
    lib.rms_quant_codec.argtypes = [i32, i32, i64, vp, vp, vp]
    lib.rms_quant_codec.restype = i32
    lib.rms_floor.argtypes = [i64, vp, vp, vp, vp, vp, vp, i32, i32, i32, ctypes.c_uint64]
    lib.rms_floor.restype = i32
    lib.rms_first_nonfinite.argtypes = [i64, vp, vp, vp, i32]
    lib.rms_first_nonfinite.restype = i64
    lib.rms_stream_copy.argtypes = [i64, vp, vp, i32]
    lib.rms_stream_copy.restype = None
    lib.rms_stream_triad.argtypes = [i64, vp, vp, vp, ctypes.c_float, i32]
    lib.rms_stream_triad.restype = None
    lib.rms_isa_name.restype = ctypes.c_char_p
    lib.rms_set_isa.argtypes = [i32]
    lib.rms_set_isa.restype = i32
    lib.rms_parallel.restype = i32


def _load() -> ctypes.CDLL | None:
    global _lib, _lib_path, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib, _lib_path, _reason = _find()
            if _lib is not None:
                _setup(_lib)
                want = os.environ.get("RMSPROP_CPU_ISA", "").strip().lower()
                if want in ("base", "x86-64", "sse2"):
                    _lib.rms_set_isa(1)
        except Exception as e:  # never let a loader problem break the optimizer's fallback
            _lib, _reason = None, f"loading the CPU kernel failed: {e!r}"
        _tried = True
    return _lib


def _find() -> tuple[ctypes.CDLL | None, Path | None, str | None]:
    if os.environ.get("RMSPROP_CPU_KERNEL", "1").strip() in ("0", "false", "no", "off"):
        return None, None, "disabled by RMSPROP_CPU_KERNEL=0"
    missing = [name for name in SOURCES if not (_HERE / name).exists()]
    if missing:
        return None, None, f"kernel source {_HERE / missing[0]} is missing"
    want = source_hash()
    problems = []
    for pattern in ("_cpu*.so", "_cpu*.pyd", "_cpu*.dylib"):
        for path in sorted(_HERE.glob(pattern)):
            lib = _open(path, want)
            if isinstance(lib, str):
                problems.append(lib)
                continue
            return lib, path, None
    tag = f"{sys.platform}-{platform.machine()}-{want}"
    cached = _cache_dir() / f"librmsprop_cpu-{tag}.so"
    if cached.exists():
        lib = _open(cached, want)
        if not isinstance(lib, str):
            return lib, cached, None
        problems.append(lib)
    try:
        build(cached, source_id=want)
    except (RuntimeError, OSError) as e:
        return None, None, "; ".join([*problems, str(e)])
    lib = _open(cached, want)
    if isinstance(lib, str):
        return None, None, "; ".join([*problems, lib])
    return lib, cached, None


def available() -> bool:
    """True when the compiled kernel could be loaded (building it on first use if needed)."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    _load()
    return _reason or ""


def library_path() -> Path | None:
    """The shared library in use, or None."""
    _load()
    return _lib_path


def isa() -> str:
    """The instruction-set variant in use: 'x86-64-v3' (AVX2, FMA, F16C) or 'x86-64'."""
    return _need().rms_isa_name().decode()


def set_isa(which: str) -> bool:
    """Select the code path: 'best', 'base' (baseline x86-64) or 'v3'. Returns False if the
    CPU (or the build) lacks it. For tests and benchmarks."""
    code = {"best": 0, "base": 1, "v3": 2}.get(which)
    if code is None:
        raise ValueError(f"set_isa: unknown variant {which!r} (best, base, v3)")
    return bool(_need().rms_set_isa(code))


def _need() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {_reason}")
    return lib


def _dt(dtype: Any) -> int:
    import torch
    code = {torch.float32: _DT_F32, torch.float64: _DT_F64, torch.float16: _DT_F16,
            torch.bfloat16: _DT_BF16}.get(dtype)
    if code is None:
        raise TypeError(f"fused CPU step: unsupported dtype {dtype} "
                        "(float32, float64, float16, bfloat16; complex as view_as_real)")
    return code


def _table(tensors: Sequence[Any], name: str, n: int, dtype: Any, numels: list[int],
           device_check: bool = True) -> array.array:
    """Data pointers of one list, after checking what would otherwise corrupt memory:
    length, CPU device, dtype, element count, contiguity. The checks run as C-level ``map``
    calls over the list (a few tens of ns per tensor); a failing one is then located for the
    error message."""
    import torch
    if len(tensors) != n:
        raise ValueError(f"fused CPU step: {name} has {len(tensors)} tensors, params has {n}")
    T = torch.Tensor
    if not all(map(_IS_CPU, tensors)):
        i = next(i for i, t in enumerate(tensors) if not t.is_cpu)
        raise ValueError(f"fused CPU step: {name}[{i}] is on {tensors[i].device}, not the CPU")
    if set(map(_DTYPE, tensors)) != {dtype}:
        i = next(i for i, t in enumerate(tensors) if t.dtype != dtype)
        raise TypeError(f"fused CPU step: {name}[{i}] has dtype {tensors[i].dtype}, "
                        f"expected {dtype}")
    got = list(map(T.numel, tensors))
    if got != numels:
        i = next(i for i, (a, b) in enumerate(zip(got, numels)) if a != b)
        raise ValueError(f"fused CPU step: {name}[{i}] has {got[i]} elements, "
                         f"params[{i}] has {numels[i]}")
    if not all(map(T.is_contiguous, tensors)):
        i = next(i for i, t in enumerate(tensors) if not t.is_contiguous())
        raise ValueError(f"fused CPU step: {name}[{i}] is not contiguous")
    return array.array("Q", map(T.data_ptr, tensors))


def _addr(a: array.array) -> int:
    return a.buffer_info()[0]


def fused_step(params: Sequence[Any], grads: Sequence[Any], square_avgs: Sequence[Any],
               grad_avgs: Sequence[Any] | None, momentum_buffers: Sequence[Any] | None, *,
               lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
               centered: bool, maximize: bool, eps_in_sqrt: bool, lr_in_momentum: bool,
               nesterov: bool, decoupled_weight_decay: bool, bias_correction: float,
               grad_scale: float | None = None, stats: Any = None) -> None:
    """One RMSProp step (:func:`rmsprop.spec.step`) over many CPU tensors in one C call,
    updating ``params`` and the state tensors in place.

    Args:
        params, grads: contiguous CPU tensors of one dtype (float32, float64, float16 or
            bfloat16; complex ones as ``torch.view_as_real``), grads shaped like params.
        square_avgs, grad_avgs, momentum_buffers: state, all in one dtype, the params' or
            float32. ``grad_avgs`` is used only if ``centered``, ``momentum_buffers`` only if
            ``momentum > 0`` (then they must be given).
        bias_correction: ``c = 1 - alpha**t`` (``v`` and ``m`` are divided by it), or 1.0.
            Computed by the caller; for float32 params compute it in float32 to match the
            NumPy reference bit for bit.
        grad_scale: if given, each gradient is first multiplied by ``1/grad_scale`` (rounded
            to the math precision), as ``torch.amp.GradScaler.unscale_`` does.
        stats: optional float64 tensor ``[len(params), 6]``; row ``i`` is overwritten with
            this step's ``sum(g^2)``, ``sum(u^2)``, ``sum(p_new^2)``, ``min(lr/d)``,
            ``max(lr/d)`` and the count of elements where eps dominates the denominator
            (``eps > s`` if ``eps_in_sqrt`` else ``eps > sqrt(s)``). ``g`` is the gradient
            the rule uses (unscaled, negated if maximize, plus coupled weight decay), ``u``
            the change ``p_old - p_new`` and ``p_new`` the param as stored (rounded to 16
            bits for 16-bit params; decoupled weight decay included), in the math type.
            Empty tensors get ``0, 0, 0, inf, -inf, 0``.

    Math: float32 for float32/float16/bfloat16 params, float64 for float64; 16-bit values
    are rounded once, when stored. No memory proportional to the model is allocated.
    """
    _need()
    n = len(params)
    centered, use_mom = state_flags("CPU", centered, grad_avgs, momentum, momentum_buffers)
    if stats is not None:
        import torch
        if (not isinstance(stats, torch.Tensor) or stats.dtype != torch.float64
                or tuple(stats.shape) != (n, 6) or not stats.is_contiguous()
                or stats.device.type != "cpu"):
            raise ValueError(f"fused CPU step: stats must be a contiguous float64 CPU tensor "
                             f"of shape ({n}, 6)")
    if n == 0:
        return
    pdtype = params[0].dtype
    pdt = _dt(pdtype)
    sdtype = square_avgs[0].dtype if len(square_avgs) else pdtype
    sdt = _dt(sdtype)
    if sdt != pdt and sdt != _DT_F32:
        raise TypeError(f"fused CPU step: state dtype {sdtype} must be the params' dtype "
                        f"({pdtype}) or torch.float32")
    if grad_scale is not None and not (grad_scale > 0):
        raise ValueError(f"fused CPU step: grad_scale must be > 0, got {grad_scale}")
    # checked here, before any pointer is taken: a wrong list would corrupt memory
    numels = [t.numel() for t in params]
    _table(params, "params", n, pdtype, numels)
    G = _table(grads, "grads", n, pdtype, numels)
    _table(square_avgs, "square_avgs", n, sdtype, numels)
    if centered:
        _table(grad_avgs, "grad_avgs", n, sdtype, numels)  # type: ignore[arg-type]
    if use_mom:
        _table(momentum_buffers, "momentum_buffers", n, sdtype, numels)  # type: ignore[arg-type]
    # the one way to the kernel: a one-shot plan over these tensors
    from ..torch._plan import CpuPlan, hyper_of
    plan = CpuPlan(params, square_avgs, grad_avgs if centered else None,
                   momentum_buffers if use_mom else None)
    plan.run(G, hyper_of(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize,
                         eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
                         nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay,
                         bias_correction=bias_correction, grad_scale=grad_scale), stats)


def _quantized_table(codes: Sequence[Any], scales: Sequence[Any | None], name: str,
                     numels: list[int], block: int = QBLOCK,
                     per_byte: int = 1) -> tuple[array.array, array.array]:
    """Pointer tables of one quantized state list of CPU tensors and of its scales
    (:func:`rmsprop.kernels.quantized_pointers`, which checks them first)."""
    import torch

    from . import quantized_pointers
    cp, sp = quantized_pointers("CPU", codes, scales, name, numels, block, per_byte,
                                torch.device("cpu"), "CPU tensor")
    return array.array("Q", cp), array.array("Q", sp)


def fused_step_quantized(params: Sequence[Any], grads: Sequence[Any],
                         square_avgs: Sequence[Any], grad_avgs: Sequence[Any] | None,
                         momentum_buffers: Sequence[Any] | None, *,
                         square_avg_scales: Sequence[Any | None],
                         grad_avg_scales: Sequence[Any | None] | None = None,
                         momentum_buffer_scales: Sequence[Any | None] | None = None,
                         lr: float, alpha: float, eps: float, weight_decay: float,
                         momentum: float, centered: bool, maximize: bool, eps_in_sqrt: bool,
                         lr_in_momentum: bool, nesterov: bool, decoupled_weight_decay: bool,
                         bias_correction: float, grad_scale: float | None = None,
                         stats: Any = None, nthreads: int | None = None,
                         state_dtype: str = "8bit") -> None:
    """One RMSProp step (:func:`rmsprop.spec.step` with ``state_dtype="8bit"`` or ``"4bit"``)
    over many CPU tensors in one C call, with block-quantized state updated in place.

    Per param ``i`` the state is either quantized (``square_avg_scales[i]`` is a tensor):
    ``square_avgs[i]`` the ``u8`` codes (uint8, one per element) and ``square_avg_scales[i]``
    their float32 block scales (``ceil(numel / 256)``), ``grad_avgs[i]`` /
    ``momentum_buffers[i]`` the ``s8`` codes with ``grad_avg_scales[i]`` /
    ``momentum_buffer_scales[i]`` — the ``codes`` and ``scales`` of
    :class:`rmsprop.codecs.Quantized`; with ``centered`` the ``square_avg`` codes hold the
    centered moment ``w = max(v - m'^2, 0)`` as in :mod:`rmsprop.codecs`. Or it is full
    precision (``square_avg_scales[i]`` is None): float32 tensors of the param's size, as
    tensors below ``rmsprop.codecs.MIN_QUANTIZED`` elements keep. With ``state_dtype="4bit"``
    the formats are ``u4`` / ``s4``: two codes per byte (element ``2j`` in the low nibble),
    ``ceil(numel / 128)`` scales, and only even sizes quantize.

    Each block (256 elements; 128 at 4 bits) is decoded to float32, updated by the same loop
    as float32 state (so the arithmetic, and its few-ulp distance to the spec where
    ``bias_correction``, ``nesterov`` or ``lr_in_momentum`` are on, is that of
    :func:`fused_step`), then encoded with its new scale ``max |x|``. Params: float32,
    float16 or bfloat16 (math in float32; 16-bit params rounded to nearest). Other arguments
    as :func:`fused_step`.
    """
    lib = _need()
    import torch
    if state_dtype not in _QFORMATS:
        raise ValueError(f"fused CPU step: state_dtype must be one of {', '.join(_QFORMATS)}, "
                         f"got {state_dtype!r}")
    (vf, mf, bf), block, per_byte = _QFORMATS[state_dtype]
    n = len(params)
    centered, use_mom = state_flags("CPU", centered, grad_avgs, momentum, momentum_buffers)
    if stats is not None and (not isinstance(stats, torch.Tensor)
                              or stats.dtype != torch.float64 or tuple(stats.shape) != (n, 6)
                              or not stats.is_contiguous() or stats.device.type != "cpu"):
        raise ValueError(f"fused CPU step: stats must be a contiguous float64 CPU tensor "
                         f"of shape ({n}, 6)")
    if grad_scale is not None and not (grad_scale > 0):
        raise ValueError(f"fused CPU step: grad_scale must be > 0, got {grad_scale}")
    if n == 0:
        return
    pdtype = params[0].dtype
    pdt = _dt(pdtype)
    if pdt == _DT_F64:
        raise TypeError("fused CPU step: quantized state needs float32, float16 or bfloat16 "
                        "params (float64 math keeps full-precision state)")
    numels = [t.numel() for t in params]
    P = _table(params, "params", n, pdtype, numels)
    G = _table(grads, "grads", n, pdtype, numels)
    V, VS = _quantized_table(square_avgs, square_avg_scales, "square_avgs", numels, block,
                             per_byte)
    quant = [s is not None for s in square_avg_scales]
    M = MS = B = BS = None
    for on, codes, scales, name in ((centered, grad_avgs, grad_avg_scales, "grad_avgs"),
                                    (use_mom, momentum_buffers, momentum_buffer_scales,
                                     "momentum_buffers")):
        if not on:
            continue
        if scales is None or [s is not None for s in scales] != quant:
            raise ValueError(f"fused CPU step: {name} must be quantized exactly where "
                             "square_avgs is (give its scales, None for float32 state)")
        tabs = _quantized_table(codes, scales, name, numels, block,  # type: ignore[arg-type]
                                per_byte)
        if name == "grad_avgs":
            M, MS = tabs
        else:
            B, BS = tabs
    flags = ((_FL_CENTERED if centered else 0) | (_FL_MOMENTUM if use_mom else 0)
             | (_FL_WD_COUPLED if weight_decay != 0 and not decoupled_weight_decay else 0)
             | (_FL_NESTEROV if nesterov and use_mom else 0)
             | (_FL_EPS_IN_SQRT if eps_in_sqrt else 0)
             | (_FL_LR_IN_MOMENTUM if lr_in_momentum else 0)
             | (_FL_DECOUPLED if decoupled_weight_decay and weight_decay != 0 else 0)
             | (_FL_MAXIMIZE if maximize else 0))
    hyper = array.array("d", [lr, alpha, eps, weight_decay, momentum, bias_correction,
                              1.0 if grad_scale is None else 1.0 / grad_scale])
    ne = array.array("q", numels)
    rc = lib.rms_fused_step_q(
        n, _addr(ne), _addr(P), _addr(G), _addr(V), _addr(M) if M is not None else None,
        _addr(B) if B is not None else None, _addr(VS), _addr(MS) if MS is not None else None,
        _addr(BS) if BS is not None else None, pdt, vf, mf, bf, _addr(hyper), flags,
        stats.data_ptr() if stats is not None else None, nthreads or torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fused CPU step (quantized state) failed with code {rc}")


#: ``rmsprop.codecs`` format name -> (the kernel's format code, elements per scale, per byte)
_QCODEC = {"u8": (_QF_U8, 256, 1), "s8": (_QF_S8, 256, 1), "u4": (_QF_U4, 128, 2),
           "s4": (_QF_S4, 128, 2)}


def _qformat(fmt: str, n: int) -> tuple[int, int, int]:
    if fmt not in _QCODEC:
        raise ValueError(f"quantized codec: fmt must be one of {', '.join(_QCODEC)}, "
                         f"got {fmt!r}")
    code, block, per_byte = _QCODEC[fmt]
    if n % per_byte:
        raise ValueError(f"quantized codec: {fmt} needs an even element count, got {n}")
    return code, block, per_byte


def quant_encode(x: Any, fmt: str) -> tuple[Any, Any]:
    """The fused step's own block encoder (the active instruction set's) on its own: the
    codes (uint8) and block scales (float32) of the flat float32 CPU tensor ``x`` in the
    ``rmsprop.codecs`` format ``fmt`` (``"u8"``, ``"s8"``, ``"u4"``, ``"s4"``), laid out as
    :class:`rmsprop.codecs.Quantized`'s. For tests against :func:`rmsprop.codecs.encode`."""
    import torch
    lib = _need()
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError("quant_encode: x must be a float32 CPU tensor")
    x = x.reshape(-1).contiguous()
    n = x.numel()
    code, block, per_byte = _qformat(fmt, n)
    codes = torch.empty(n // per_byte, dtype=torch.uint8)
    scales = torch.empty(-(-n // block), dtype=torch.float32)
    rc = lib.rms_quant_codec(code, 1, n, x.data_ptr(), codes.data_ptr(), scales.data_ptr())
    if rc != 0:
        raise RuntimeError(f"quant_encode failed with code {rc}")
    return codes, scales


def quant_decode(codes: Any, scales: Any, fmt: str, n: int) -> Any:
    """The fused step's own block decoder on its own: the ``n`` float32 values that
    ``codes`` and ``scales`` (as :func:`quant_encode` returns them) stand for. For tests
    against :func:`rmsprop.codecs.decode`."""
    import torch
    lib = _need()
    code, block, per_byte = _qformat(fmt, n)
    if (not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or not codes.is_cpu
            or not codes.is_contiguous() or codes.numel() != n // per_byte):
        raise ValueError(f"quant_decode: codes must be a contiguous uint8 CPU tensor of "
                         f"{n // per_byte} bytes")
    if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32
            or not scales.is_cpu or not scales.is_contiguous()
            or scales.numel() != -(-n // block)):
        raise ValueError(f"quant_decode: scales must be a contiguous float32 CPU tensor of "
                         f"{-(-n // block)} blocks")
    out = torch.empty(n, dtype=torch.float32)
    rc = lib.rms_quant_codec(code, 0, n, out.data_ptr(), codes.data_ptr(), scales.data_ptr())
    if rc != 0:
        raise RuntimeError(f"quant_decode failed with code {rc}")
    return out


def first_nonfinite(grads: Sequence[Any]) -> int:
    """Index of the first tensor in ``grads`` holding an inf or NaN, -1 if none (one threaded,
    vectorised pass; stops early). Complex tensors are checked component-wise; ``None``
    entries are skipped."""
    lib = _need()
    import torch
    n = len(grads)
    ptrs = array.array("Q", bytes(8 * n))
    numels = array.array("q", bytes(8 * n))
    dts = array.array("i", bytes(4 * n))
    for i, t in enumerate(grads):
        if t is None:
            continue
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"first_nonfinite: grads[{i}] must be a contiguous CPU tensor")
        dts[i] = _dt(t.dtype)
        numels[i] = t.numel()
        ptrs[i] = t.data_ptr()
    return int(lib.rms_first_nonfinite(n, _addr(numels), _addr(ptrs), _addr(dts),
                                       torch.get_num_threads()))


def floor_call(params: Sequence[Any], grads: Sequence[Any], square_avgs: Sequence[Any],
               grad_avgs: Sequence[Any] | None = None,
               momentum_buffers: Sequence[Any] | None = None,
               nthreads: int | None = None) -> Callable[[], None]:
    """The bandwidth floor for benchmarks, as a ready-to-time call: one pass over the same
    tensors with the step's access pattern (read p, g, v[, m, b], write p, v[, m, b] back) and
    trivial arithmetic that leaves every value unchanged, with the same threading and
    partition as :func:`fused_step`. State may be float or uint8 (8-bit state codes, one
    byte per element: the floor of :func:`fused_step_quantized` without its scales). The
    pointer tables are built once, here, so the call times the C loop alone."""
    lib = _need()
    import torch
    n = len(params)
    if n == 0:
        return lambda: None
    pdtype, sdtype = params[0].dtype, square_avgs[0].dtype
    numels = [t.numel() for t in params]
    P = _table(params, "params", n, pdtype, numels)
    G = _table(grads, "grads", n, pdtype, numels)
    # uint8 state: the codes of the 8-bit formats, one byte per element (their block
    # scales, 4 bytes per 256 elements, are not part of this floor)
    sdt = _QF_U8 if sdtype == torch.uint8 else _dt(sdtype)
    V = _table(square_avgs, "square_avgs", n, sdtype, numels)
    M = _table(grad_avgs, "grad_avgs", n, sdtype, numels) if grad_avgs is not None else None
    B = (_table(momentum_buffers, "momentum_buffers", n, sdtype, numels)
         if momentum_buffers is not None else None)
    ne = array.array("q", numels)
    keep = (params, grads, square_avgs, grad_avgs, momentum_buffers)
    args = (n, _addr(ne), _addr(P), _addr(G), _addr(V), _addr(M) if M is not None else None,
            _addr(B) if B is not None else None, _dt(pdtype), sdt,
            nthreads or torch.get_num_threads(), 0)
    fn = lib.rms_floor

    def call() -> None:
        if fn(*args) != 0:
            raise RuntimeError("floor kernel failed")
    call.keep = (keep, ne, P, G, V, M, B)  # type: ignore[attr-defined]  # tables stay alive
    return call


def floor(params: Sequence[Any], grads: Sequence[Any], square_avgs: Sequence[Any],
          grad_avgs: Sequence[Any] | None = None,
          momentum_buffers: Sequence[Any] | None = None, nthreads: int | None = None) -> None:
    """One call of the bandwidth floor (see :func:`floor_call`)."""
    floor_call(params, grads, square_avgs, grad_avgs, momentum_buffers, nthreads)()


def stream_copy(dst: Any, src: Any, nthreads: int | None = None) -> None:
    """STREAM copy ``dst[:] = src`` over contiguous float32 CPU tensors (8 bytes/element)."""
    import torch
    _need().rms_stream_copy(src.numel(), dst.data_ptr(), src.data_ptr(),
                            nthreads or torch.get_num_threads())


def stream_triad(a: Any, b: Any, c: Any, scalar: float = 3.0,
                 nthreads: int | None = None) -> None:
    """STREAM triad ``a = b + scalar*c`` over contiguous float32 CPU tensors (12 bytes/elem)."""
    import torch
    _need().rms_stream_triad(a.numel(), a.data_ptr(), b.data_ptr(), c.data_ptr(),
                             float(scalar), nthreads or torch.get_num_threads())
