"""Cross products of test options, split into a covering set (the default run) and the rest (marked
``slow``).

A property checked over several independent axes (dtype, tensor shapes, options, backend, ...) mostly fails
through one value or an interaction of two; a covering set that holds every pair of values of any two axes
finds those in a fraction of the cases (``pairwise``). Where a test has one axis besides the backend,
every pair is every case; there the Triton backend, which runs in the interpreter about a hundred times
slower than the others, takes the cases that reach its distinct kernel paths by default and the rest under
``slow`` (``on_backends``). The remaining combinations still run, under ``pytest -m slow``, so the default
run and the slow run together check the whole product as before.
"""

from __future__ import annotations

import itertools

import pytest
from targets import KERNELS, OPTIMIZER_BACKENDS


def _pairs(combination: tuple) -> set:
    return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(combination), 2)}


def covering_set(sizes: list[int]) -> list[tuple[int, ...]]:
    """Index tuples of a pairwise covering set of the product of ``range(n)`` for n in ``sizes``: greedy,
    each pick the combination (first in product order on ties) that covers the most uncovered pairs.
    Deterministic, so a test id is in the same set on every run."""
    product = list(itertools.product(*(range(n) for n in sizes)))
    uncovered = set().union(*(_pairs(c) for c in product)) if len(sizes) > 1 else set()
    if not uncovered:
        return product[:1] if len(sizes) > 1 else product
    chosen = []
    while uncovered:
        best = max(product, key=lambda c: len(_pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return sorted(chosen)


def pairwise(**axes) -> tuple[str, list]:
    """``argnames, argvalues`` for ``pytest.mark.parametrize`` over the product of ``axes`` (name: dict of
    id to value, or a list of values): every combination, those outside the pairwise covering set marked
    ``slow``. Ids join the axes' ids with "-" in the order given."""
    names = list(axes)
    columns = []
    for values in axes.values():
        items = list(values.items()) if isinstance(values, dict) else [(_id(v), v) for v in values]
        columns.append(items)
    default = set(covering_set([len(c) for c in columns]))
    params = []
    for index in itertools.product(*(range(len(c)) for c in columns)):
        chosen = [columns[axis][i] for axis, i in enumerate(index)]
        marks = () if index in default else (pytest.mark.slow,)
        params.append(pytest.param(*(value for _, value in chosen), marks=marks,
                                   id="-".join(name for name, _ in chosen)))
    return ",".join(names), params


def _id(value) -> str:
    return str(value).removeprefix("torch.")


def pairwise_over_backends(**axes):
    """``pytest.mark.parametrize`` over the optimizer backends (conftest.py's ``backend`` fixture, given
    its value indirectly) and ``axes``, by ``pairwise``."""
    return pytest.mark.parametrize(*pairwise(backend=OPTIMIZER_BACKENDS, **axes), indirect=["backend"])


def on_backends(argname: str, values, triton) -> pytest.MarkDecorator:
    """``pytest.mark.parametrize`` over the optimizer backends (given to conftest.py's ``backend`` fixture
    indirectly) and the values of ``argname`` (a dict of id to value, or a list): every value on each
    backend, those not in ``triton`` marked slow on the Triton backend."""
    items = list(values.items()) if isinstance(values, dict) else [(_id(v), v) for v in values]
    unknown = set(triton) - {name for name, _ in items}
    assert not unknown, f"not among the values: {unknown}"
    params = [pytest.param(backend, value, id=f"{backend}-{name}",
                           marks=(pytest.mark.slow,) if backend == "triton" and name not in triton else ())
              for backend in OPTIMIZER_BACKENDS for name, value in items]
    return pytest.mark.parametrize(f"backend,{argname}", params, indirect=["backend"])


def slow_on(*backends: str) -> pytest.MarkDecorator:
    """``pytest.mark.parametrize`` over the optimizer backends (conftest.py's ``backend`` fixture, given its
    value indirectly), those in ``backends`` marked slow: for a test whose case on them is long (the
    Triton interpreter, a compiler) and whose property the default run checks on the others."""
    unknown = set(backends) - set(OPTIMIZER_BACKENDS)
    assert not unknown, f"not optimizer backends: {unknown}"
    params = [pytest.param(backend, id=backend, marks=(pytest.mark.slow,) if backend in backends else ())
              for backend in OPTIMIZER_BACKENDS]
    return pytest.mark.parametrize("backend", params, indirect=True)


def slow_in_the_interpreter() -> pytest.MarkDecorator:
    """``pytest.mark.parametrize`` over the kernel targets (conftest.py's ``kernel`` fixture, given its value
    indirectly), Triton on the CPU (the interpreter) marked slow: for a test whose case there is long and
    whose property the default run checks on the compiled backends (and Triton's kernels elsewhere)."""
    interpreted = {("triton", "cpu")}
    params = [pytest.param(target, id=str(target),
                           marks=(pytest.mark.slow,) if (target.backend, target.device_type) in interpreted
                           else ())
              for target in KERNELS]
    return pytest.mark.parametrize("kernel", params, indirect=True)
