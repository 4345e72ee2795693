"""The shared interface: every implementation is an AttentionMaintainer, and they agree.

``DynamicAttention`` and each entry of ``dynattn.baselines.BASELINES`` satisfy
the :class:`dynattn.interface.AttentionMaintainer` protocol (structurally; mypy
checks the signatures through the type of ``BASELINES``), and the same short
sequence of the paper's updates gives the same answers on all of them, within
the accuracy targets of ``dynattn.testing`` against ``reference_attention``.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from dynattn import DynamicAttention
from dynattn.baselines import BASELINES
from dynattn.interface import AttentionMaintainer
from dynattn.testing import as_numpy, assert_attention_close, random_problem, reference_attention

IMPLEMENTATIONS = {"dynamic": DynamicAttention, **BASELINES}

#: The protocol's members, as documented in dynattn/interface.py.
MEMBERS = (
    "n",
    "m",
    "d",
    "e",
    "batch_shape",
    "Q",
    "K",
    "V",
    "dtype",
    "scale",
    "backend",
    "update_k",
    "update_v",
    "query",
    "query_row",
    "query_many",
    "output",
)

#: (kind, row, column, delta): K or V entry updates, repeating a row and touching both sides.
UPDATES = [
    ("k", 0, 1, 0.5),
    ("v", 3, 0, -1.25),
    ("k", 5, 2, -0.75),
    ("v", 0, 3, 2.0),
    ("k", 0, 1, 0.25),
    ("k", 8, 0, 1.5),
    ("v", 5, 2, 0.5),
]


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_every_implementation_is_an_attention_maintainer(name, backend):
    Q, K, V = random_problem(5, 6, 3, 2)
    att = IMPLEMENTATIONS[name](Q, K, V, tau=0.5, scale=0.5)
    assert isinstance(att, AttentionMaintainer)
    assert (att.n, att.m, att.d, att.e) == (5, 6, 3, 2)
    assert att.batch_shape == ()
    assert (att.scale, att.dtype, att.backend) == (0.5, np.dtype(np.float64), backend)
    for name_, shape in (("Q", (5, 3)), ("K", (6, 3)), ("V", (6, 2))):
        assert tuple(getattr(att, name_).shape) == shape


def test_the_protocol_needs_every_member():
    def member(*args):
        return None

    complete = dict.fromkeys(MEMBERS, member)
    assert isinstance(SimpleNamespace(**complete), AttentionMaintainer)
    for missing in MEMBERS:
        partial = {name: member for name in MEMBERS if name != missing}
        assert not isinstance(SimpleNamespace(**partial), AttentionMaintainer), missing
    assert not isinstance(object(), AttentionMaintainer)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_same_updates_give_the_same_answers(name, dtype):
    dt = np.dtype(dtype)
    Q, K, V = random_problem(7, 9, 3, 4, seed=11, logit_scale=2.0)
    att = IMPLEMENTATIONS[name](Q, K, V, tau=0.5, scale=0.5, dtype=dtype)
    # the expected inputs: every entry update rounded to the dtype, as the implementations store it
    Q, K, V = (x.astype(dt) for x in (Q, K, V))
    for kind, i, j, delta in UPDATES:
        target = K if kind == "k" else V
        target[i, j] = target[i, j] + dt.type(delta)
        (att.update_k if kind == "k" else att.update_v)(i, j, delta)
        ref = reference_attention(Q, K, V, scale=0.5)
        tolerance = (1e-10 if dt == np.float64 else 1e-4) * np.abs(V[:, j].astype(np.float64)).max()
        assert abs(att.query(i % 7, j) - ref[i % 7, j]) <= tolerance
    np.testing.assert_array_equal(as_numpy(att.K), K)
    np.testing.assert_array_equal(as_numpy(att.V), V)

    check = {"scale": 0.5, "dtype": dtype, "context": f"{name}: "}
    out = as_numpy(att.output())
    assert out.shape == (7, 4) and out.dtype == dt
    assert_attention_close(out, Q, K, V, **check)
    rows = np.arange(7)
    row_answers = np.stack([as_numpy(att.query_row(i)) for i in rows])
    assert row_answers.shape == (7, 4)
    assert_attention_close(row_answers, Q, K, V, **check)
    rows, cols = np.array([0, 6, 3, 0]), np.array([3, 0, 2, 3])
    many = as_numpy(att.query_many(rows, cols))
    assert many.shape == (4,)
    assert_attention_close(many, Q, K, V, rows=rows, cols=cols, **check)
    entries = np.array([att.query(int(i), int(j)) for i, j in zip(rows, cols, strict=True)])
    assert_attention_close(entries, Q, K, V, rows=rows, cols=cols, **check)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_same_updates_give_the_same_answers_with_heads(name, dtype):
    """Leading head axes: entry updates name their head, row answers carry every head."""
    dt = np.dtype(dtype)
    parts = [random_problem(7, 9, 3, 4, seed=11 + h, logit_scale=2.0) for h in range(6)]
    Q, K, V = (np.stack([p[k] for p in parts]).reshape(2, 3, *parts[0][k].shape) for k in range(3))
    att = IMPLEMENTATIONS[name](Q, K, V, tau=0.5, scale=0.5, dtype=dtype)
    assert att.batch_shape == (2, 3) and (att.n, att.m, att.d, att.e) == (7, 9, 3, 4)
    Q, K, V = (x.astype(dt) for x in (Q, K, V))
    for step, (kind, i, j, delta) in enumerate(UPDATES):
        head = (step % 2, step % 3)
        target = K if kind == "k" else V
        target[head][i, j] = target[head][i, j] + dt.type(delta)
        (att.update_k if kind == "k" else att.update_v)(i, j, delta, head=head)
        ref = reference_attention(Q[head], K[head], V[head], scale=0.5)
        tolerance = (1e-10 if dt == np.float64 else 1e-4) * np.abs(V[head][:, j].astype(np.float64)).max()
        assert abs(att.query(i % 7, j, head=head) - ref[i % 7, j]) <= tolerance
    np.testing.assert_array_equal(as_numpy(att.K), K)
    np.testing.assert_array_equal(as_numpy(att.V), V)
    out = as_numpy(att.output())
    assert out.shape == (2, 3, 7, 4) and out.dtype == dt
    rows = as_numpy(att.query_rows([6, 0]))
    assert rows.shape == (2, 3, 2, 4)
    for a in range(2):
        for b in range(3):
            check = {"scale": 0.5, "dtype": dtype, "context": f"{name} head {(a, b)}: "}
            assert_attention_close(out[a, b], Q[a, b], K[a, b], V[a, b], **check)
            assert_attention_close(rows[a, b], Q[a, b], K[a, b], V[a, b], rows=np.array([6, 0]), **check)
