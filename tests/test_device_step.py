"""The gated device step route (CudaPlan: the fused Triton kernel, the CUDA default) without
a GPU: CPU tensors are routed through CudaPlan (``_plan.plan_for``) and the kernels run in
Triton's interpreter (TRITON_INTERPRET=1); on a CUDA machine the same tests run on CUDA
tensors, compiled, and the CUDA-only ones (sync debug mode, graph capture) run too.

"No host read" is checked by :class:`HostReads`, which records every read of a tensor's
values on the host made outside the Triton launch itself: the ATen ops that copy a value to
a Python scalar or need one (``_local_scalar_dense`` behind ``item``/``float``/``bool``/
``int``, ``is_nonzero``, ``nonzero``, ``equal``...) and the Python-level ``tolist``,
``numpy``, ``__array__`` and ``cpu``. On CUDA each of those is a host sync.

Oracles: :func:`rmsprop.kernels.triton.fused_step` given every value from the host (the
synced route: float lr, host ``1 - alpha^t``, host ``1/grad_scale``; the same kernel, so
bit-identical), and ``torch.optim.RMSprop`` for the steps a refused or skipped step must
leave as if it never happened.
"""

from __future__ import annotations

import math
import traceback
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from rmsprop.torch import NonFiniteGradientError, RMSprop, _plan  # noqa: E402
from rmsprop.torch import optimizer as _optimizer  # noqa: E402

SHAPES = [(33,), (5, 4), (0,), ()]
aten = torch.ops.aten

# ATen ops that read a tensor's values on the host (a device sync on CUDA)
_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.equal,
          aten.masked_select, aten.unique_consecutive, aten._unique2, aten.allclose}


class HostReads(TorchDispatchMode):
    """Records host reads of tensor values (see the module docstring) while active, except
    inside a Triton launch (the interpreter reads its arguments to run the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._paused = 0
        self._undo: list = []

    def _hit(self, what: str) -> None:
        if not self._paused:
            self.reads.append(what + "\n" + "".join(traceback.format_stack(limit=8)[:-2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _READS:
            self._hit(str(func))
        return func(*args, **(kwargs or {}))

    def _patch(self, owner, name: str, wrap) -> None:
        old = getattr(owner, name)
        self._undo.append((owner, name, old))
        setattr(owner, name, wrap(old))

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        def reading(name):
            def wrap(old):
                def f(t, *a, **k):
                    self._hit(f"Tensor.{name}")
                    return old(t, *a, **k)
                return f
            return wrap

        for name in ("tolist", "numpy", "__array__", "cpu"):
            self._patch(torch.Tensor, name, reading(name))

        def paused(old):
            def run(fn, *a, **k):
                self._paused += 1
                try:
                    return old(fn, *a, **k)
                finally:
                    self._paused -= 1
            return run
        self._patch(InterpretedFunction, "run", paused)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, old in reversed(self._undo):
            setattr(owner, name, old)
        self._undo.clear()
        return super().__exit__(*exc)


@pytest.fixture
def dev(tk, monkeypatch) -> str:
    """Where the tensors live; on the CPU the optimizer's CPU params take CudaPlan."""
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(tk._rmsprop_kernel, InterpretedFunction):
        monkeypatch.setattr(_plan, "plan_for", lambda device_type: _plan.CudaPlan)
        return "cpu"
    return "cuda"


def _params(dev: str, dtype=torch.float32, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).to(dev).requires_grad_()
            for s in SHAPES]


def _grads(params: list, k: int, scale: float = 1.0) -> list:
    gen = torch.Generator().manual_seed(100 + k)
    return [(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale).to(p.device)
            for p in params]


def _set_grads(params: list, grads: list) -> None:
    for p, g in zip(params, grads):  # in place: the pointer table stays as it is
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


class Reference:
    """The same steps through ``fused_step`` with every value given from the host."""

    def __init__(self, params: list, opts: dict) -> None:
        self.opts = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                         centered=False, maximize=False, eps_in_sqrt=False,
                         lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
                         bias_correction=False)
        self.opts.update({k: v for k, v in opts.items() if k in self.opts})
        self.p = [p.detach().clone() for p in params]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.b = [torch.zeros_like(p) for p in self.p]
        self.t = 0

    def step(self, tk, grads: list, lr: float, grad_scale: float | None = None) -> None:
        o = dict(self.opts)
        self.t += 1
        o["bias_correction"] = (1.0 - o["alpha"] ** self.t) if o["bias_correction"] else 1.0
        o["lr"] = lr
        tk.fused_step(self.p, grads, self.v, self.m if o["centered"] else None,
                      self.b if o["momentum"] else None, grad_scale=grad_scale, **o)

    def assert_same(self, opt: RMSprop, params: list) -> None:
        for i, p in enumerate(params):
            st = opt.state[p]
            assert torch.equal(p.detach(), self.p[i]), i
            assert torch.equal(st["square_avg"], self.v[i]), i
            if self.opts["centered"]:
                assert torch.equal(st["grad_avg"], self.m[i]), i
            if self.opts["momentum"]:
                assert torch.equal(st["momentum_buffer"], self.b[i]), i
            assert float(st["step"]) == self.t


CONFIGS = {
    "raise": dict(),
    "skip": dict(nonfinite="skip", momentum=0.9),
    "ignore": dict(nonfinite="ignore", centered=True),
    "scaler": dict(weight_decay=0.1, maximize=True),
    "tensor_lr": dict(momentum=0.5, nesterov=True),
    "bias_correction": dict(bias_correction=True, alpha=0.9, dtype=torch.float64),
    "track_stats": dict(track_stats=True, centered=True),
    "capturable": dict(capturable=True, bias_correction=True, alpha=0.9),
    "cuda_graph": dict(cuda_graph=True, bias_correction=True, momentum=0.9),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gated_step_reads_nothing_on_the_host(tk, dev, name, monkeypatch):
    """After the warm-up step that builds the plan, steps on the gated route read no
    tensor value on the host (the verdict, a tensor lr, the bias correction's step count,
    GradScaler's scale and found_inf, the statistics all stay on the device), and give the
    synced route's bits (with cuda_graph, from the step that captures the graph on; on the
    CPU through :func:`_host_graph`'s stand-in)."""
    if name == "cuda_graph" and dev == "cpu":
        _host_graph(tk, monkeypatch)
    opts = dict(CONFIGS[name])
    dtype = opts.pop("dtype", torch.float32)
    params = _params(dev, dtype)
    tensor_lr = name in ("tensor_lr", "capturable")
    lr = torch.tensor(0.01, dtype=torch.float32, device=dev) if tensor_lr else 0.01
    opt = RMSprop(params, lr=lr, **opts)
    ref = Reference(params, opts)
    scaled = name == "scaler"
    reads = HostReads()
    for k in range(5):
        rate = 0.01 / (1 + k)
        scale = 2.0 ** (8 - k)  # GradScaler's scale moves between steps
        grads = _grads(params, k, scale if scaled else 1.0)
        _set_grads(params, grads)
        if tensor_lr:
            lr.fill_(rate)  # a scheduler writing the tensor in place
        else:
            opt.param_groups[0]["lr"] = rate
        if scaled:
            opt.grad_scale = torch.full((1,), scale, device=dev)
            opt.found_inf = torch.zeros(1, device=dev)
        if k >= 2:  # step 1 builds the plan, step 2 the device gate
            with reads:
                opt.step()
        else:
            opt.step()
        if scaled:
            del opt.grad_scale, opt.found_inf
        # the reference reads the float32 tensor lr as the synced route did
        ref.step(tk, grads, float(lr) if tensor_lr else rate, scale if scaled else None)
        ref.assert_same(opt, params)
    assert isinstance(next(iter(opt._plans.values())), _plan.CudaPlan)
    assert reads.reads == [], reads.reads[0]
    if name == "cuda_graph":  # the last steps were replays
        assert opt._route is not None and opt._route.graph is not None
    opt.check()  # every verdict clean
    if name == "track_stats":
        want = math.sqrt(sum(float(g.double().square().sum()) for g in grads)
                         / sum(g.numel() for g in grads))
        assert opt.stats()["groups"][0]["grad_rms"] == pytest.approx(want, rel=1e-6)


def test_harness_catches_host_reads(tk, dev, monkeypatch):
    """The harness fails where a read happens: a plain float(), the skip counter read on
    the host, and GradScaler's found_inf read on the host when the device route is off."""
    reads = HostReads()
    with reads:
        float(torch.ones((), device=dev))
    assert len(reads.reads) == 1 and "_local_scalar_dense" in reads.reads[0]
    params = _params(dev)
    opt = RMSprop(params, nonfinite="skip")
    for k in range(2):
        _set_grads(params, _grads(params, k))
        opt.step()
    reads = HostReads()
    with reads:
        assert opt.skipped_steps == 0
    assert reads.reads
    monkeypatch.setattr(RMSprop, "_scaler_on_device", lambda *a: False)
    opt.grad_scale = torch.full((1,), 4.0, device=dev)
    opt.found_inf = torch.zeros(1, device=dev)
    reads = HostReads()
    with reads:
        opt.step()
    assert any("_local_scalar_dense" in r for r in reads.reads)


def _torch_twin(params: list, **kw) -> tuple[list, torch.optim.RMSprop]:
    twins = [p.detach().clone().requires_grad_() for p in params]
    return twins, torch.optim.RMSprop(twins, foreach=False, **kw)


def _snapshot(opt: RMSprop, params: list) -> list:
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
            for p in params]


def _unchanged(opt: RMSprop, params: list, snap: list) -> None:
    for p, (old, st) in zip(params, snap):
        assert torch.equal(p.detach(), old)
        assert set(opt.state[p]) == set(st)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


@pytest.mark.parametrize("point", ["step", "stats", "state_dict", "zero_grad", "check"])
def test_deferred_raise_arrives_at_each_read_point(tk, dev, point):
    """nonfinite="raise" on the gated route: the bad step returns without raising and
    changes nothing; the next reading call raises, naming the parameter and the step; then
    the error is cleared and training goes on exactly as torch.optim.RMSprop, which never
    saw the bad gradients."""
    params = _params(dev)
    opt = RMSprop(params, lr=0.01, track_stats=True)
    twins, ref = _torch_twin(params, lr=0.01)
    for k in range(2):
        grads = _grads(params, k)
        _set_grads(params, grads)
        _set_grads(twins, grads)
        opt.step()
        ref.step()
    snap = _snapshot(opt, params)
    bad = _grads(params, 2)
    bad[1][2, 3] = math.nan
    _set_grads(params, bad)
    opt.step()  # no raise: the verdict is on its way
    _unchanged(opt, params, snap)
    calls = {"step": opt.step, "stats": opt.stats, "state_dict": opt.state_dict,
             "zero_grad": opt.zero_grad, "check": opt.check}
    if dev == "cuda" and point in ("step", "zero_grad"):
        torch.cuda.synchronize()  # these read a verdict once it has arrived, never waiting
    with pytest.raises(NonFiniteGradientError, match=r"group 0 index 1 \(shape \(5, 4\)\) "
                                                     r"at step 3; that step changed nothing"):
        calls[point]()
    _unchanged(opt, params, snap)  # the raising step() did not run its own step either
    opt.check()  # cleared
    assert opt.stats()["groups"][0]["step"] == 2  # the statistics of the last good step
    grads = _grads(params, 3)
    _set_grads(params, grads)
    _set_grads(twins, grads)
    opt.step()
    ref.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


class _SlowEvent:
    """A CUDA event stand-in whose copy has not "arrived" until the test delivers it or
    someone waits for it (counted): what a host running ahead of the device sees."""

    def __init__(self, dev: str) -> None:
        self.dev, self.done, self.waits = dev, True, 0

    def record(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.deliver()

    def deliver(self) -> None:
        if self.dev == "cuda":
            torch.cuda.synchronize()  # the real copy into host memory has then landed
        self.done = True


def test_step_reads_only_verdicts_that_arrived_and_waits_only_for_a_free_slot(tk, dev):
    """nonfinite="raise" while the host runs ahead of the device: a step() neither waits for
    nor raises a verdict still on its way; the steps after a bad one apply their own
    gradients (as torch.optim.RMSprop would, never having seen the bad ones); only the step
    that would have more than DEPTH verdicts on their way waits, for the oldest, and raises
    its error having changed nothing. A verdict that has arrived is raised by the next
    step() without a wait."""
    params = _params(dev)
    opt = RMSprop(params, lr=0.01)
    twins, ref = _torch_twin(params, lr=0.01)

    def good(k: int) -> None:
        grads = _grads(params, k)
        _set_grads(params, grads)
        _set_grads(twins, grads)
        opt.step()
        ref.step()

    for k in range(2):
        good(k)
    opt.check()
    (gate,) = opt._gates.values()
    depth = _plan.DeviceGate.DEPTH
    gate.events = events = [_SlowEvent(dev) for _ in range(depth)]
    bad = _grads(params, 2)
    bad[1][2, 3] = math.nan
    _set_grads(params, bad)
    opt.step()  # step 3: refused on the device, its verdict on its way
    for k in range(3, 3 + depth - 1):  # steps 4..depth+2: nothing arrives, nothing waits
        good(k)
    assert sum(e.waits for e in events) == 0 and len(opt._verdicts) == depth
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    snap = _snapshot(opt, params)
    _set_grads(params, _grads(params, 99))
    with pytest.raises(NonFiniteGradientError, match=r"group 0 index 1 .* at step 3; "):
        opt.step()  # a slot must be freed: it waits for the oldest verdict, step 3's
    # (then, to number the refused step, the error's path waits for the device)
    assert events[0].waits == 1
    _unchanged(opt, params, snap)
    assert all(float(opt.state[p]["step"]) == 2 + depth - 1 for p in params)
    opt.check()  # the later verdicts were clean
    bad = _grads(params, 50)
    bad[0][0] = math.inf
    _set_grads(params, bad)
    opt.step()
    for e in events:
        e.deliver()
    waits = sum(e.waits for e in events)
    with pytest.raises(NonFiniteGradientError, match=r"group 0 index 0 .* at step "
                                                     rf"{2 + depth}; "):
        opt.step()  # it has arrived: raised at once, without a wait
    assert sum(e.waits for e in events) == waits


def test_skip_counts_on_the_device_and_warns_when_read(tk, dev):
    """nonfinite="skip": each bad step is counted by the device (read through
    skipped_steps), warned about once, when its verdict is read, and leaves the params,
    state, step counts and statistics as the last good step left them."""
    params = _params(dev)
    opt = RMSprop(params, lr=0.01, momentum=0.9, nonfinite="skip", track_stats=True)
    twins, ref = _torch_twin(params, lr=0.01, momentum=0.9)
    for k in range(6):
        grads = _grads(params, k)
        bad = k in (2, 3)
        if bad:
            grads[0][k] = -math.inf
        _set_grads(params, grads)
        if k == 3:
            with pytest.warns(RuntimeWarning, match="skipped a step.*group 0 index 0"):
                opt.step()  # reads step 2's verdict
        else:
            opt.step()
        if not bad:
            _set_grads(twins, grads)
            ref.step()
        if k == 3:
            assert opt.stats()["groups"][0]["step"] == 2
    opt.check()  # the warning is given once
    assert opt.skipped_steps == 2
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == 4
    opt.skipped_steps = 0  # reset, as the monitor or a user may
    assert opt.skipped_steps == 0


def test_raise_now_raises_inside_the_step(tk, dev):
    params = _params(dev)
    opt = RMSprop(params, nonfinite="raise_now")
    for k in range(2):
        _set_grads(params, _grads(params, k))
        opt.step()
    snap = _snapshot(opt, params)
    bad = _grads(params, 2)
    bad[0][30] = math.nan
    _set_grads(params, bad)
    with pytest.raises(NonFiniteGradientError, match="group 0 index 0"):
        opt.step()
    _unchanged(opt, params, snap)
    opt.check()
    with pytest.raises(ValueError, match="nonfinite"):
        RMSprop(params, nonfinite="later")


def test_grad_scaler_found_inf_gates_silently(tk, dev):
    """A real GradScaler: its scale and found_inf are read by the kernel; an overflowed
    step changes nothing (its statistics are the last step's), is not counted in
    skipped_steps and raises nothing, and the trajectory is torch.optim.RMSprop's under
    the same scaler."""
    params = _params(dev)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = RMSprop(params, lr=0.01, track_stats=True)
    ref = torch.optim.RMSprop(twins, lr=0.01, foreach=False)
    scalers = [torch.amp.GradScaler(dev, init_scale=2.0 ** 10, growth_interval=2)
               for _ in range(2)]
    for k in range(6):
        snap = _snapshot(opt, params) if k == 3 else None
        for ps, o, sc in ((params, opt, scalers[0]), (twins, ref, scalers[1])):
            loss = sum((p * g).sum() for p, g in zip(ps, _grads(ps, k)))
            if k == 3:
                loss = loss * math.inf
            o.zero_grad()
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
        if k == 2:
            last = opt.stats()["groups"][0]
        if k == 3:
            _unchanged(opt, params, snap)
            assert opt.stats()["groups"][0] == last
        for a, b in zip(params, twins):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    opt.check()
    assert opt.skipped_steps == 0
    assert all(float(opt.state[p]["step"]) == 5 for p in params)


def test_capturable_step_counts_live_on_the_device(tk, dev, monkeypatch):
    """capturable=True: the step counts are one device tensor (each state["step"] a view
    of it) that the step kernel's gate advances; on the for-loop/foreach paths the options
    that would read the host are refused, naming the combination, with nothing changed."""
    params = _params(dev)
    opt = RMSprop(params, capturable=True, bias_correction=True)
    for k in range(3):
        _set_grads(params, _grads(params, k))
        opt.step()
    plan = next(iter(opt._plans.values()))
    assert plan.steps.device.type == dev and plan.steps.tolist() == [3.0] * len(params)
    assert all(opt.state[p]["step"].data_ptr() == plan.steps[i].data_ptr()
               for i, p in enumerate(params))
    monkeypatch.setattr(_optimizer, "_CAPTURE_DEVICES", (dev,))
    for kw, why in ((dict(), "nonfinite='raise'"),
                    (dict(nonfinite="ignore", bias_correction=True), "bias_correction"),
                    (dict(nonfinite="ignore", lr=torch.tensor(0.01)), "tensor lr")):
        ps = _params(dev)
        o = RMSprop(ps, capturable=True, foreach=True, **kw)
        _set_grads(ps, _grads(ps, 0))
        before = [p.detach().clone() for p in ps]
        with pytest.raises(RuntimeError, match=f"capturable=True .*foreach path.*{why}"):
            o.step()
        assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not o.state
    ps = _params(dev)
    o = RMSprop(ps, capturable=True, foreach=True, nonfinite="ignore")
    twins, ref = _torch_twin(ps, lr=0.01)
    grads = _grads(ps, 0)
    _set_grads(ps, grads)
    _set_grads(twins, grads)
    o.step()
    ref.step()
    for a, b in zip(ps, twins):
        torch.testing.assert_close(a, b)
    assert all(o.state[p]["step"].device.type == dev for p in ps)


def test_first_nonfinite_names_the_first_tensor(tk, dev):
    """The check's flag pair: a bad first tensor is index 0, a single bad tensor is found
    (both were lost when the gate and the index shared one flag)."""
    xs = [torch.zeros(5, device=dev), torch.zeros(3, device=dev)]
    xs[0][1] = math.nan
    assert tk.first_nonfinite(xs) == 0
    assert tk.first_nonfinite(xs[:1]) == 0
    xs[1][2] = math.inf
    assert tk.first_nonfinite(xs[1:]) == 0 and tk.first_nonfinite(xs) == 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_steps_do_not_sync(tk, dev, name):
    """The sync check itself: steps after the warm-up under
    torch.cuda.set_sync_debug_mode("error")."""
    if dev != "cuda":
        pytest.skip("the compiled backend only")
    opts = dict(CONFIGS[name])
    dtype = opts.pop("dtype", torch.float32)
    params = _params(dev, dtype)
    lr = torch.tensor(0.01, device=dev) if name in ("tensor_lr", "capturable") else 0.01
    opt = RMSprop(params, lr=lr, **opts)
    for k in range(5):
        _set_grads(params, _grads(params, k))
        if name == "scaler":
            opt.grad_scale = torch.full((1,), 4.0, device=dev)
            opt.found_inf = torch.zeros(1, device=dev)
        if k >= (3 if opts.get("cuda_graph") else 2):  # (a capture waits for the device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if opts.get("cuda_graph"):
        assert opt._route is not None and opt._route.graph is not None
    opt.check()


def test_cuda_graph_option_is_checked_and_survives_pickling(tk, dev):
    """cuda_graph must be a bool (refused naming it, before anything is built), and it is
    part of the optimizer's pickled state as track_stats is."""
    import pickle
    params = _params(dev)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="cuda_graph"):
            RMSprop(params, cuda_graph=bad)
    opt = RMSprop(params, cuda_graph=True)
    assert pickle.loads(pickle.dumps(opt)).cuda_graph is True
    assert pickle.loads(pickle.dumps(RMSprop(params))).cuda_graph is False


GRAPH_CONFIGS = {
    "raise": dict(momentum=0.9),
    "skip": dict(nonfinite="skip", centered=True),
    "ignore": dict(nonfinite="ignore"),
    "bias_correction": dict(bias_correction=True, alpha=0.9),
    "tensor_lr": dict(nesterov=True, momentum=0.5),
    "8bit": dict(state_dtype="8bit", momentum=0.9),
}


def _host_graph(tk, monkeypatch) -> None:
    """On the CPU: a stand-in for a CUDA graph of the route's launches whose replay runs them
    again with every host upload disabled, so that, as a real graph, it steps with whatever
    the host wrote into the device tables before it (a replay that missed an upload steps
    with stale pointers or hyperparameters)."""
    def capture(launches):
        def replay():
            with monkeypatch.context() as m:
                m.setattr(tk.Table, "upload", lambda self, grads, hyper=None: (self.dyn,
                                                                               self.hyper))
                launches()
        return replay
    monkeypatch.setattr(_optimizer, "_graph_capture", capture)
    monkeypatch.setattr(_optimizer, "_GRAPH_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("name", list(GRAPH_CONFIGS))
def test_cuda_graph_replays_the_eager_steps_bit_for_bit(tk, dev, name, monkeypatch):
    """cuda_graph=True against the same optimizer with eager launches, step by step, bit for
    bit (params and state), through what a replay must follow without a capture: gradients
    moved to new tensors, a float lr changed by the host, a NaN gradient (refused on the
    device, raised by the next step, nothing changed); and what needs one: an option turned
    on (new kernel flags). The graph is captured at the second step along the route. On the
    CPU the graph is :func:`_host_graph`'s stand-in."""
    if dev == "cpu":
        _host_graph(tk, monkeypatch)
    opts = dict(GRAPH_CONFIGS[name])
    size = [(4096,), (300,), (33, 7)]  # one tensor large enough to quantize
    runs = []
    for graph in (False, True):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen).to(dev).requires_grad_() for s in size]
        lr: Any = torch.tensor(0.01, device=dev) if name == "tensor_lr" else 0.01
        opt = RMSprop(params, lr=lr, cuda_graph=graph, **opts)
        trace = []
        for k in range(9):
            grads = _grads(params, k)
            if k == 5 and name != "ignore":
                grads[1][7] = math.nan
            if k == 3:
                for p in params:
                    p.grad = None  # new gradient tensors: new pointers in the table
            if k == 4 and name != "tensor_lr":
                opt.param_groups[0]["lr"] = 0.02
            if k == 7:
                opt.param_groups[0]["weight_decay"] = 0.1
            _set_grads(params, grads)
            try:
                with warnings.catch_warnings():  # "skip" warns once when it reads the verdict
                    warnings.simplefilter("ignore", RuntimeWarning)
                    opt.step()
                raised = None
            except NonFiniteGradientError as e:
                raised = str(e)
            if dev == "cuda":
                torch.cuda.synchronize()  # verdicts arrive: the next step() raises a bad one
            trace.append((raised, [p.detach().clone() for p in params],
                          [{key: v.clone() for key, v in opt.state[p].items()} for p in params]))
        runs.append((trace, opt))
    (eager, _), (graphed, gopt) = runs
    for k, ((ra, pa, sa), (rb, pb, sb)) in enumerate(zip(eager, graphed)):
        assert ra == rb, k
        for x, y in zip(pa, pb):
            assert torch.equal(x, y), k
        for x, y in zip(sa, sb):
            assert set(x) == set(y) and all(torch.equal(x[key], y[key]) for key in x), k
    if opts.get("nonfinite", "raise") == "raise":
        assert eager[6][0] is not None and "at step 6" in eager[6][0]
    route = gopt._route
    assert route is not None and route.graph is not None
    assert route.captures == 2  # the first capture, and the one for weight_decay's flag
    assert gopt._captures == 2


def test_cuda_graph_stops_capturing_past_its_budget(tk, dev, monkeypatch):
    """An optimizer that has captured _MAX_CAPTURES_TOTAL graphs steps eagerly from then on
    (a loop whose route keeps being rebuilt must not pay a capture every few steps), and the
    same as one that never captured."""
    if dev == "cpu":
        _host_graph(tk, monkeypatch)
    runs = []
    for spent in (0, _optimizer._MAX_CAPTURES_TOTAL):
        params = _params(dev)
        opt = RMSprop(params, lr=0.01, cuda_graph=True)
        opt._captures = spent
        for k in range(4):
            _set_grads(params, _grads(params, k))
            opt.step()
        opt.check()
        assert opt._route is not None
        assert (opt._route.graph is None) == bool(spent)
        assert opt._captures == (1 if not spent else spent)
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_graph_capture_replays_the_eager_steps(tk, dev):
    """capturable=True: opt.step() captured by torch.cuda.graph after warm-up steps and
    replayed gives the eager steps' bits (same kernel), with a tensor lr and device step
    counts; a NaN in a replay is refused on the device and reported by check()."""
    if dev != "cuda":
        pytest.skip("the compiled backend only")
    runs = []
    for capture in (False, True):
        params = _params(dev)
        lr = torch.tensor(0.01, device=dev)
        opt = RMSprop(params, lr=lr, capturable=True, bias_correction=True, alpha=0.9,
                      momentum=0.9)
        grads = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        for k in range(3):  # warm-up: builds the plan and the device gate
            for g, x in zip(grads, _grads(params, k)):
                g.copy_(x)
            opt.step()
        torch.cuda.synchronize()
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        for k in range(3, 7):
            for g, x in zip(grads, _grads(params, k)):
                g.copy_(x)
            lr.fill_(0.01 / k)
            if capture:
                graph.replay()
            else:
                opt.step()
        torch.cuda.synchronize()
        runs.append((params, opt))
    (pe, oe), (pc, oc) = runs
    for a, b in zip(pe, pc):
        assert torch.equal(a, b)
        assert torch.equal(oe.state[a]["square_avg"], oc.state[b]["square_avg"])
        assert float(oe.state[a]["step"]) == float(oc.state[b]["step"]) == 7


@pytest.mark.parametrize("change", ["new_grads", "param_swap", "noncontiguous", "dtype"])
def test_cached_route_detects_what_moved(tk, dev, change):
    """Steps replayed along the cached device route (``RMSprop._route``) still see every
    change that makes the pointer table wrong: new gradient tensors (their row rewritten),
    a param whose storage moved (``p.data = ...``), a non-contiguous gradient and a param
    whose dtype changed (the plan is dropped). Oracle: the synced route's bits
    (:class:`Reference`), or torch's tolerance for the general path; the stale table would
    write into the old storage, which must stay as it was."""
    params = _params(dev)
    opt = RMSprop(params, lr=0.01)
    ref = Reference(params, {})
    for k in range(3):
        grads = _grads(params, k)
        _set_grads(params, grads)
        opt.step()
        ref.step(tk, grads, 0.01)
    route = opt._route
    assert route is not None and route.plans == list(opt._plans.values())
    grads = _grads(params, 3)
    p = params[1]  # shape (5, 4)
    old = p.detach()
    before = old.clone()
    if change == "new_grads":  # zero_grad(set_to_none=True): backward makes new ones
        for q, g in zip(params, grads):
            q.grad = g.clone()
    else:
        _set_grads(params, grads)
    if change == "param_swap":
        p.data = p.detach().clone()
    elif change == "noncontiguous":
        p.grad = grads[1].t().contiguous().t()
        assert not p.grad.is_contiguous() and torch.equal(p.grad, grads[1])
    elif change == "dtype":
        p.data = p.detach().double()
        try:
            opt.step()
        except (RuntimeError, ValueError):
            pass  # a refusal naming the mismatch is as good as a general step
        assert opt._route is not route
        assert torch.equal(old, before)  # the stale float32 row was not written
        return
    opt.step()
    ref.step(tk, grads, 0.01)
    if change == "new_grads":
        assert opt._route is route  # the row was rewritten, the route kept
        ref.assert_same(opt, params)
    else:
        assert opt._route is not route or change == "param_swap"
        for i, q in enumerate(params):
            torch.testing.assert_close(q.detach(), ref.p[i], rtol=1e-6, atol=1e-7)
    if change == "param_swap":
        assert torch.equal(old, before) and not torch.equal(p.detach(), before)


@pytest.mark.parametrize("state_dtype,opts", [("8bit", dict(momentum=0.9)),
                                              ("4bit", dict(centered=True))])
def test_quantized_state_on_the_device_route(tk, dev, monkeypatch, state_dtype, opts):
    """Block-quantized state takes the gated device plan (the Triton quantized kernel), reads
    nothing on the host after warm-up and gives the C kernel's quantized step bit for bit:
    params, codes, block scales and the float32 state of a small tensor."""
    shapes = [(4096,), (33,)]  # one quantized tensor, one kept in float32

    def make(where: str):
        gen = torch.Generator().manual_seed(7)
        ps = [torch.randn(s, generator=gen).to(where).requires_grad_() for s in shapes]
        return ps, RMSprop(ps, lr=0.01, state_dtype=state_dtype, **opts)

    params, opt = make(dev)
    with monkeypatch.context() as m:  # the oracle: the CPU plan's C kernel, on CPU tensors
        m.setattr(_plan, "plan_for", lambda device_type: _plan.CpuPlan)
        twins, ref = make("cpu")
        for k in range(4):
            for t, g in zip(twins, _grads(twins, k)):
                t.grad = g
            ref.step()
    reads = HostReads()
    for k in range(4):
        _set_grads(params, _grads(params, k))
        if k >= 2:
            with reads:
                opt.step()
        else:
            opt.step()
    plan = next(iter(opt._plans.values()))
    assert isinstance(plan, _plan.CudaPlan) and plan.quantized == state_dtype
    assert reads.reads == [], reads.reads[0]
    opt.check()
    for p, t in zip(params, twins):
        assert torch.equal(p.detach().cpu(), t.detach())
        st, rt = opt.state[p], ref.state[t]
        assert set(st) == set(rt)
        for key in rt:
            assert torch.equal(st[key].cpu(), rt[key]), key
