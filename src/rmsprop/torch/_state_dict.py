"""The optimizer's state dict: validation before a load, and what a load takes from the file.

As in ``torch.optim``, a loaded state dict brings its options with it (a scheduler's ``lr``,
``momentum`` or ``centered`` of the run that saved it). Options the file does not hold take
the defaults: the rule's options (``eps_in_sqrt``, ``nesterov``...) their
:class:`rmsprop.options.Options` defaults, which are ``torch.optim.RMSprop``'s rule, so a
torch state dict runs torch's rule; how each group runs (:func:`run_keys`: ``fused``, ``nonfinite``,
``state_dtype``, ``stochastic_rounding``, ``seed``) keeps the live group's values, whatever
the file holds.

:func:`slim` writes this class's extra rule options into a state dict only where they
differ from those defaults, and the others not at all, so a state dict of the options torch
has holds exactly torch's keys:
``torch.distributed.checkpoint`` builds its load template from the live optimizer's state
dict, and a template with keys a torch checkpoint lacks could not load it.

:func:`export` gives a codec the say over how its entries appear in a state dict: a quantized
codec writes a sharded (FSDP2) param's codes and scales as DTensors with one row per shard, so
that ``torch.distributed.checkpoint`` saves every rank's own (a plain tensor there counts as
replicated, and one rank's copy would be saved for all).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import Tensor

from ..options import RULE_OPTIONS, Options, validate
from ._codecs import STATE_KEYS, Codec

__all__ = ["run_keys", "check", "restore", "slim", "fill", "coerce_steps", "torch_keys",
           "with_tensor_steps", "export"]

_RULE_DEFAULTS = Options().as_dict()


@functools.cache
def torch_keys() -> frozenset[str]:
    """The option names ``torch.optim.RMSprop`` itself saves in its param groups."""
    names = inspect.signature(torch.optim.RMSprop.__init__).parameters
    return frozenset(names) - {"self", "params"}


def run_keys(cls: Any) -> tuple[str, ...]:
    """The optimizer class's options of how a group runs, not of the rule, that torch's
    optimizer lacks (``fused``, ``nonfinite``, ``state_dtype``, ``stochastic_rounding``,
    ``seed``): never saved (:func:`slim`), and a load keeps the live group's."""
    return tuple(sorted(set(class_defaults(cls)) - torch_keys() - set(_RULE_DEFAULTS)))


def class_defaults(cls: Any) -> dict[str, Any]:
    """The option defaults of the optimizer class's signature, ``lr`` included."""
    sig = inspect.signature(cls.__init__).parameters
    return {k: v.default for k, v in sig.items()
            if k not in ("self", "params", "track_stats")
            and v.default is not inspect.Parameter.empty}


def slim(state_dict: dict[str, Any], cls: type) -> dict[str, Any]:
    """Drop from each saved param group this class's extra options: those of the rule
    where they hold their defaults, and always those of how it runs (``fused``,
    ``nonfinite``, ``state_dtype``...), which a load takes from the live optimizer anyway
    (:func:`fill`)."""
    defaults = {**class_defaults(cls), **_RULE_DEFAULTS}
    ours = set(defaults) - torch_keys()
    for group in state_dict["param_groups"]:
        for key in ours:
            if key in group and (key not in _RULE_DEFAULTS
                                 or _same(group[key], defaults[key])):
                del group[key]
    return state_dict


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    return bool(a == b)


def fill(groups: list[dict], live: dict[str, Any], cls: type) -> None:
    """Give each group the options it lacks: the rule's take their :class:`Options`
    defaults, the others the live optimizer's constructor values (``live``), else the class
    signature's defaults."""
    sig = class_defaults(cls)
    for group in groups:
        for key, value in sig.items():
            if key in group:
                continue
            if key in _RULE_DEFAULTS:
                group[key] = _RULE_DEFAULTS[key]
            else:
                group[key] = live.get(key, value)


def coerce_steps(groups: list[dict], state: Any) -> None:
    """A ``step`` saved as a Python number (older torch versions, or a state dict edited by
    hand) becomes a float32 tensor, as ``torch.optim.RMSprop`` converts it on load: on the
    param's device for capturable and fused groups, else on the CPU."""
    for group in groups:
        on_device = bool(group.get("capturable")) or bool(group.get("fused"))
        for p in group["params"]:
            st = state.get(p)
            if st and "step" in st and not isinstance(st["step"], Tensor):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32,
                                          device=p.device if on_device else None)


def with_tensor_steps(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every ``step`` saved as a number as a float32 CPU tensor (a
    shallow copy; the caller's dict is not changed): torch's load moves tensor steps of
    capturable and fused groups to the param's device, and cannot move a number."""
    state = state_dict["state"]
    if all(not isinstance(e, dict) or isinstance(e.get("step", None), (Tensor, type(None)))
           for e in state.values()):
        return state_dict
    fixed = {pid: ({**e, "step": torch.tensor(float(e["step"]), dtype=torch.float32)}
                   if isinstance(e, dict) and "step" in e and not isinstance(e["step"], Tensor)
                   else e) for pid, e in state.items()}
    return {**state_dict, "state": fixed}


def _label(gi: int, index: int, name: str | None) -> str:
    return repr(name) if name else f"group {gi} index {index}"


def check(groups: list[dict], state_dict: Any, codec_of: Any) -> None:
    """Raise ``ValueError`` naming the first entry of ``state_dict`` that does not fit the
    live param ``groups``: group count, sizes, options, state shapes and dtypes (each state
    tensor checked by its codec, ``codec_of(group, p)``). Changes nothing. With sharded
    (DTensor) params every rank checks its own shards and the ranks of their mesh agree: if
    one refuses, all raise (a rank that loaded alone would leave the replicas apart)."""
    why = _problem(groups, state_dict, codec_of)
    mesh = next((p.device_mesh for g in groups for p in g["params"]
                 if getattr(p, "device_mesh", None) is not None), None)
    if mesh is not None:
        why = _agree(why, mesh)
    if why:
        raise ValueError(why)


def _agree(why: str | None, mesh: Any) -> str | None:
    """The first refusal (by global rank) among the ranks of ``mesh``, ``why`` on a rank that
    refused itself; None when every rank accepts."""
    import torch.distributed as dist

    found: dict[int, str | None] = {dist.get_rank(): why}
    for pg in mesh.get_all_groups():  # every dimension in turn: then all ranks of the mesh
        parts: list[Any] = [None] * dist.get_world_size(pg)
        dist.all_gather_object(parts, found, group=pg)
        found = {r: w for part in parts for r, w in part.items()}
    refused = sorted((r, w) for r, w in found.items() if w)
    if why is not None:
        return why
    return f"rank {refused[0][0]} refused the state dict: {refused[0][1]}" if refused else None


def _problem(groups: list[dict], state_dict: Any, codec_of: Any) -> str | None:
    """:func:`check`'s refusal on this rank, or None. Every entry is checked even after a
    refusal: a codec's check of a sharded entry may be collective, and every rank must make
    the same calls."""
    if not isinstance(state_dict, dict) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        return "not an optimizer state dict: expected keys 'state' and 'param_groups'"
    saved = state_dict["param_groups"]
    if not isinstance(state_dict["state"], dict):
        return "the state dict's 'state' is not a dict keyed by parameter id"
    if not isinstance(saved, (list, tuple)):
        return "the state dict's 'param_groups' is not a list"
    for gi, sg in enumerate(saved):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
            return f"parameter group {gi} of the state dict has no 'params' list"
    if len(groups) != len(saved):
        return (f"loaded state dict has {len(saved)} parameter groups, the optimizer has "
                f"{len(groups)}")
    seen: set = set()
    for sg in saved:
        for pid in sg["params"]:
            try:
                if pid in seen:
                    return (f"parameter id {pid!r} appears more than once in the state "
                            "dict's param groups")
                seen.add(pid)
            except TypeError:
                return f"parameter id {pid!r} in the state dict is not a key"
    first: str | None = None
    for gi, (g, sg) in enumerate(zip(groups, saved)):
        if len(g["params"]) != len(sg["params"]):
            return (f"parameter group {gi} has {len(g['params'])} params, the loaded one has "
                    f"{len(sg['params'])}")
        rule = {k: sg[k] for k in RULE_OPTIONS if k in sg}
        try:
            validate(rule, warn=False)  # warnings were given when the options were chosen
        except ValueError as e:
            return f"parameter group {gi} of the state dict: {e}"
        for key, allowed in _TORCH_RUN_KEYS.items():  # torch's own, which a load takes
            if key in sg and not any(sg[key] is a for a in allowed):
                return (f"parameter group {gi} of the state dict: {key} must be "
                        f"{' or '.join(map(repr, allowed))}, got {sg[key]!r}")
        names = g.get("param_names") or [None] * len(g["params"])
        for index, (p, pid, name) in enumerate(zip(g["params"], sg["params"], names)):
            entry = state_dict["state"].get(pid)
            if entry is None:
                continue
            label = _label(gi, index, name)
            if not isinstance(entry, dict):
                first = first or f"state of parameter {label} is not a dict"
                continue
            meta = next((k for k, v in entry.items()
                         if isinstance(v, Tensor) and v.device.type == "meta"), None)
            if meta is not None:
                first = first or f"state {meta!r} of parameter {label} is a meta tensor (no data)"
                continue
            codec: Codec = codec_of(g, p)
            for key in STATE_KEYS:
                try:
                    why = codec.check(key, entry, p)
                except (RuntimeError, NotImplementedError) as e:  # e.g. meta tensors
                    why = f"cannot be read ({type(e).__name__}: {e})"
                if why:
                    first = first or f"state {key!r} of parameter {label} {why}"
            if entry:  # what every step reads
                for need in ("step", codec.names("square_avg")[0]):
                    if need not in entry:
                        first = first or f"state of parameter {label} lacks {need!r}"
            why = _step_problem(entry.get("step"))
            if why:
                first = first or f"state 'step' of parameter {label} {why}"
    return first


#: The options of how torch's own optimizer runs that a load takes from the file (as torch
#: does), with the values they may hold. Ours (``fused``, ``nonfinite``, ``state_dtype``,
#: ``stochastic_rounding``, ``seed``) keep the live groups' values whatever the file says.
_TORCH_RUN_KEYS = {"foreach": (None, True, False), "capturable": (True, False),
                   "differentiable": (True, False)}


def _step_problem(step: Any) -> str | None:
    """Why a saved ``step`` cannot be a step count (None when it can): a finite number
    >= 0, or a one-element tensor holding one."""
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (Tensor, int, float)) \
            or isinstance(step, Tensor) and step.numel() != 1:
        return "is not a number"
    try:
        value = float(step)
    except (RuntimeError, NotImplementedError, ValueError):
        return "cannot be read as a number"
    if not math.isfinite(value) or value < 0:
        return f"is {value}: a count of steps taken must be finite and >= 0"
    return None


def restore(groups: list[dict], state: Any, state_dict: dict[str, Any],
            codec_of: Any) -> None:
    """After ``torch.optim.Optimizer.load_state_dict`` (which casts floating state to the
    param's dtype): rebuild each param's state tensors from the file's own tensors through
    its codec (float32 state of 16-bit params stays float32; a quantized codec quantizes a
    full-precision file)."""
    saved = state_dict["state"]
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [(g, p) for g in groups for p in g["params"]]
    for pid, (group, p) in zip(ids, params):
        entry = saved.get(pid)
        if entry is None:
            continue
        codec: Codec = codec_of(group, p)
        st = state[p]
        for key in STATE_KEYS:
            for name in codec.names(key):
                st.pop(name, None)
            st.update(codec.load(key, entry, p))


def export(groups: list[dict], state_dict: dict[str, Any], codec_of: Any) -> dict[str, Any]:
    """``state_dict`` (``torch.optim.Optimizer.state_dict()``'s, whose entries are the live
    state dicts) with each param's entry as its codec exports it (a codec's optional
    ``export(entry, p)``, which returns a new dict or the entry itself). The live state is not
    changed; without a codec that exports, ``state_dict`` is returned as it is."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [(g, p) for g in groups for p in g["params"]]
    state = state_dict["state"]
    new_state = dict(state)
    changed = False
    for pid, (group, p) in zip(ids, params):
        entry = state.get(pid)
        export_ = getattr(codec_of(group, p), "export", None)
        if entry is None or export_ is None:
            continue
        out = export_(entry, p)
        if out is not entry:
            new_state[pid] = out
            changed = True
    return {**state_dict, "state": new_state} if changed else state_dict
