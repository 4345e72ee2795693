"""The interface every attention implementation in :mod:`dynattn` satisfies.

:class:`AttentionMaintainer` is a :class:`typing.Protocol`: it lists the
operations and accessors that :class:`~dynattn.DynamicAttention` and each entry
of :data:`dynattn.baselines.BASELINES` have in common, and nothing else. Code
that only needs those (benchmarks, :mod:`dynattn.hardness`, a user's own
comparison) can accept any of them, or an implementation of its own, without
inheriting from anything: conformance is structural. It is
``runtime_checkable``, so ``isinstance(obj, AttentionMaintainer)`` checks that
the members exist (not their signatures; mypy checks those).

The operations are those of van den Brand, Song and Zhou, *Algorithm and
Hardness for Dynamic Attention Maintenance in Large Language Models* (arXiv
2304.02207): ``UpdateK``, ``UpdateV`` and ``Query`` on

    O = D^-1 A V,   A = exp(scale * Q K^T),   D = diag(A 1)

with ``Q: (n, d)``, ``K: (m, d)``, ``V: (m, e)`` and ``O: (n, e)``, plus the row,
batch and whole-output answers. Shapes below are those of a single problem;
:class:`~dynattn.DynamicAttention` also accepts leading head axes
``(*batch, n, d)``, and then its arrays carry them in front (``batch_shape``).
Where an implementation offers more (``DynamicAttention``'s ``head=`` and
``heads=`` keywords, token edits, ``fold``), the extras are keyword-only or
separate methods, so the calls below mean the same on every implementation.

Every implementation validates its arguments before it changes anything
(:mod:`dynattn._validation`): a rejected call raises ``TypeError``,
``IndexError`` or ``ValueError`` and leaves the state as it was.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["AttentionMaintainer"]


@runtime_checkable
class AttentionMaintainer(Protocol):
    """Softmax attention ``O = softmax(scale * Q K^T) V`` kept current under entry updates.

    Arrays are numpy arrays, or torch tensors on the torch backend
    (``backend == "torch"``); answers have the implementation's ``dtype``.

    Attributes
    ----------
    n, m, d, e : int
        Queries, keys, key width and value width: ``Q: (n, d)``,
        ``K: (m, d)``, ``V: (m, e)``, ``O: (n, e)``.
    batch_shape : tuple of int
        Leading head/batch axes of every array (``()`` for a single problem).
    Q : (n, d) array
        Current queries: a read-only view (numpy) or a copy (torch).
    K : (m, d) array
        Current keys, as for ``Q``.
    V : (m, e) array
        Current values, as for ``Q``.
    dtype : numpy.dtype
        Storage dtype, float32 or float64.
    scale : float
        Softmax scale ``s`` in ``exp(s * Q K^T)``.
    backend : str
        ``"numpy"`` or ``"torch"`` (:mod:`dynattn.backends`).
    """

    @property
    def n(self) -> int:
        """Number of queries (rows of ``Q`` and ``O``)."""
        ...

    @property
    def m(self) -> int:
        """Number of keys (rows of ``K`` and ``V``)."""
        ...

    @property
    def d(self) -> int:
        """Key width (columns of ``Q`` and ``K``)."""
        ...

    @property
    def e(self) -> int:
        """Value width (columns of ``V`` and ``O``)."""
        ...

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading head/batch axes (``()`` for a single problem)."""
        ...

    @property
    def Q(self) -> Any:
        """Current queries ``Q: (n, d)``."""
        ...

    @property
    def K(self) -> Any:
        """Current keys ``K: (m, d)``."""
        ...

    @property
    def V(self) -> Any:
        """Current values ``V: (m, e)``."""
        ...

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype (float32 or float64)."""
        ...

    @property
    def scale(self) -> float:
        """Softmax scale ``s``."""
        ...

    @property
    def backend(self) -> str:
        """Array backend in use (``"numpy"`` or ``"torch"``)."""
        ...

    def update_k(self, i: int, j: int, delta: float) -> None:
        """The paper's UpdateK: ``K[i, j] += delta``.

        Parameters
        ----------
        i : int
            Key row, ``0 <= i < m``.
        j : int
            Key column, ``0 <= j < d``.
        delta : float
            Finite; the new entry must be finite in ``dtype``.
        """
        ...

    def update_v(self, i: int, j: int, delta: float) -> None:
        """The paper's UpdateV: ``V[i, j] += delta``.

        Parameters
        ----------
        i : int
            Value row, ``0 <= i < m``.
        j : int
            Value column, ``0 <= j < e``.
        delta : float
            Finite; the new entry must be finite in ``dtype``.
        """
        ...

    def query(self, i: int, j: int) -> float:
        """The paper's Query: ``O[i, j]`` as a Python float.

        Parameters
        ----------
        i : int
            Query row, ``0 <= i < n``.
        j : int
            Output column, ``0 <= j < e``.
        """
        ...

    def query_row(self, i: int) -> Any:
        """``O[i, :]``, a new ``(e,)`` array.

        Parameters
        ----------
        i : int
            Query row, ``0 <= i < n``.
        """
        ...

    def query_many(self, rows: Any, cols: Any) -> Any:
        """``O[rows[k], cols[k]]`` for every k, a new ``(k,)`` array.

        Parameters
        ----------
        rows : (k,) array_like of int
            Query rows, each in ``[0, n)``.
        cols : (k,) array_like of int
            Output columns, each in ``[0, e)``; as many as ``rows``.
        """
        ...

    def output(self) -> Any:
        """The whole output ``O: (n, e)``, a new array."""
        ...
