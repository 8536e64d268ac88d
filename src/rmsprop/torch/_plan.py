"""The fused CPU path's per-group plan: what can be decided once is decided once.

A step over a model of a thousand small tensors is dominated by Python, not arithmetic: every
attribute read per tensor costs ~0.1-0.3 us. The plan caches, per param group, the pointer
tables of the params and their state (they never move), the dtype codes, and a single tensor
holding every param's ``step`` (each ``state["step"]`` is a 0-d view into it, so the state
dict keeps torch's layout while one ``add_`` advances them all). Per step only the gradients'
pointers are read. A plan is rebuilt whenever something it caches could have changed (a param
without a gradient, options that add state, ``load_state_dict``).
"""

from __future__ import annotations

import array
import operator
from itertools import repeat
from typing import Any, Optional

import torch
from torch import Tensor

from ..kernels import cpu as _cpu

__all__ = ["CpuPlan", "CudaPlan", "plan_for"]


def _ptrs(tensors: list[Tensor]) -> array.array:
    # map() is a C-level loop (~2x a comprehension); an array from a list of known length
    # is ~40 ns per tensor cheaper than one grown from an iterator
    return array.array("Q", list(map(Tensor.data_ptr, tensors)))


class CpuPlan:
    """Pointer tables for one group whose params share dtype and state dtype on the CPU."""

    def __init__(self, params: list[Tensor], states: list[dict], *, centered: bool,
                 momentum: bool, version: int) -> None:
        self.sharded = any(hasattr(p, "to_local") for p in params)  # FSDP2 DTensors
        real = [_real(p) for p in params]
        self.version = version
        self.params = params
        self.centered, self.momentum = centered, momentum
        self.n = len(params)
        self.pdt = _cpu._dt(real[0].dtype)
        sq = [st["square_avg"] for st in states]
        sq_real = [_real(v) for v in sq]
        self.sdt = _cpu._dt(sq_real[0].dtype)
        self.complex = any(p.is_complex() for p in params)
        self.numel = array.array("q", [p.numel() for p in real])
        self.P = _ptrs(real)
        self.P_list = self.P.tolist()  # compared as a list: no array to build per step
        self.V = _ptrs(sq_real)
        self.M = self._state_table(states, "grad_avg") if centered else None
        self.B = self._state_table(states, "momentum_buffer") if momentum else None
        self.dts = array.array("i", [self.pdt] * self.n)
        steps = torch.stack([st["step"].reshape(()).to(torch.float32) for st in states])
        for i, st in enumerate(states):  # views: one add_ advances every param's step
            st["step"] = steps[i]
        self.steps = steps
        self.keep = (real, sq_real)  # the tables point into these
        self.validated: Optional[tuple] = None  # the group's options when last validated

    @staticmethod
    def _state_table(states: list[dict], key: str) -> array.array:
        ts = [st[key] for st in states]
        return _ptrs([_real(t) for t in ts])

    def valid_for(self, group: dict, version: int) -> bool:
        return (version == self.version and group["params"] is self.params
                and len(self.params) == self.n and (group["momentum"] > 0) == self.momentum
                and bool(group["centered"]) == self.centered)

    def tables(self, grads: list[Tensor]) -> Optional[tuple[array.array, array.array]]:
        """Pointers of the params and gradients, or None when the general path must run: a
        gradient that is missing, sparse or not contiguous, or a param whose storage moved
        (``p.data = ...``, ``model.half()``: the plan's dtypes may no longer hold)."""
        params = self.params
        try:
            if self.complex or self.sharded:
                if any(map(operator.is_, grads, repeat(None))):
                    return None
                grads = [_real(g) for g in grads]
                params = [_real(p) for p in params]
            if not all(map(Tensor.is_contiguous, grads)):
                return None
            if list(map(Tensor.data_ptr, params)) != self.P_list:
                return None
            return self.P, _ptrs(grads)
        except (RuntimeError, TypeError):  # sparse gradients have no strides or data pointer;
            return None                    # a missing one (None) is no Tensor

    gated = False  # see CudaPlan

    def new_stats(self) -> Tensor:
        """An uninitialised ``[n, 6]`` float64 tensor for the kernel's statistics."""
        return torch.empty(self.n, 6, dtype=torch.float64)

    def first_nonfinite(self, G: array.array) -> int:
        lib = _cpu._need()
        return int(lib.rms_first_nonfinite(self.n, _addr(self.numel), _addr(G),
                                           _addr(self.dts), torch.get_num_threads()))

    def step(self, P: array.array, G: array.array, h: Any,
             stats: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> None:
        lib = _cpu._need()
        flags = ((_cpu._FL_CENTERED if h.centered else 0)
                 | (_cpu._FL_MOMENTUM if h.momentum > 0 else 0)
                 | (_cpu._FL_WD_COUPLED if h.weight_decay != 0
                    and not h.decoupled_weight_decay else 0)
                 | (_cpu._FL_NESTEROV if h.nesterov and h.momentum > 0 else 0)
                 | (_cpu._FL_EPS_IN_SQRT if h.eps_in_sqrt else 0)
                 | (_cpu._FL_LR_IN_MOMENTUM if h.lr_in_momentum else 0)
                 | (_cpu._FL_DECOUPLED if h.decoupled_weight_decay else 0)
                 | (_cpu._FL_MAXIMIZE if h.maximize else 0))
        hyper = array.array("d", [h.lr, h.alpha, h.eps, h.weight_decay, h.momentum, h.c,
                                  h.inv_scale])
        rc = lib.rms_fused_step(self.n, _addr(self.numel), _addr(P), _addr(G),
                                _addr(self.V), _addr(self.M) if self.M is not None else None,
                                _addr(self.B) if self.B is not None else None, self.pdt,
                                self.sdt, _addr(hyper), flags,
                                stats.data_ptr() if stats is not None else None,
                                torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"fused CPU step failed with code {rc}")
        self.steps.add_(1)


class CudaPlan(CpuPlan):
    """The same plan for CUDA params: the pointer tables live in a Triton :class:`Table` on
    the device, refreshed per step with the gradients' pointers and the hyperparameters in
    one host-to-device copy; the check and the step are one launch each. The check is
    *gated*: it raises a device flag (the gate) that the step kernel reads, doing nothing when
    it is set, so check and step are queued together and the host syncs once, after both,
    to learn whether the step happened."""

    gated = True

    def __init__(self, params: list[Tensor], states: list[dict], *, centered: bool,
                 momentum: bool, version: int) -> None:
        from ..kernels import triton as tk
        super().__init__(params, states, centered=centered, momentum=momentum,
                         version=version)
        self._tk = tk
        real, sq_real = self.keep
        self.p_like, self.s_like = real[0], sq_real[0]
        self.device = real[0].device
        self.math64 = real[0].dtype == torch.float64
        self.table = tk.Table((self.P, self.V, self.M if centered else self.V,
                               self.B if momentum else self.V), self.numel, real[0].device)

    def first_nonfinite(self, G: array.array) -> int:
        gdev, _ = self.table.upload(G)
        return self.table.first_nonfinite(gdev, self.p_like)  # a checked step's one sync

    def new_stats(self) -> Tensor:
        return torch.empty(self.n, 6, dtype=torch.float64, device=self.device)

    def new_gate(self) -> Tensor:
        """A zeroed int32 flag on this plan's device (shared by the plans of one step)."""
        return torch.zeros(1, dtype=torch.int32, device=self.device)

    def check(self, G: array.array, gate: Tensor) -> None:
        """Queue the inf/NaN check of the gradients; it sets ``gate`` if it finds one."""
        gdev, _ = self.table.upload(G)
        self._tk.check_into(self.table, gdev, self.p_like, gate)

    def step(self, P: array.array, G: array.array, h: Any,
             stats: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> None:
        tk = self._tk
        gdev, hyper = self.table.upload(G, tk.hyper_values(
            h.lr, h.alpha, h.eps, h.weight_decay, h.momentum, h.c,
            None if h.inv_scale == 1.0 else 1.0 / h.inv_scale, h.maximize))
        flags = tk.constexpr_flags(h.centered, h.momentum > 0, h.weight_decay,
                                   h.decoupled_weight_decay, h.nesterov, h.eps_in_sqrt,
                                   h.lr_in_momentum, stats is not None, self.math64)
        tk.launch(self.table, gdev, hyper, self.p_like, self.s_like, flags, stats, gate)
        self.steps.add_(1)


def plan_for(device_type: str) -> Optional[type]:
    """The plan class for params on this device type, or None."""
    return {"cpu": CpuPlan, "cuda": CudaPlan}.get(device_type)


def _real(t: Tensor) -> Tensor:
    """The plain tensor the kernel writes: a DTensor's local shard, complex as real pairs."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        t = to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def _addr(a: array.array) -> int:
    return a.buffer_info()[0]
