"""A plain eager Sparse SAM (Mi et al., NeurIPS 2022, arXiv 2210.05177), written from the paper's
definition in the notation and with the conventions of docs/algorithms.md ("Sparse SAM"):

    e = rho * (m * g) / (||m * g|| + eps)          (``masked_norm=False``: ||g|| in the denominator)

with m a 0/1 mask over every weight that keeps exactly K = N - ceil(sparsity * N) of the N weights, chosen
again at every refresh (step 0, then ``update_every`` steps after each refresh that was taken):

* Fisher: the K weights with the largest sum of squared first-pass gradients over the steps
  t > next_refresh - fisher_batches up to the refresh (the steps that were taken, and the refresh step).
* dynamic: from the current mask (at the first refresh: the K largest of uniforms of stream 0), the
  K - D live weights with the largest drop score stay and the D dead weights with the largest grow score
  join, D = min(floor(K * rate), N - K), rate = drop_rate, or with ``total_steps``
  drop_rate * (1 + cos(pi * min(t, total) / total)) / 2. Scores: |g|, |w| or uniforms (stream 1 for the
  drop, 2 for the grow).

Every ranking puts larger scores first and breaks ties by the earlier position in the concatenation of
the parameters (a plain Python sort). Uniforms of stream s at step t: ``torch.rand(N)`` from a CPU
generator seeded with mix64(seed * 0x9E3779B97F4A7C15 + mix64(4 t + s + 0x632BE59BD9B4E019)) mod 2**64.

A step skipped for a non-finite gradient changes nothing: no mask, no Fisher sum, the refresh stays due.

NOTE (independence): nothing here imports sam_kernels; the helpers come from eager_reference.py and
variant_reference.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from eager_reference import global_norm, mix64
from variant_reference import EPS, EagerVariant

_MASK64 = (1 << 64) - 1


def kept(numel: int, sparsity: float) -> int:
    """K = N - ceil(sparsity * N), in exact rational arithmetic."""
    return numel - math.ceil(Fraction(sparsity) * numel)


def uniforms(seed: int, step: int, stream: int, count: int) -> torch.Tensor:
    value = (seed * 0x9E3779B97F4A7C15 + mix64((4 * step + stream + 0x632BE59BD9B4E019) & _MASK64)) & _MASK64
    return torch.rand(count, generator=torch.Generator().manual_seed(mix64(value)))


def largest(scores: list[float], count: int, among: list[int]) -> set[int]:
    """The ``count`` positions of ``among`` with the largest scores, ties to the earlier position."""
    return set(sorted(among, key=lambda i: (-scores[i], i))[:count])


class EagerSparseSAM(EagerVariant):
    """Sparse SAM over torch.optim ``base`` (see the module docstring). Masks are bool tensors in
    ``self.mask``, the Fisher sums float64 tensors in ``self.fisher``; ``self.t`` counts every step."""

    def __init__(self, model, base, *, rho: float = 0.05, sparsity: float = 0.5, update_every: int = 2000,
                 criterion: str = "fisher", fisher_batches: int = 8, drop_rate: float = 0.5,
                 drop_by: str = "gradient", grow_by: str = "random", total_steps: int | None = None,
                 masked_norm: bool = True, seed: int = 0, eps: float = EPS) -> None:
        super().__init__(model, base, rho=rho, eps=eps)
        self.sparsity, self.update_every, self.criterion = sparsity, update_every, criterion
        self.fisher_batches, self.drop_rate, self.total_steps = fisher_batches, drop_rate, total_steps
        self.drop_by, self.grow_by, self.masked_norm, self.seed = drop_by, grow_by, masked_norm, seed
        self.t = 0
        self.next_refresh = 0
        self.mask: dict[torch.Tensor, torch.Tensor] = {}
        self.fisher: dict[torch.Tensor, torch.Tensor] = {}
        self.refreshes: list[int] = []
        self._commit = None

    # ----------------------------------------------------------------------------- the mask

    def _flat(self, tensors) -> list[float]:
        return [float(v) for t in tensors for v in t.reshape(-1).tolist()]

    def _split(self, chosen: set[int]) -> dict[torch.Tensor, torch.Tensor]:
        masks, offset = {}, 0
        for p in self.params:
            n = p.numel()
            masks[p] = torch.tensor([offset + i in chosen for i in range(n)]).reshape(p.shape)
            offset += n
        return masks

    def _scores(self, kind: str, stream: int, g) -> list[float]:
        if kind == "random":
            return uniforms(self.seed, self.t, stream, sum(p.numel() for p in self.params)).tolist()
        return self._flat((p.detach() if kind == "weight" else gi).double().abs()
                          for p, gi in zip(self.params, g, strict=True))

    def _new_mask(self, g, fisher) -> dict[torch.Tensor, torch.Tensor]:
        total = sum(p.numel() for p in self.params)
        k = kept(total, self.sparsity)
        positions = list(range(total))
        if self.criterion == "fisher":
            return self._split(largest(self._flat(fisher[p] for p in self.params), k, positions))
        if not self.mask:
            alive = largest(uniforms(self.seed, self.t, 0, total).tolist(), k, positions)
        else:
            flags = self._flat(self.mask[p].double() for p in self.params)
            alive = {i for i in positions if flags[i]}
        rate = self.drop_rate
        if self.total_steps is not None:
            rate = rate * (1 + math.cos(math.pi * min(self.t, self.total_steps) / self.total_steps)) / 2
        dropped = min(math.floor(k * rate), total - k)
        stay = largest(self._scores(self.drop_by, 1, g), k - dropped, sorted(alive))
        grow = largest(self._scores(self.grow_by, 2, g), dropped, [i for i in positions if i not in alive])
        return self._split(stay | grow)

    # ---------------------------------------------------------------------------- the step

    def perturbation(self, g):
        refresh = self.t >= self.next_refresh
        fisher = None
        if self.criterion == "fisher" and self.t > self.next_refresh - self.fisher_batches:
            fisher = {p: self.fisher.get(p, torch.zeros(p.shape, dtype=torch.float64)) + gi.double() ** 2
                      for p, gi in zip(self.params, g, strict=True)}
        mask = self._new_mask(g, fisher) if refresh else self.mask
        self._commit = (refresh, mask, fisher)
        masked = [gi.double() * mask[p] if p in mask else torch.zeros_like(gi, dtype=torch.float64)
                  for p, gi in zip(self.params, g, strict=True)]
        norm = global_norm(masked if self.masked_norm else g)
        return [self.rho * m / (norm + self.eps) for m in masked], {}

    def step(self, model, x, y, **corrupt) -> bool:
        self._commit = None
        skipped = super().step(model, x, y, **corrupt)
        if not skipped and self._commit is not None:
            refresh, mask, fisher = self._commit
            if refresh:
                self.mask, self.fisher = mask, {}
                self.next_refresh = self.t + self.update_every
                self.refreshes.append(self.t)
            elif fisher is not None:
                self.fisher = fisher
        self.t += 1
        return skipped
