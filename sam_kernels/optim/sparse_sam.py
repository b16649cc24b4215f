"""Sparse SAM (Mi, Shen, Ren, Zhou, Sun, Ji, Tao, NeurIPS 2022, arXiv 2210.05177; the authors' code
Mi-Peng/Sparse-Sharpness-Aware-Minimization, ``solver/sam.py``: ``SSAMF`` and ``SSAMD``): SAM's perturbation
restricted to a binary mask m that keeps a fraction ``1 - sparsity`` of the weights,
e = rho (m * g) / ||m * g||, the mask chosen again every ``update_every`` steps by a criterion:

* ``"fisher"`` (the paper's SSAM-F): the weights with the largest diagonal empirical Fisher information,
  estimated as the sum of the squared first-pass gradients of the last ``fisher_batches`` steps up to the
  refresh; a global top-k over every parameter.
* ``"dynamic"`` (SSAM-D): drop and grow. From the current mask (a random one at the first refresh), the
  ``D = min(floor(K * drop_rate_t), N - K)`` live weights with the smallest drop score leave the mask and
  the ``D`` dead weights with the largest grow score join it (``drop_by``/``grow_by``: ``"gradient"``
  |g|, ``"weight"`` |w|, ``"random"``); ``drop_rate_t`` is ``drop_rate`` or, with ``total_steps``, its
  cosine decay ``drop_rate (1 + cos(pi min(t, total) / total)) / 2``.

The class is ``SparseSAM``: the paper and its code call the method SSAM, which in this package is Stable
SAM (``renormalize=True``). Everything else is the engine's (docs/algorithms.md, "Sparse SAM").

NOTE (mask storage): the mask is optimizer state, ``state[p]["sparse_sam_mask"]``, 1 bit per element
(sparse_masks.py). A step unpacks the planned parameters' masks into a bool temporary (1 byte per element,
plus a 1-byte shift temporary) and the masked gradient, freed after the ascent. torch's
``Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype, so
``SparseSAM.load_state_dict`` puts the saved uint8 tensors back (exact: the bytes are integers in [0, 255],
which every floating dtype holds exactly).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .ema_direction import DirectionPolicy, check_unit, refuse_options, true_grads
from .policy import StepContext, policy_options
from .sam import SAM
from .sparse_masks import (
    CRITERIA,
    FISHER_KEY,
    MASK_KEY,
    STREAM_DROP,
    STREAM_GROW,
    STREAM_INITIAL,
    _check_int,
    _check_score,
    kept_count,
    pack_bits,
    param_name,
    stream_seed,
    top_k_mask,
    unpack_bits,
)


class SparseSAMPolicy(DirectionPolicy):
    """Sparse SAM's decisions: the ascent along ``m * g``; the mask refreshed (and the Fisher accumulator
    fed) at the ascent, committed after the step is taken.

    NOTE (commit on success): a refresh or an accumulation is computed at the ascent (the refresh's mask
    perturbs that very step) and written to the optimizer state in ``after_step`` only if the step was
    taken; a skipped refresh stays due and runs at the next step. Knowing whether it was taken reads the
    step's non-finite flag on the host on the fused path: once on each step that refreshes or accumulates
    (``fisher_batches`` of every ``update_every`` steps), never on the others.
    """

    name = "SparseSAM"
    #: NOTE: the mask refresh and the Fisher sum follow each step's whole first gradient, so micro-batches
    #: with their own ascents (``SAM.accumulate``, where the engine has it) do not apply.
    accumulates = False

    def __init__(self, sparsity: float = 0.5, update_every: int = 2000, criterion: str = "fisher", *,
                 fisher_batches: int | None = None, drop_rate: float | None = None,
                 drop_by: str | None = None, grow_by: str | None = None, total_steps: int | None = None,
                 masked_norm: bool = True,
                 **options: Any) -> None:
        self.sparsity = check_unit("sparsity", sparsity, low_open=False, high_open=True)
        self.update_every = _check_int("update_every", update_every, 1, "steps between mask refreshes")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion: must be 'fisher' (SSAM-F) or 'dynamic' (SSAM-D), got {criterion!r}")
        self.criterion = criterion
        other = {"fisher": {"drop_rate": drop_rate, "drop_by": drop_by, "grow_by": grow_by,
                            "total_steps": total_steps},
                 "dynamic": {"fisher_batches": fisher_batches}}[criterion]
        for name, value in other.items():
            if value is not None:
                raise ValueError(f"{name}: an option of the other criterion; criterion={criterion!r} does "
                                 "not take it")
        if fisher_batches is None:
            fisher_batches = min(8, self.update_every)
        self.fisher_batches = _check_int("fisher_batches", fisher_batches, 1,
                                         "steps whose squared gradients feed a refresh")
        if criterion == "fisher" and self.fisher_batches > self.update_every:
            raise ValueError(f"fisher_batches: at most update_every ({update_every}) steps feed a refresh, "
                             f"got {fisher_batches!r}")
        self.drop_rate = check_unit("drop_rate", 0.5 if drop_rate is None else drop_rate, low_open=False,
                                    high_open=False)
        self.drop_by = _check_score("drop_by", "gradient" if drop_by is None else drop_by)
        self.grow_by = _check_score("grow_by", "random" if grow_by is None else grow_by)
        self.total_steps = None if total_steps is None else _check_int(
            "total_steps", total_steps, 1, "the steps over which drop_rate decays")
        if not isinstance(masked_norm, bool):
            raise TypeError(f"masked_norm: must be True or False, got {masked_norm!r}")
        self.masked_norm = masked_norm
        super().__init__(**options)
        #: The first step at which the mask is chosen again (a refresh is due from it on).
        self.next_refresh = 0
        #: What the ascent computed, committed by ``after_step`` when the step is taken.
        self._pending: dict | None = None

    # ------------------------------------------------------------------------------- the ascent

    def ascent_direction(self, context: StepContext) -> tuple[list, tuple | None]:
        plan = context.plan
        if plan.sharded:
            raise NotImplementedError("SparseSAM: FSDP2 (DTensor) parameters are not supported; the "
                                      "mask's global top-k would need every rank's scores")
        step, grads = context.step, true_grads(context)
        refresh = step >= self.next_refresh
        accumulate = self.criterion == "fisher" and step > self.next_refresh - self.fisher_batches
        self._pending = None  # NOTE: an ascent abandoned before its descent left one behind
        pending: dict[str, Any] = {"step": step, "refresh": refresh}
        fisher = None
        if accumulate:
            # NOTE (passes): g^2 and the running sum, two multi-tensor ops over the planned tensors.
            squares = torch._foreach_mul(grads, grads)
            held = [context.state[p].get(FISHER_KEY) if p in context.state else None for p in plan.params]
            fisher = [s if h is None else h + s for h, s in zip(held, squares, strict=True)]
            pending["fisher"] = (plan.params, fisher)
        if refresh:
            masks, pending["masks"] = self._refreshed(context, grads, fisher)
        else:
            masks = self._stored_masks(context)
        directions = torch._foreach_mul(grads, masks)
        self._pending = pending
        return directions, None if self.masked_norm else context.norm(grads)

    def _stored_masks(self, context: StepContext) -> list[torch.Tensor]:
        """The planned parameters' masks as bool tensors of their shapes, unpacked together (one
        concatenation, one unpack; a parameter without a mask yet is not perturbed).

        NOTE (per-tensor lookups): the masks are state entries, so they are looked up per parameter on
        the host, and the unpacked buffer is cut into views per parameter (no kernel), once per step."""
        plan, state = context.plan, context.state
        packed = []
        for param, local in zip(plan.params, plan.local, strict=True):
            mask = state[param].get(MASK_KEY) if param in state else None
            size = -(-local.numel() // 8)
            if mask is None:
                mask = torch.zeros(size, dtype=torch.uint8, device=local.device)
            elif mask.dtype != torch.uint8 or mask.numel() != size or mask.device != local.device:
                raise ValueError(f"optimizer.state of {param_name(context.param_groups, param)}: "
                                 f"'{MASK_KEY}' must be a uint8 tensor of {size} bytes on {local.device}, "
                                 f"got {mask.dtype} of {mask.numel()} on {mask.device}; load checkpoints "
                                 "with SparseSAM.load_state_dict")
            packed.append(mask)
        bits = unpack_bits(torch.cat(packed)) if packed else None
        masks, offset = [], 0
        for local, mask in zip(plan.local, packed, strict=True):
            masks.append(bits[offset:offset + local.numel()].view(local.shape))
            offset += 8 * mask.numel()
        return masks

    def _refreshed(self, context: StepContext, grads: list, fisher: list | None) -> tuple[list, list]:
        """(the planned parameters' new masks as bool tensors, (params, packed masks) of every planned
        parameter to store): the criterion's global top-k over every parameter of the optimizer.

        NOTE (refresh cost): on refresh steps only, so per-tensor loops are fine here: the scores of all N
        weights are concatenated (N fp32, transient) and the new mask is packed tensor by tensor."""
        plan, state = context.plan, context.state
        every = [p for group in context.param_groups for p in group["params"]]
        planned = {id(p): i for i, p in enumerate(plan.params)}
        sizes = [p.numel() for p in every]
        total = sum(sizes)
        kept = kept_count(total, self.sparsity)
        device = plan.device

        def flat(values) -> torch.Tensor:
            return torch.cat([v.reshape(-1).float() for v in values]) if values else torch.zeros(0)

        if self.criterion == "fisher":
            held = [state[p].get(FISHER_KEY) if p in state else None for p in every]
            scores = [fisher[planned[id(p)]] if id(p) in planned else
                      (h if h is not None else torch.zeros(p.shape, device=device))
                      for p, h in zip(every, held, strict=True)]
            new = top_k_mask(flat(scores).to(device), kept)
        else:
            new = self._dropped_and_grown(context, grads, every, planned, total, kept)
        masks, offset = [], 0
        packed: list = []
        for param, size in zip(every, sizes, strict=True):
            bits = new[offset:offset + size]
            if id(param) in planned:
                index = planned[id(param)]
                masks.append((index, bits.view(plan.local[index].shape)))
                packed.append((param, pack_bits(bits)))
            offset += size
        masks.sort(key=lambda item: item[0])
        return [mask for _, mask in masks], packed

    def _dropped_and_grown(self, context: StepContext, grads: list, every: list, planned: dict, total: int,
                           kept: int) -> torch.Tensor:
        """The dynamic criterion's new mask (flat bool over ``every``): the current one (random at the
        first refresh) with ``D`` of its weights dropped and ``D`` others grown."""
        state, device = context.state, context.plan.device
        stored = [state[p].get(MASK_KEY) if p in state else None for p in every]
        if all(mask is None for mask in stored):
            alive = top_k_mask(self._uniform(context, STREAM_INITIAL, total, device), kept)
        else:
            # NOTE: a parameter without a mask (added since, or never stepped) counts as all dead.
            alive = torch.cat([unpack_bits(m.to(device))[:p.numel()] if m is not None else
                               torch.zeros(p.numel(), dtype=torch.bool, device=device)
                               for p, m in zip(every, stored, strict=True)])
        rate = self.drop_rate
        if self.total_steps is not None:
            rate = rate * (1 + math.cos(math.pi * min(context.step, self.total_steps) / self.total_steps)) / 2
        dropped = min(math.floor(kept * rate), total - kept)
        minus_inf = torch.tensor(float("-inf"), device=device)
        drop_scores = self._scores(context, self.drop_by, STREAM_DROP, grads, every, planned, total)
        survivors = top_k_mask(torch.where(alive, drop_scores, minus_inf), kept - dropped)
        grow_scores = self._scores(context, self.grow_by, STREAM_GROW, grads, every, planned, total)
        grown = top_k_mask(torch.where(alive | survivors, minus_inf, grow_scores), dropped)
        return survivors | grown

    def _scores(self, context: StepContext, kind: str, stream: int, grads: list, every: list, planned: dict,
                total: int) -> torch.Tensor:
        """A criterion's scores of every weight, flat fp32: |g| (0 without a gradient), |w| or uniform."""
        device = context.plan.device
        if kind == "random":
            return self._uniform(context, stream, total, device)
        if kind == "weight":
            values = [p.detach().abs() for p in every]
        else:
            values = [grads[planned[id(p)]].abs() if id(p) in planned else torch.zeros(p.shape, device=device)
                      for p in every]
        return torch.cat([v.reshape(-1).float() for v in values]).to(device)

    @staticmethod
    def _uniform(context: StepContext, stream: int, total: int, device: torch.device) -> torch.Tensor:
        """``total`` fp32 uniforms in [0, 1) from a generator on ``device`` seeded by ``stream_seed``."""
        seed = stream_seed(context.seed, context.step, stream)
        generator = torch.Generator(device=device).manual_seed(seed)
        return torch.rand(total, generator=generator, device=device)

    # ----------------------------------------------------------------------------- the commit

    def after_step(self, context: StepContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None or ("fisher" not in pending and not pending["refresh"]):
            return
        if context.stepped is False:
            return
        # NOTE (host read): the fused path skips on the device; this reads its flag, on refresh and
        # accumulation steps only (see the class docstring).
        if context.stepped is None and context.found_inf is not None and bool(context.found_inf.item()):
            return
        state = context.state
        if pending["refresh"]:
            for param, packed in pending["masks"]:
                state[param][MASK_KEY] = packed
            for entry in state.values():
                entry.pop(FISHER_KEY, None)
            self.next_refresh = pending["step"] + self.update_every
        else:
            for param, value in zip(*pending["fisher"], strict=True):
                state[param][FISHER_KEY] = value

    # ----------------------------------------------------------------------------------- state

    def variant_state(self) -> dict[str, Any]:
        return {"next_refresh": self.next_refresh}

    def checked_variant_state(self, state: dict | None) -> dict | None:
        if state is None:
            return None
        value = state.get("next_refresh")
        if (set(state) != {"next_refresh"} or isinstance(value, bool) or not isinstance(value, int)
                or value < 0):
            raise ValueError("state_dict['sam']['variant']: SparseSAM keeps {'next_refresh': an int >= 0}, "
                             f"got {state!r}")
        return state

    def load_variant_state(self, state: dict) -> None:
        self.next_refresh = int(state["next_refresh"])


class SparseSAM(SAM):
    """Sparse SAM over any torch.optim base (see the module docstring and docs/algorithms.md).

    ``sparsity`` in [0, 1): the share of weights left unperturbed (0 is SAM); exactly ``floor((1 - sparsity)
    N)`` of the N weights of every parameter together are perturbed. ``update_every`` >= 1: steps between
    refreshes (the first at step 0). ``criterion``: ``"fisher"`` (``fisher_batches``: the squared first-pass
    gradients of that many steps up to each refresh; 8, about the authors' 1024 samples at batch 128, or
    ``update_every`` when smaller) or ``"dynamic"`` (``drop_rate`` 0.5, ``drop_by`` "gradient", ``grow_by``
    "random": the authors' defaults; ``total_steps`` for the cosine decay of the drop rate).
    ``masked_norm``: e's norm over the masked gradient (True, the paper's definition: ||e|| = rho) or the
    whole gradient (False, the authors' code). ``mask(param)``: a parameter's mask.
    """

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, sparsity: float = 0.5,
                 update_every: int = 2000, criterion: str = "fisher", fisher_batches: int | None = None,
                 drop_rate: float | None = None, drop_by: str | None = None, grow_by: str | None = None,
                 total_steps: int | None = None, masked_norm: bool = True, **kwargs: Any) -> None:
        refuse_options("SparseSAM", kwargs, adaptive=True)
        # NOTE (option table): the wording of combinations.py's FAMILY rows, whose table does not list
        # SparseSAM yet.
        if kwargs.get("schedule") is not None:
            raise ValueError("schedule: not an option of SparseSAM, whose state follows every SAM step")
        if kwargs.get("capturable") is True:
            raise ValueError("capturable=True: SparseSAM keeps per-step buffers on the host side of the "
                             "step, which a captured graph cannot replay")
        policy = SparseSAMPolicy(sparsity, update_every, criterion, fisher_batches=fisher_batches,
                                 drop_rate=drop_rate, drop_by=drop_by, grow_by=grow_by,
                                 total_steps=total_steps, masked_norm=masked_norm, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)

    sparsity = property(lambda self: self.policy.sparsity, doc="The share of weights left unperturbed.")
    update_every = property(lambda self: self.policy.update_every, doc="Steps between mask refreshes.")
    criterion = property(lambda self: self.policy.criterion, doc="'fisher' or 'dynamic'.")

    def mask(self, param: torch.Tensor) -> torch.Tensor | None:
        """``param``'s current mask as a bool tensor of its shape (a new tensor), None before it has one."""
        packed = self.state[param].get(MASK_KEY) if param in self.state else None
        if packed is None:
            return None
        return unpack_bits(packed)[:param.numel()].view(param.shape).clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """SAM's load, then the saved masks back as the uint8 tensors they were (torch's load casts every
        state tensor to its parameter's dtype; the bytes survive it exactly, but as floats)."""
        saved = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        masks = {index: entry[MASK_KEY] for index, entry in saved.items()
                 if isinstance(entry, dict) and MASK_KEY in entry}
        by_index = {}
        if masks:
            # NOTE (atomic load): the masks are checked against their parameters before anything loads;
            # a state dict whose groups do not match is refused by SAM's load below.
            indices = [index for group in state_dict.get("param_groups", []) for index in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            if len(indices) == len(params):
                by_index = dict(zip(indices, params, strict=True))
        for index, mask in masks.items():
            param = by_index.get(index)
            size = None if param is None else -(-param.numel() // 8)
            if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8
                    or (size is not None and mask.numel() != size)):
                raise ValueError(f"state_dict['state'][{index}]['{MASK_KEY}']: must be a uint8 tensor of "
                                 f"ceil(numel / 8) = {size} bytes, got {mask!r}")
        super().load_state_dict(state_dict)
        for index, mask in masks.items():
            param = by_index[index]
            self.state[param][MASK_KEY] = mask.to(param.device).clone()
