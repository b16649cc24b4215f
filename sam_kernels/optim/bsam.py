"""bSAM, the Bayesian SAM of Moellenhoff and Khan ("SAM as an Optimal Relaxation of Bayes", ICLR 2023,
arXiv 2210.01620, Algorithm 1; official code: team-approx-bayes/bayesian-sam, ``optim.py``,
``build_bsam_optimizer``): an Adam-like optimizer over a diagonal Gaussian posterior ``N(w, 1 / (N s))``
with mean ``w`` and per-element precision ``s``. One step, with ``N`` the data size, ``delta`` the prior
precision (weight decay), ``gamma`` the damping:

    w~ = w + z / sqrt(N s),  z ~ N(0, I)         sample, before the first forward  (sample_noise)
    g  = grad L(w~)                             first backward
    e  = rho * g / s                            ascent from the mean w             (first_step)
    g_e = grad L(w + e)                         second backward
    m  = beta1 m + (1 - beta1) (g_e + delta w)                                     (second_step)
    s  = beta2 s + (1 - beta2) (sqrt(s) |g| + delta + gamma)
    w  = w - lr * m / s

NOTE (noise): ``z`` is the noise contract of ``backends/common.py`` (``ops.gaussian_noise_``): Philox keyed
by the seed, counter (element, global tensor position, step), so the same seed and step give the same
noise bit for bit on every backend, and a resumed run draws exactly the noise the uninterrupted run would.

NOTE (restores): both the noise and the ascent are undone exactly: ``sample_noise`` backs up w before it
adds the noise, ``first_step`` restores w from that backup before the ascent, and ``second_step``
restores it again before the update, so the update reads the mean w bit for bit (a published PyTorch
port leaves the noise and the ascent in the weights it updates).

NOTE (not on the engine): ``sam.SAM``'s policies decide an ascent after the first backward and hand the
descent to a torch.optim base optimizer (or its fused SGD/Adam step). bSAM needs a pass before the first
forward (the sample), an ascent scaled elementwise by optimizer state (``rho * g / s``, not the
normalized gradient ``perturb_`` takes) and an update of its own that reads the first gradient too
(``sqrt(s) |g|``), so it is a standalone ``torch.optim.Optimizer`` over the op layer (``gaussian_noise_``,
``restore_``, ``grad_norm``) and torch's multi-tensor ``_foreach`` ops.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .. import backends, ops
from ..backends.common import SUPPORTED_DTYPE_NAMES, SUPPORTED_DTYPES, first_overlap
from .base import run_step_hooks
from .bn import freeze_bn_stats
from .checks import check_non_negative, check_positive

#: The state entries of each parameter: the first moment ``m`` (torch.optim.Adam's key) and the precision.
STATE_KEYS = ("exp_avg", "precision")


def _check_betas(betas: Any, where: str = "betas") -> None:
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0
                       for b in betas)):
        raise ValueError(f"{where}: expected two numbers in [0, 1) (beta1 of the momentum, beta2 of the "
                         f"precision), got {betas!r}")


def _check_group(group: dict, index: int) -> None:
    where = f"param_groups[{index}]"
    check_non_negative(f"{where}['lr']", group["lr"])
    _check_betas(group["betas"], f"{where}['betas']")
    check_non_negative(f"{where}['rho']", group["rho"])
    check_non_negative(f"{where}['weight_decay']", group["weight_decay"])
    check_non_negative(f"{where}['damping']", group["damping"])
    for position, param in enumerate(group["params"]):
        if param.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{where}['params'][{position}]: dtype {param.dtype} is not supported; use "
                             f"{SUPPORTED_DTYPE_NAMES}")


class BayesianSAM(torch.optim.Optimizer):
    """bSAM (module docstring): SAM's ascent and an Adam-like update over a Gaussian posterior.

    ``num_data``: ``N``, the training set's size (the posterior's variance is ``1 / (N s)``; the official
    code scales it by its augmentation factor, ``--dafactor``). Per param group: ``lr`` (alpha), ``betas``
    (beta1 of the momentum, beta2 of the precision), ``rho``, ``weight_decay`` (delta, the prior precision
    over ``N``: the official code's ``priorprec / N``) and ``damping`` (gamma). ``init_precision``: ``s``'s
    initial value (the official ``--custominit``). ``seed`` keys the noise (default
    ``torch.initial_seed()``), ``backend`` picks the op backend (None/"auto", "native", "triton", "torch").
    The defaults are the official CIFAR-10 run's (lr 0.5, rho 0.01, betas (0.9, 0.999), damping 0.1,
    init_precision 1), with ``weight_decay`` 0.

    Calling styles: ``step(closure)`` (torch.optim's convention: the closure zeroes the gradients, computes
    the loss, calls backward and returns the loss; it runs at the sample and at the ascent; the loss at the
    sample is returned), or ``sample_noise()``, forward and backward, ``first_step()``, forward and
    backward, ``second_step()``. A non-finite gradient in either pass skips the update: the weights are
    the pre-step weights bit for bit and the state is unchanged (the step still counts, for the noise).
    ``state_dict`` adds ``"bsam": {"seed", "step"}``; a resumed run equals the uninterrupted one.
    """

    def __init__(self, params: Iterable, *, num_data: float, lr: float = 0.5,
                 betas: tuple[float, float] = (0.9, 0.999), rho: float = 0.01, weight_decay: float = 0.0,
                 damping: float = 0.1, init_precision: float = 1.0, seed: int | None = None,
                 backend: str | None = None) -> None:
        check_positive("num_data", num_data)
        check_positive("init_precision", init_precision)
        check_non_negative("lr", lr)
        _check_betas(betas)
        check_non_negative("rho", rho)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("damping", damping)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**64):
            raise ValueError(f"seed: must be an int in [0, 2**64), got {seed!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "rho": rho, "weight_decay": weight_decay,
                    "damping": damping}
        super().__init__(params, defaults)
        self.num_data = float(num_data)
        self.init_precision = float(init_precision)
        self.seed = torch.initial_seed() if seed is None else seed  # NOTE: consumes no random numbers
        self.backend = backend
        #: bSAM iterations taken (skipped ones included): the noise's RNG step.
        self.step_count = 0
        #: Where the pending step stands: None (weights at w), "noisy" (at the sample) or "ascended".
        self._phase: str | None = None
        #: Each parameter's backup of w, allocated once (not state: w itself outside a step).
        self._backups: dict[torch.Tensor, torch.Tensor] = {}
        #: What first_step keeps for second_step: per group, the parameters with a first gradient, their
        #: next precision, and the first gradients' non-finite flag (a device tensor).
        self._pending: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], torch.Tensor] | None = None
        params = self._params()
        if params:
            backends.resolve(params[0].device, backend)
        pair = first_overlap(params)
        if pair is not None:
            raise ValueError(f"params: parameter {pair[1]} shares memory with parameter {pair[0]}; pass "
                             "each parameter once")

    # ------------------------------------------------------------------ torch.optim conventions

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``, the group's options checked (named by the group)."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (``exp_avg``, ``precision`` per parameter) plus ``"bsam": {"seed",
        "step"}``."""
        self._check_not_in_step("state_dict()")
        state = super().state_dict()
        state["bsam"] = {"seed": self.seed, "step": self.step_count}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; the seed and the step come back too, so the noise continues as
        in the uninterrupted run. Checked before anything changes."""
        self._check_not_in_step("load_state_dict()")
        state_dict = dict(state_dict)
        entry = state_dict.pop("bsam", None)
        seed, step = self.seed, self.step_count
        if entry is not None:
            if not isinstance(entry, dict) or set(entry) != {"seed", "step"}:
                raise ValueError(f"state_dict['bsam']: expected {{'seed': int, 'step': int}}, got {entry!r}")
            for name, bits in (("seed", 64), ("step", 63)):
                value = entry[name]
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
                    raise ValueError(f"state_dict['bsam']['{name}']: must be an int in [0, 2**{bits}), "
                                     f"got {value!r}")
            seed, step = entry["seed"], entry["step"]
        for index, group in enumerate(state_dict.get("param_groups", [])):
            _check_group({**group, "params": []}, index)
        super().load_state_dict(state_dict)
        self.seed, self.step_count = seed, step

    def _check_not_in_step(self, what: str) -> None:
        if self._phase is not None:
            raise RuntimeError(f"{what}: the weights are moved (between sample_noise() and second_step()); "
                               "call it after second_step()")

    def _params(self) -> list[torch.Tensor]:  # every parameter, in the param groups' order
        return [param for group in self.param_groups for param in group["params"]]

    # ------------------------------------------------------------------------- training loops

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One bSAM step driven by ``closure`` (torch.optim's convention, see the class docstring);
        returns the loss at the sample. If the closure raises, the weights are put back to w."""
        if closure is None:
            raise TypeError("step(): bSAM needs a closure (it evaluates the loss twice); or call "
                            "sample_noise(), first_step() and second_step() around your own passes")
        self.sample_noise()
        with self._restoring_on_error(), torch.enable_grad():
            loss = closure()
        self.first_step()
        with self._restoring_on_error(), torch.enable_grad(), freeze_bn_stats():
            closure()
        self.second_step()
        return loss

    # NOTE (step hooks): torch.optim wraps ``step`` with its hook runner unless marked ``hooked``; the hooks
    # run around the whole step instead (sample_noise runs the pre-hooks, second_step the post-hooks).
    step.hooked = True

    @torch.no_grad()
    def sample_noise(self) -> None:
        """Before the first forward: back up w, then move to the sample ``w + z / sqrt(N s)``."""
        if self._phase is not None:
            raise RuntimeError("sample_noise(): a step is under way; finish it with first_step() and "
                               "second_step()")
        run_step_hooks(self, "pre")
        params, precisions, backups = [], [], []
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["precision"] = torch.full_like(param, self.init_precision,
                                                         memory_format=torch.preserve_format)
                params.append(param)
                precisions.append(state["precision"])
                backups.append(self._backup(param))
        if params:
            ops.gaussian_noise_(params, backups, precisions, factor=self.num_data, precision=True,
                                seed=self.seed, step=self.step_count, backend=self.backend)
        self._phase = "noisy"

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """After the first backward (gradients ``g`` at the sample): restore w, keep the next precision
        ``beta2 s + (1 - beta2) (sqrt(s) |g| + delta + gamma)`` for the update, ascend to
        ``w + rho * g / s``."""
        if self._phase != "noisy":
            raise RuntimeError("first_step(): call sample_noise() before the first forward (bSAM's first "
                               "gradient is taken at a sample of the posterior)")
        with self._restoring_on_error():
            ops.restore_(self._params(), [self._backups[p] for p in self._params()], backend=self.backend)
            active, next_precisions, flags, ascents = [], [], [], []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
                precisions = [self.state[p]["precision"] for p in params]
                active.append(params)
                if not params:
                    next_precisions.append([])
                    continue
                flags.append(ops.grad_norm(params, grads, backend=self.backend)[1])
                beta2 = group["betas"][1]
                # s_next = beta2 s + (1 - beta2) (sqrt(s) |g| + delta + gamma)
                spread = torch._foreach_sqrt(precisions)
                torch._foreach_mul_(spread, torch._foreach_abs(grads))
                torch._foreach_add_(spread, group["weight_decay"] + group["damping"])
                following = torch._foreach_mul(precisions, beta2)
                torch._foreach_add_(following, spread, alpha=1.0 - beta2)
                next_precisions.append(following)
                ascents.append((params, grads, precisions, group["rho"]))
            device = self._params()[0].device if self._params() else torch.device("cpu")
            nonfinite = torch.stack(flags).amax() if flags else torch.zeros((), device=device)
            # NOTE (host sync): a non-finite first gradient must not reach the weights of the second pass
            # (its forward would put NaN into BatchNorm's statistics), and _foreach ops cannot select on a
            # device flag; the flag is read here, the step's second host read (see second_step).
            if not nonfinite.item():
                for params, grads, precisions, rho in ascents:  # the ascent from the mean: w + rho g / s
                    torch._foreach_addcdiv_(params, grads, precisions, value=rho)
            self._pending = (active, next_precisions, nonfinite)
            self._phase = "ascended"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """After the second backward (gradients ``g_e`` at w + e): restore w exactly, then the update
        (skipped, with w and the state unchanged, on a non-finite gradient in either pass)."""
        if self._phase != "ascended":
            raise RuntimeError("second_step(): call first_step() after the first backward")
        active, next_precisions, nonfinite = self._pending
        params = self._params()
        ops.restore_(params, [self._backups[p] for p in params], backend=self.backend)
        flags = [nonfinite]
        updates = []
        for group, group_params, following in zip(self.param_groups, active, next_precisions, strict=True):
            pairs = [(p, s) for p, s in zip(group_params, following, strict=True) if p.grad is not None]
            if pairs:
                updates.append((group, pairs))
                flags.append(ops.grad_norm([p for p, _ in pairs], backend=self.backend)[1])
        self._pending, self._phase = None, None
        self.step_count += 1
        # NOTE (host sync): the update is written with torch's _foreach ops, which cannot skip on a device
        # flag (a select would turn the skipped step's NaNs into the state), so the flag is read here (and
        # the first pass's in first_step).
        if not bool(torch.stack(flags).amax() != 0):
            for group, pairs in updates:
                self._update(group, [p for p, _ in pairs], [s for _, s in pairs])
        run_step_hooks(self, "post")
        if zero_grad:
            self.zero_grad()

    def _update(self, group: dict, params: list[torch.Tensor], next_precisions: list[torch.Tensor]) -> None:
        """m = beta1 m + (1 - beta1) (g_e + delta w); s = s_next; w = w - lr * m / s."""
        beta1 = group["betas"][0]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        precisions = [self.state[p]["precision"] for p in params]
        direction = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, direction, alpha=1.0 - beta1)
        torch._foreach_copy_(precisions, next_precisions)
        torch._foreach_addcdiv_(params, exp_avgs, precisions, value=-group["lr"])

    # ------------------------------------------------------------------------------ internals

    def _backup(self, param: torch.Tensor) -> torch.Tensor:
        backup = self._backups.get(param)
        if backup is None or backup.shape != param.shape or backup.dtype != param.dtype:
            backup = torch.empty_like(param, memory_format=torch.preserve_format)
            self._backups[param] = backup
        return backup

    def abandon_step(self) -> None:
        """Put the weights back to w and forget the pending step (the state is untouched)."""
        if self._phase is not None:
            params = self._params()
            with torch.no_grad():
                ops.restore_(params, [self._backups[p] for p in params], backend=self.backend)
            self._pending, self._phase = None, None

    @contextlib.contextmanager
    def _restoring_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.abandon_step()
            raise

