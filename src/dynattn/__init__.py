"""dynattn: exact softmax attention maintained under edits to keys and values.

``DynamicAttention`` implements the lazy-update structure of van den Brand,
Song and Zhou (arXiv 2304.02207) with certified accuracy; ``dynattn.baselines``
has the ``Recompute``, ``OnDemand`` and ``Eager`` alternatives behind the same
interface, and ``dynattn.testing`` the float64 reference used to check them.
``SnapshotError`` is raised by ``DynamicAttention.load`` for a file that is not
a valid snapshot; ``AttentionMaintainer`` is the interface (a ``typing.Protocol``)
that the structure and every baseline satisfy. ``merge_states`` combines
``(O, LSE)`` states (``query_rows(..., return_lse=True)``) over disjoint key sets.
"""

from dynattn.interface import AttentionMaintainer
from dynattn.merge import merge_states, merge_states_many
from dynattn.persistence import SnapshotError
from dynattn.structure import DynamicAttention

__all__ = [
    "AttentionMaintainer",
    "DynamicAttention",
    "SnapshotError",
    "__version__",
    "merge_states",
    "merge_states_many",
]
__version__ = "0.2.0"
