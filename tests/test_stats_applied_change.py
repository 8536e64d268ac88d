"""The fused kernels' statistics describe the change that happened to the params.

``stats()``'s ``update_rms`` and ``update_to_param_rms`` come from each row's ``sum u^2`` and
``sum p_new^2`` (rmsprop.torch._stats), where ``u = old - new`` is the applied change and
``p_new`` the param as stored. A kernel that summed its unrounded update instead would, for
16-bit params, report a change that the rounding to 16 bits erased (and a Monitor would never
see a stalled run), and would leave decoupled weight decay out of the change on any dtype.

The oracle is independent of every kernel: the same quantities computed in float64 from the
params before and after the step. The for-loop path (which computes its rows from the params
too) must agree. Covered: the fused CPU kernel (float and quantized state, the direct and the
buffered 16-bit loops) and the Triton kernels on the same grid, under Triton's interpreter on
CPU tensors (compiled on CUDA where a GPU is), through ``RMSprop.stats()`` and through the
kernels' raw rows.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conftest import FUSED, FUSED_UNAVAILABLE
from rmsprop.monitor import Monitor
from rmsprop.torch import RMSprop

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_fused = pytest.mark.skipif(not FUSED, reason=FUSED_UNAVAILABLE or "")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

#: above codecs.MIN_QUANTIZED, so that "8bit" state is quantized, and not a multiple of the
#: kernels' blocks, so that partial blocks are summed too
N = 5000
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OPTS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "decoupled": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "momentum+decoupled": dict(momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True),
}
STATES = {"float32": torch.float32, "8bit": "8bit"}
LR = 1e-3
#: per dtype, a magnitude whose half ulp is far above every update of these options (at
#: most about 0.04 = two momentum steps of 10 * lr plus decoupled decay of lr * wd * |p|)
STALL_AT = {torch.bfloat16: 256.0, torch.float16: 256.0, torch.float32: 2.0 ** 22}


def _start(dtype: torch.dtype, seed: int, stalled: bool, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=gen, dtype=torch.float64)
    if stalled:
        x = torch.where(x < 0, -1.0, 1.0) * STALL_AT[dtype]
    return x.to(dtype).to(device)


def _grads(dtype: torch.dtype, seed: int, steps: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(N, generator=gen, dtype=torch.float64).to(dtype).to(device)
            for _ in range(steps)]


def _oracle(old: torch.Tensor, new: torch.Tensor) -> tuple[float, float]:
    """``sum (old - new)^2`` and ``sum new^2`` in float64: exact differences of the stored
    values (two values of a float format differ by a float64 exactly), rounded sums."""
    o, n = old.detach().double(), new.detach().double()
    return float((o - n).square().sum()), float(n.square().sum())


def _check(s: dict, u2: float, p2: float) -> None:
    if u2 == 0.0:
        assert s["update_rms"] == 0.0
        assert s["update_to_param_rms"] == 0.0
        return
    # float32 squares summed in blocks, then in float64: a few float32 ulps
    assert s["update_rms"] == pytest.approx(math.sqrt(u2 / N), rel=1e-5)
    assert s["update_to_param_rms"] == pytest.approx(math.sqrt(u2 / p2), rel=1e-5)


def _run(dtype, opts, state, stalled, device="cpu", steps=2, **path):
    """Steps of one optimizer; per step the stats and the float64 oracle's sums."""
    p = torch.nn.Parameter(_start(dtype, 3, stalled, device))
    opt = RMSprop([p], lr=LR, track_stats=True, state_dtype=STATES[state], **opts, **path)
    out = []
    for g in _grads(dtype, 3, steps, device):
        p.grad = g.clone()
        old = p.detach().clone()
        opt.step()
        out.append((dict(opt.stats()["groups"][0]), *_oracle(old, p)))
    return p.detach(), out


def _grid(stalled: bool) -> list:
    return [pytest.param(d, o, s, id=f"{str(d)[6:]}-{o}-{s}")
            for d in DTYPES for o in OPTS for s in STATES
            if not (stalled and "decoupled" in o and d == torch.float32)]


def _assert_stats_equal_the_oracle_and_the_forloop(dtype, opts, state, stalled,
                                                   device="cpu", **path):
    p, got = _run(dtype, OPTS[opts], state, stalled, device=device, **path)
    for s, u2, p2 in got:
        _check(s, u2, p2)
        assert (u2 == 0.0) == stalled
    # the for-loop path computes its rows from the params, on the same step
    q, ref = _run(dtype, OPTS[opts], state, stalled, device=device, foreach=False,
                  fused=False)
    # The paths may round a few elements an ulp apart (the fused CPU step's 16-bit params
    # are the for-loop's bits): a float32 ulp moves the sums by far less than their
    # rounding, a 16-bit one by a visible fraction of one element's change.
    same = torch.equal(p, q)
    assert same or dtype == torch.float32 or "fused" not in path
    rel = 1e-5 if same or dtype == torch.float32 else 2e-2
    for (s, _, _), (r, ru2, rp2) in zip(got, ref):
        _check(r, ru2, rp2)
        for k in ("update_rms", "update_to_param_rms"):
            assert s[k] == pytest.approx(r[k], rel=rel), k
    return got


# -- the fused CPU kernel -------------------------------------------------------------------


@needs_fused
@pytest.mark.parametrize("dtype, opts, state", _grid(False))
def test_fused_cpu_stats_are_the_applied_change(dtype, opts, state):
    _assert_stats_equal_the_oracle_and_the_forloop(dtype, opts, state, False, fused=True)


@needs_fused
@pytest.mark.parametrize("dtype, opts, state", _grid(True))
def test_fused_cpu_stalled_update_reports_zero(dtype, opts, state):
    """Every update below half an ulp of the param: nothing changes, and update_rms is 0."""
    _assert_stats_equal_the_oracle_and_the_forloop(dtype, opts, state, True, fused=True)


@needs_fused
def test_monitor_sees_a_stalled_bfloat16_run_on_the_default_path():
    p = torch.nn.Parameter(_start(torch.bfloat16, 5, True, "cpu"))
    opt = RMSprop([p], lr=LR, track_stats=True)
    mon = Monitor(opt, patience=2, emit=False)
    found = []
    for g in _grads(torch.bfloat16, 5, 3, "cpu"):
        p.grad = g
        old = p.detach().clone()
        opt.step()
        assert torch.equal(p.detach(), old)
        found += mon.update()
    assert [w.kind for w in found] == ["stalled"]


def _cpu_kernel_rows(pdtype, sdtype, momentum, decoupled, stalled, reps=1):
    from rmsprop.kernels import cpu
    p = _start(pdtype, 7, stalled, "cpu").repeat(reps)
    g = _grads(pdtype, 7, 1, "cpu")[0].repeat(reps)
    v = torch.rand(N * reps, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    v, b = v.to(sdtype), (v * 0.1 - 0.05).to(sdtype)
    old = p.clone()
    stats = torch.empty(1, 6, dtype=torch.float64)
    cpu.fused_step([p], [g], [v], None, [b] if momentum else None, lr=LR, alpha=0.99,
                   eps=1e-8, weight_decay=0.1 if decoupled else 0.0,
                   momentum=0.9 if momentum else 0.0, centered=False, maximize=False,
                   eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
                   decoupled_weight_decay=decoupled, bias_correction=1.0, stats=stats)
    return stats[0], _oracle(old, p)


@needs_fused
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("pdtype, sdtype", [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float16, torch.float16),
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.float64, torch.float32)], ids=lambda d: str(d)[6:])
def test_cpu_kernel_rows_sum_the_stored_change(pdtype, sdtype, momentum):
    """The kernel's own rows (16-bit state and float64 params too), decoupled decay on."""
    row, (u2, p2) = _cpu_kernel_rows(pdtype, sdtype, momentum, True, False)
    rtol = 1e-12 if pdtype == torch.float64 else 1e-5
    assert float(row[1]) == pytest.approx(u2, rel=rtol)
    assert float(row[2]) == pytest.approx(p2, rel=rtol)
    if pdtype in STALL_AT:
        row, (u2, p2) = _cpu_kernel_rows(pdtype, sdtype, momentum, False, True)
        assert u2 == 0.0 and float(row[1]) == 0.0
        assert float(row[2]) == pytest.approx(p2, rel=1e-6)


@needs_fused
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_cpu_kernel_rows_add_up_over_threads(pdtype):
    """A tensor cut into chunks on two threads: the per-block sums of the change add up."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row, (u2, p2) = _cpu_kernel_rows(pdtype, torch.float32, True, True, False, reps=60)
    finally:
        torch.set_num_threads(n)
    assert float(row[1]) == pytest.approx(u2, rel=1e-5)
    assert float(row[2]) == pytest.approx(p2, rel=1e-5)


# -- the Triton kernels ---------------------------------------------------------------------


@pytest.fixture
def triton_plan(tk, monkeypatch) -> str:
    """The device the optimizer's Triton path runs on: CPU tensors under the interpreter
    (the CPU params routed to the Triton plan, as tests/test_triton.py does), else CUDA."""
    from triton.runtime.interpreter import InterpretedFunction

    from rmsprop.torch import _plan
    if isinstance(tk._rmsprop_kernel, InterpretedFunction):
        monkeypatch.setattr(_plan, "plan_for", lambda device_type: _plan.CudaPlan)
        return "cpu"
    return "cuda"


TRITON_GRID = [pytest.param(d, o, s, id=f"{str(d)[6:]}-{o}-{s}")
               for d in DTYPES for o in ("plain", "momentum+decoupled") for s in STATES]


@needs_triton
@pytest.mark.parametrize("dtype, opts, state", TRITON_GRID)
def test_triton_stats_are_the_applied_change(triton_plan, dtype, opts, state):
    _assert_stats_equal_the_oracle_and_the_forloop(dtype, opts, state, False, triton_plan)


@needs_triton
@pytest.mark.parametrize("dtype, state", [
    pytest.param(d, s, id=f"{str(d)[6:]}-{s}") for d in DTYPES for s in STATES])
def test_triton_stalled_update_reports_zero(triton_plan, dtype, state):
    _assert_stats_equal_the_oracle_and_the_forloop(dtype, "momentum", state, True,
                                                   triton_plan)
