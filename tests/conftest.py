"""The shared test table: the torch optimizer's paths, the option grid and the state formats.

Test files import the names they need (``from conftest import PATHS, GRID``) instead of
redefining them, so a new path, option or storage format is one row here:

* :data:`ALL_PATHS` — name -> the constructor kwargs that select that path of
  ``rmsprop.torch.RMSprop``; :data:`PATHS` the ones that run here (``"fused"`` only where
  the fused CPU kernel loads; :data:`FUSED_UNAVAILABLE` says why not), :data:`PATH_NAMES`
  their names, :data:`PATH_PARAMS` every path as a ``pytest.param`` (skipped with the reason
  where it cannot run).
* :data:`GRID` — one option set per option of the rule (and a few combinations);
  :data:`TORCH_GRID` the rows that use only options ``torch.optim.RMSprop`` has.
* :data:`STATE_FORMATS` — name -> ``state_dtype`` value of every state storage format
  (the float dtypes, then any registered format such as ``"8bit"``).
* fixtures ``path`` (each of :data:`PATH_NAMES`) and ``path_kwargs`` (its kwargs).
* :func:`expected_warnings` — ``pytest.warns`` for the warning an option set provokes on
  purpose when it is validated (so the suite asserts it instead of printing it).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch


def _fused_unavailable() -> str | None:
    from rmsprop.torch import RMSprop

    try:
        RMSprop([torch.nn.Parameter(torch.zeros(2))], fused=True)
    except RuntimeError as e:
        return f"fused path unavailable here: {e}"
    return None


#: Why the fused CPU kernel does not load here (None when it does).
FUSED_UNAVAILABLE: str | None = _fused_unavailable()
FUSED: bool = FUSED_UNAVAILABLE is None

#: Each path of the torch optimizer, by name: the kwargs that select it explicitly.
ALL_PATHS: dict[str, dict[str, Any]] = {
    "forloop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(foreach=False, fused=True),
}
#: The paths that run here (the fused one only where its kernel loads).
PATHS: dict[str, dict[str, Any]] = {k: v for k, v in ALL_PATHS.items()
                                    if FUSED or k != "fused"}
PATH_NAMES: list[str] = list(PATHS)
#: Every path as a pytest parameter; the fused one skipped, with the reason, where it
#: cannot run.
PATH_PARAMS = [pytest.param(name, id=name, marks=pytest.mark.skipif(
    name not in PATHS, reason=FUSED_UNAVAILABLE or "")) for name in ALL_PATHS]

#: One row per option of the rule (and a few combinations).
GRID: list[dict[str, Any]] = [
    dict(),
    dict(momentum=0.9),
    dict(centered=True),
    dict(weight_decay=0.1),
    dict(maximize=True),
    dict(eps_in_sqrt=True),
    dict(initial_square_avg=1.0),
    dict(momentum=0.9, lr_in_momentum=True),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, lr_in_momentum=True),
    dict(bias_correction=True),
    # at t=1 bias-corrected v - m^2 is 0 up to rounding: eps inside the sqrt keeps it well-posed
    dict(bias_correction=True, centered=True, eps_in_sqrt=True, eps=1e-3),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(centered=True, momentum=0.5, weight_decay=0.05, maximize=True, eps_in_sqrt=True),
]

#: Option names of torch.optim.RMSprop itself.
TORCH_OPTIONS: frozenset[str] = frozenset(
    inspect.signature(torch.optim.RMSprop).parameters) - {"params"}
#: The GRID rows torch.optim.RMSprop can run (it is then the oracle).
TORCH_GRID: list[dict[str, Any]] = [c for c in GRID if set(c) <= TORCH_OPTIONS]


def _state_formats() -> dict[str, Any]:
    from rmsprop.torch import _codecs

    formats: dict[str, Any] = {"float64": torch.float64, "float32": torch.float32,
                               "bfloat16": torch.bfloat16, "float16": torch.float16}
    formats.update({name: name for name in _codecs.registered()})
    return formats


#: Every state storage format, by name: the ``state_dtype`` value that selects it.
STATE_FORMATS: dict[str, Any] = _state_formats()


#: Options of the quantized-state kernel tests (tests/test_kernels_quantized.py,
#: tests/test_fused_quantized.py): those the fused C kernel writes bit for bit as the spec,
#: and those where its float32 arithmetic is a few ulp from the spec's.
QUANTIZED_EXACT: list[dict[str, Any]] = [
    dict(), dict(centered=True), dict(momentum=0.9), dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled_weight_decay=True), dict(maximize=True),
    dict(initial_square_avg=1.0, eps_in_sqrt=True, eps=1e-6),
    dict(centered=True, momentum=0.9, weight_decay=0.05)]
QUANTIZED_NEAR: list[dict[str, Any]] = [
    dict(bias_correction=True), dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, lr_in_momentum=True),
    dict(centered=True, momentum=0.9, bias_correction=True, initial_square_avg=0.1)]


def expected_warnings(options: dict[str, Any]) -> AbstractContextManager[Any]:
    """``pytest.warns`` for the RuntimeWarning that validating ``options`` gives on purpose
    (centered with bias correction from a zero square average; eps = 0), else a null
    context."""
    centered_bc = (options.get("centered") and options.get("bias_correction")
                   and not options.get("initial_square_avg"))
    if centered_bc:
        return pytest.warns(RuntimeWarning, match="centered=True with bias_correction=True")
    if "eps" in options and options["eps"] == 0:
        return pytest.warns(RuntimeWarning, match="eps=0")
    return contextlib.nullcontext()


@pytest.fixture(params=PATH_PARAMS)
def path(request: pytest.FixtureRequest) -> str:
    """Each path's name in turn (the fused one skipped, with the reason, where it cannot
    run)."""
    return request.param


@pytest.fixture
def path_kwargs(path: str) -> dict[str, Any]:
    """The constructor kwargs of the ``path`` fixture's path."""
    return dict(ALL_PATHS[path])


#: Where the Triton tests run: the interpreter (CPU tensors) always, compiled CUDA where a GPU is.
TRITON_BACKENDS = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=TRITON_BACKENDS)
def tk(request):
    """The kernel module, (re)imported with the interpreter on or off: triton.jit decides
    between compiled and interpreted when the module is imported."""
    from triton.runtime.interpreter import InterpretedFunction

    interpret = request.param == "interpreter"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    import rmsprop.kernels.triton as mod
    reloaded = isinstance(mod._rmsprop_kernel, InterpretedFunction) != interpret
    if reloaded:
        mod = importlib.reload(mod)
    assert mod.available(), mod.unavailable_reason()
    yield mod
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    if reloaded:
        importlib.reload(mod)


# -- the quantized codecs' boundaries (tests of every encoder against rmsprop.codecs) ----------

CODEC_FORMATS = ("u8", "s8", "u4", "s4")


def boundary_quotients(fmt: str) -> Any:
    """The quotients x / s where the code of ``fmt`` changes: (k - 1/2)^2 / L^2 for the
    unsigned map, (k + 1/2) / K for the signed one."""
    import numpy as np

    from rmsprop import codecs
    f = codecs.FORMATS[fmt]
    k = np.arange(1, f.levels + 1, dtype=np.float64)
    if f.signed:
        return (k[:f.levels] - 0.5) / f.levels
    return (k - 0.5) ** 2 / f.levels ** 2


def boundary_blocks(fmt: str, scales: Any, ulps: int) -> Any:
    """Blocks whose first element is the scale s (the block maximum) followed by the float32
    values within ``ulps`` of s times every code boundary (negated for every other block of
    a signed map), padded with s."""
    import numpy as np

    from rmsprop import codecs
    f = codecs.FORMATS[fmt]
    t = boundary_quotients(fmt)
    steps = np.arange(-ulps, ulps + 1)
    out = []
    for i, s in enumerate(scales):
        x = (t * float(s)).astype(np.float32)
        xs = x.view(np.int32)[:, None] + steps[None, :]  # neighbours by their bits
        vals = np.clip(xs.reshape(-1), 0, None).astype(np.int32).view(np.float32)
        vals = np.minimum(vals, np.float32(s))
        body = np.concatenate([[np.float32(s)], vals]).astype(np.float32)
        body = np.concatenate([body, np.full(-len(body) % f.block, s, np.float32)])
        out.append(-body if f.signed and i % 2 else body)
    return np.concatenate(out)


def spec_step_all(o: Any, params: list, grads: list, states: list) -> tuple[list, list]:
    """:func:`rmsprop.spec.step` over lists: the new params and states, the oracle of the
    fused quantized kernels' tests."""
    from rmsprop import spec
    out = [spec.step(p, g, st, o) for p, g, st in zip(params, grads, states)]
    return [p for p, _ in out], [st for _, st in out]


def assert_quantized_state(lists: dict, states: list, exact: bool) -> None:
    """A kernel's state ``lists`` (``{key: (codes or float32 tensors, scales or None)}``)
    against the spec's ``states``: codes and scales bit for bit when ``exact``, else scales
    to 1e-6 and at most 0.1 % of codes off by rounding; float32 state to 0 or 4 ulp."""
    import numpy as np

    from rmsprop import codecs
    eps32 = float(np.finfo(np.float32).eps)
    for k in ("square_avg", "grad_avg", "momentum_buffer"):
        codes, scales = lists[k]
        for i, st in enumerate(states[:len(codes)]):
            e = st[k]
            got = codes[i].cpu().numpy()
            if isinstance(e, codecs.Quantized):
                got_s = scales[i].cpu().numpy()
                if exact:
                    np.testing.assert_array_equal(got, e.codes, err_msg=f"{k}[{i}] codes")
                    np.testing.assert_array_equal(got_s, e.scales, err_msg=f"{k}[{i}] scales")
                else:
                    np.testing.assert_allclose(got_s, e.scales, rtol=1e-6, err_msg=k)
                    assert np.mean(got != e.codes) <= 1e-3, k
            else:
                tol = 0 if exact else 4 * eps32
                np.testing.assert_allclose(got, e, rtol=tol, atol=tol, err_msg=f"{k}[{i}]")


def state_lists(states: list, device: Any = "cpu") -> dict:
    """The fused quantized kernels' state lists ``{key: (codes or float32 values, scales or
    None)}`` from spec states, as fresh tensors on ``device``."""
    import numpy as np

    from rmsprop import codecs
    lists: dict = {k: ([], []) for k in ("square_avg", "grad_avg", "momentum_buffer")}
    for st in states:
        for k, (values, scales) in lists.items():
            e = st.get(k)
            if e is None:
                continue
            if isinstance(e, codecs.Quantized):
                values.append(torch.from_numpy(e.codes.copy()).to(device))
                scales.append(torch.from_numpy(e.scales.copy()).to(device))
            else:
                values.append(torch.from_numpy(np.array(e, np.float32)).to(device))
                scales.append(None)
    return lists


def quantized_kernel_step(fn: Any, o: Any, t: int, params: list, grads: list, lists: dict,
                          fmt: str, **extra: Any) -> None:
    """Step ``t`` of a fused quantized kernel ``fn`` (either kernel's
    ``fused_step_quantized``) with the options ``o`` over :func:`state_lists`; the bias
    correction is rounded to float32, as the spec computes it for float32 params."""
    import numpy as np
    c = float(np.float32(1.0 - o.alpha ** t)) if o.bias_correction else 1.0
    fn(params, grads, lists["square_avg"][0], lists["grad_avg"][0] or None,
       lists["momentum_buffer"][0] or None, square_avg_scales=lists["square_avg"][1],
       grad_avg_scales=lists["grad_avg"][1] or None,
       momentum_buffer_scales=lists["momentum_buffer"][1] or None,
       lr=o.lr, alpha=o.alpha, eps=o.eps, weight_decay=o.weight_decay, momentum=o.momentum,
       centered=o.centered, maximize=o.maximize, eps_in_sqrt=o.eps_in_sqrt,
       lr_in_momentum=o.lr_in_momentum, nesterov=o.nesterov,
       decoupled_weight_decay=o.decoupled_weight_decay, bias_correction=c,
       state_dtype=fmt, **extra)
