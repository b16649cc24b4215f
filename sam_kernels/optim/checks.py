"""The optimizers' argument and state checks: every error names the argument (or the param group, state
entry) at fault and says how to fix it. Run when the optimizer is built, a group added or a state dict
loaded, never per step."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..backends.common import SUPPORTED_DTYPE_NAMES, SUPPORTED_DTYPES, first_overlap
from ..distributed import local_tensor

#: SAM options that may differ between param groups (the rest are optimizer-wide): keyword name -> key in
#: the param groups. NOTE (option names): the param groups are the base optimizer's own dicts, so SAM's
#: keys carry a prefix no torch.optim optimizer uses (Adadelta has a ``rho`` of its own). A group dict given
#: by the user may spell them without the prefix when the base optimizer has no option of that name.
GROUP_OPTIONS = {"rho": "sam_rho", "adaptive": "sam_adaptive", "adaptive_eta": "sam_adaptive_eta"}

# ------------------------------------------------------------------------------------ validation


def check_positive(name: str, value: Any) -> None:
    """``value`` is a positive finite real number (not a bool, not a tensor)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")


def check_probability(name: str, value: Any) -> None:
    """``value`` is a real number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name}: must be in (0, 1], got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    """``value`` is a non-negative finite real number (not a bool, not a tensor)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value < 0):
        raise ValueError(f"{name}: must be a non-negative finite number, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: must be True or False, got {value!r}")


def check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name}: must be None, True or False, got {value!r}")


def check_engine_options(rho: Any, adaptive: Any, adaptive_eta: Any, sam_eps: Any, fused: Any, foreach: Any,
                         capturable: Any, seed: Any) -> None:
    """The optimizer-wide arguments every SAM-family optimizer takes (``sam.SAM``)."""
    check_non_negative("rho", rho)
    check_bool("adaptive", adaptive)
    check_non_negative("adaptive_eta", adaptive_eta)
    check_positive("sam_eps", sam_eps)
    check_optional_bool("fused", fused)
    check_optional_bool("foreach", foreach)
    check_bool("capturable", capturable)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed: must be an int in [0, 2**64), got {seed!r}")


def check_group(group: dict, index: int) -> None:
    """The SAM options and the parameters of ``param_groups[index]``."""
    where = f"param_groups[{index}]"
    check_non_negative(f"{where}['sam_rho']", group["sam_rho"])
    check_bool(f"{where}['sam_adaptive']", group["sam_adaptive"])
    check_non_negative(f"{where}['sam_adaptive_eta']", group["sam_adaptive_eta"])
    if group.get("maximize", False):
        raise ValueError(f"{where}['maximize']=True: not supported; SAM's ascent direction assumes a loss "
                         "to minimize, so minimize the negated objective instead")
    for position, param in enumerate(group["params"]):
        if param.is_complex():
            raise ValueError(f"{where}['params'][{position}]: complex parameters are not supported; "
                             "view them as real with torch.view_as_real")
        if param.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{where}['params'][{position}]: dtype {param.dtype} is not supported; "
                             f"use {SUPPORTED_DTYPE_NAMES}")


def adopt_group_options(group: dict, base_defaults: dict, defaults: dict) -> None:
    """Move SAM's options of a user's group dict to their prefixed keys (see GROUP_OPTIONS) and fill the
    missing ones from ``defaults``."""
    for name, key in GROUP_OPTIONS.items():
        if name in group and name not in base_defaults and key not in group:
            group[key] = group.pop(name)
        group.setdefault(key, defaults[key])


def check_distinct(groups: list[dict]) -> None:
    """No parameter appears twice and no two parameters share memory (the kernels would race on it).

    torch.optim refuses a parameter in two groups but only warns about one twice in a group.
    """
    params, names = [], []
    for group_index, group in enumerate(groups):
        for position, param in enumerate(group["params"]):
            params.append(local_tensor(param))
            names.append(f"param_groups[{group_index}]['params'][{position}]")
    pair = first_overlap(params)
    if pair is not None:
        first, second = names[pair[0]], names[pair[1]]
        what = "is the same tensor as" if params[pair[0]] is params[pair[1]] else "shares memory with"
        raise ValueError(f"{second} {what} {first}; pass each parameter once (e.g. "
                         "list(dict.fromkeys(params)) drops repeats) and give tied weights as one "
                         "parameter")


def checked_sam_entry(entry: Any, seed: int, step: int) -> tuple[int, int, dict | None, dict | None]:
    """(seed, step, schedule state, variant state) of a state dict's ``"sam"`` entry (the current seed
    and step and no other state when it has none), checked."""
    if entry is None:
        return seed, step, None, None
    if (not isinstance(entry, dict) or not {"seed", "step"} <= set(entry)
            or not set(entry) <= {"seed", "step", "schedule", "variant"}
            or not all(isinstance(entry.get(key, {}), dict) for key in ("schedule", "variant"))):
        raise ValueError("state_dict['sam']: expected {'seed': int, 'step': int} (and dicts 'schedule' "
                         f"and 'variant'), got {entry!r}")
    for name, bits in (("seed", 64), ("step", 63)):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**bits:
            raise ValueError(f"state_dict['sam']['{name}']: must be an int in [0, 2**{bits}), got "
                             f"{value!r}")
    return int(entry["seed"]), int(entry["step"]), entry.get("schedule"), entry.get("variant")


def check_base_options(base: torch.optim.Optimizer, group: dict, index: int, previous: dict) -> None:
    """A loaded group has every option the group it replaces had (``previous``: those the base
    optimizer's step reads), with values the base optimizer's constructor accepts."""
    where = f"state_dict['param_groups'][{index}]"
    missing = [name for name in previous if name not in group and name not in ("params", "param_names")]
    if missing:
        raise ValueError(f"{where}: lacks {', '.join(map(repr, missing))} of {type(base).__name__}; the "
                         "state dict comes from another optimizer class")
    numbers_only = {name: group[name] for name in base.defaults if name in group
                    and isinstance(group[name], (int, float, tuple)) and not isinstance(group[name], bool)}
    try:
        # NOTE: torch.optim checks its hyper-parameters in the constructor only; building a throwaway
        # optimizer over one small matrix (Muon takes matrices only) runs those checks on the loaded values.
        type(base)([torch.zeros(2, 2, requires_grad=True)], **numbers_only)
    except TypeError:
        return  # a constructor with another signature: its own step will check
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


#: State entries that torch.optim optimizers keep with their parameter's shape.
_PARAM_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg",
                       "acc_delta", "sum", "ax", "prev", "step_size", "exp_inf", "grad_avg", "looksam_gv")


def check_state_shapes(groups: list[dict], state: dict) -> None:
    for group_index, group in enumerate(groups):
        for position, param in enumerate(group["params"]):
            for key, value in state.get(param, {}).items():
                if (key in _PARAM_SHAPED_STATE and isinstance(value, torch.Tensor)
                        and value.shape != param.shape):
                    raise ValueError(f"state_dict['state'] of param_groups[{group_index}]['params']"
                                     f"[{position}]: '{key}' has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(param.shape)}; the state dict belongs to another "
                                     "model")
