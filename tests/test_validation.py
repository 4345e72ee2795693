"""Bad input: a clear error naming the argument, and nothing changed."""

import math
import re

import numpy as np
import pytest

from conftest import assert_same_state, state_of
from dynattn import DynamicAttention
from dynattn._validation import check_choice, check_scalar, format_interval
from dynattn.baselines import BASELINES
from dynattn.hardness import HintedMvViaAttention, max_hint_nonzeros
from dynattn.progress import make_progress
from dynattn.sweep import BenchConfig, resolve_dtype
from dynattn.testing import as_numpy, random_problem
from dynattn.theory import omega_rect, query_exponent, update_exponent

IMPLEMENTATIONS = {"dynamic": DynamicAttention, **BASELINES}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def structure(request):
    Q, K, V = random_problem(5, 6, 3, 2, seed=2)
    att = IMPLEMENTATIONS[request.param](Q, K, V, tau=0.5)
    att.update_k(1, 1, 0.5)  # leave something pending
    return att


BAD_CALLS = [
    ("update_k", (6, 0, 0.1), IndexError, "i=6"),
    ("update_k", (-1, 0, 0.1), IndexError, "i=-1"),
    ("update_k", (0, 3, 0.1), IndexError, "j=3"),
    ("update_k", (0.5, 0, 0.1), TypeError, "i: expected an integer"),
    ("update_k", (True, 0, 0.1), TypeError, "i: expected an integer"),
    ("update_k", (0, 0, float("nan")), ValueError, "delta: expected a finite"),
    ("update_k", (0, 0, float("inf")), ValueError, "delta: expected a finite"),
    ("update_k", (0, 0, "1"), TypeError, "delta: expected a real"),
    ("update_v", (0, 2, 0.1), IndexError, "j=2"),
    ("update_v", (6, 0, 0.1), IndexError, "i=6"),
    ("update_v", (0, 0, float("-inf")), ValueError, "delta"),
    ("update_v", (0, 0, np.nan), ValueError, "delta"),
    ("query", (5, 0), IndexError, "i=5"),
    ("query", (0, 2), IndexError, "j=2"),
    ("query", (np.int64(0), 2.0), TypeError, "j: expected an integer"),
    ("query_row", (5,), IndexError, "i=5"),
    ("query_many", ([0, 5], [0, 0]), IndexError, "rows contains 5"),
    ("query_many", ([0, 1], [0]), ValueError, "same length"),
    ("query_many", ([0.0], [0]), TypeError, "rows: expected integer"),
    ("query_many", ([[0]], [0]), ValueError, "rows: expected a 1-D"),
]


@pytest.mark.parametrize("method, args, error, message", BAD_CALLS)
def test_bad_calls_raise_and_leave_state_unchanged(structure, method, args, error, message):
    before = state_of(structure)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        getattr(structure, method)(*args)
    assert_same_state(before, state_of(structure))


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("method", ["update_k", "update_v"])
def test_delta_that_overflows_float32_is_rejected(name, method):
    Q, K, V = random_problem(3, 3, 2, 2)
    att = IMPLEMENTATIONS[name](Q, K, V, dtype=np.float32)
    before = state_of(att)
    with pytest.raises(ValueError, match="delta=1e\\+39 would make . entry .* overflow float32"):
        getattr(att, method)(0, 0, 1e39)
    assert_same_state(before, state_of(att))


GOOD = random_problem(4, 5, 3, 2)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"Q": np.ones(3)}, ValueError, "Q: expected an array of 2 or more dimensions"),
        ({"K": np.ones((2, 5, 3))}, ValueError, "K: expected a 2-D array"),
        ({"K": np.ones((5, 4))}, ValueError, "K: expected 3 columns"),
        ({"V": np.ones((4, 2))}, ValueError, "V: expected 5 rows"),
        ({"Q": np.ones((0, 3))}, ValueError, "Q: expected a non-empty"),
        (
            {"key_mask": np.ones(4, dtype=bool)},
            ValueError,
            r"key_mask: expected a boolean array of shape \(5,\)",
        ),
        ({"key_mask": np.ones(5)}, ValueError, "key_mask: expected a boolean"),
        ({"causal": 1}, TypeError, "causal: expected True or False"),
        ({"Q": np.full((4, 3), np.nan)}, ValueError, "Q: expected finite values"),
        ({"V": np.full((5, 2), np.inf)}, ValueError, "V: expected finite values"),
        ({"K": np.ones((5, 3), dtype=complex)}, TypeError, "K: expected a real numeric"),
        ({"K": np.ones((5, 3), dtype=bool)}, TypeError, "K: expected a real numeric"),
        ({"Q": [["a"] * 3] * 4}, TypeError, "Q: expected a real numeric"),
        ({"tau": 1.5}, ValueError, "tau: expected a number in"),
        ({"tau": -0.1}, ValueError, "tau"),
        ({"tau": "0.5"}, TypeError, "tau: expected a real"),
        ({"scale": float("nan")}, ValueError, "scale: expected a finite"),
        ({"dtype": np.float16}, TypeError, "dtype: expected float32 or float64"),
        ({"dtype": np.int32}, TypeError, "dtype"),
        ({"storage": "sparse"}, ValueError, "storage: expected one of 'dense', 'implicit', 'auto'"),
        ({"tol": 0.0}, ValueError, "tol: expected a positive"),
        (
            {"V": np.full((5, 2), 1e39)},
            ValueError,
            "overflows float32",
        ),
    ],
)
def test_constructor_rejects_bad_input(kwargs, error, message):
    args = dict(zip("QKV", GOOD, strict=True))
    options = {k: v for k, v in kwargs.items() if k not in "QKV"}
    args.update({k: v for k, v in kwargs.items() if k in "QKV"})
    if "overflows" in message:
        options["dtype"] = np.float32
    with pytest.raises(error, match=message):
        DynamicAttention(args["Q"], args["K"], args["V"], **options)


def test_logits_beyond_float64_range_are_rejected():
    Q, K, V = random_problem(3, 4, 2, 2)
    with pytest.raises(ValueError, match="K: dot products"):
        DynamicAttention(Q * 1e160, K * 1e160, V)
    att = DynamicAttention(Q * 1e150, K, V)
    before = state_of(att)
    with pytest.raises(ValueError, match="delta: dot products"):
        att.update_k(0, 0, 1e200)
    assert_same_state(before, state_of(att))


def test_integer_inputs_are_converted():
    Q = np.arange(6).reshape(3, 2)
    att = DynamicAttention(Q, Q[:2], np.ones((2, 1), dtype=np.int64))
    assert as_numpy(att.K).dtype == np.float64
    np.testing.assert_allclose(as_numpy(att.output()), 1.0)


# ------------------------------------------------------------------ one policy for indices and flags
#
# Every public index is a Python int, a numpy integer scalar or a 0-d integer
# array/tensor; every index array a 1-D list, integer array or integer tensor;
# every flag a Python/numpy bool. Anything else is a TypeError naming the
# argument (a 0-d index array is a ValueError), and a rejected call changes nothing.


def _problem(batch=()):
    rng = np.random.default_rng(21)
    Q = rng.standard_normal((*batch, 5, 3)) * 0.5
    K = rng.standard_normal((*batch, 6, 3)) * 0.5
    V = rng.standard_normal((*batch, 6, 3))
    return Q, K, V


def _fresh(kind="dynamic", batch=(), **options):
    """A small structure (n=5, m=6, d=e=3) with one pending change."""
    att = IMPLEMENTATIONS[kind](*_problem(batch), tau=0.5, **options)
    if batch:
        att.update_v(1, 1, 0.5, head=0)
    else:
        att.update_v(1, 1, 0.5)
    return att


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is optional
        return None
    return torch


def _good_index(kind, k):
    if kind == "0-d tensor":
        return _torch().tensor(k)
    return {"int": k, "np.int64": np.int64(k), "np.int32": np.int32(k), "0-d array": np.array(k)}[kind]


GOOD_INDEX_KINDS = ["int", "np.int64", "np.int32", "0-d array"] + (["0-d tensor"] if _torch() else [])
BAD_INDICES = {
    "float": 2.0,
    "np.float64": np.float64(2),
    "0-d float array": np.array(2.0),
    "bool": True,
    "np.bool_": np.True_,
    "0-d bool array": np.array(True),
    "array": np.array([2, 2]),
    "one-element array": np.array([2]),
    "str": "2",
    "None": None,
}

ROW = np.full(3, 0.3)

# (structure, method, the index argument's name, call(att, x)); every index is 2
INDEX_CALLS = [
    ("any", "update_k", "i", lambda a, x: a.update_k(x, 1, 0.25)),
    ("any", "update_k", "j", lambda a, x: a.update_k(1, x, 0.25)),
    ("any", "update_v", "i", lambda a, x: a.update_v(x, 1, 0.25)),
    ("any", "update_v", "j", lambda a, x: a.update_v(1, x, 0.25)),
    ("any", "query", "i", lambda a, x: a.query(x, 1)),
    ("any", "query", "j", lambda a, x: a.query(1, x)),
    ("any", "query_row", "i", lambda a, x: a.query_row(x)),
    ("dynamic", "error_bound", "i", lambda a, x: a.error_bound(x)),
    ("dynamic", "set_key", "c", lambda a, x: a.set_key(x, ROW)),
    ("dynamic", "set_value", "c", lambda a, x: a.set_value(x, ROW)),
    ("dynamic", "set_query", "i", lambda a, x: a.set_query(x, ROW)),
    ("dynamic", "set_token", "i", lambda a, x: a.set_token(x, ROW, ROW, ROW)),
    ("dynamic", "delete_key", "c", lambda a, x: a.delete_key(x)),
    ("dynamic", "set_key_mask", "c", lambda a, x: a.set_key_mask(x, False)),
    ("dynamic", "delete_query", "i", lambda a, x: a.delete_query(x)),
    ("heads (3,)", "update_k", "head", lambda a, x: a.update_k(1, 1, 0.25, head=x)),
    ("heads (3,)", "update_v", "head", lambda a, x: a.update_v(1, 1, 0.25, head=x)),
    ("heads (3,)", "query", "head", lambda a, x: a.query(1, 1, head=x)),
    ("heads (3,)", "error_bound", "head", lambda a, x: a.error_bound(1, head=x)),
    ("heads (3, 4)", "query", "head[1]", lambda a, x: a.query(1, 1, head=(1, x))),
    ("heads (3, 4)", "update_k", "head[0]", lambda a, x: a.update_k(1, 1, 0.25, head=(x, 3))),
]
STRUCTURES = {
    "dynamic": lambda: _fresh(),
    "heads (3,)": lambda: _fresh(batch=(3,)),
    "heads (3, 4)": lambda: _fresh(batch=(3, 4)),
}


def _structures(where):
    return sorted(IMPLEMENTATIONS) if where == "any" else [where]


def _index_cases():
    return [
        pytest.param(structure, method, name, call, id=f"{structure}-{method}-{name}")
        for where, method, name, call in INDEX_CALLS
        for structure in _structures(where)
    ]


def _build(structure):
    return STRUCTURES[structure]() if structure in STRUCTURES else _fresh(structure)


def _same_answer(a, b):
    if a is None or isinstance(a, float):
        assert a == b
    else:
        np.testing.assert_array_equal(as_numpy(a), as_numpy(b))


@pytest.mark.parametrize("structure, method, name, call", _index_cases())
def test_integer_index_kinds_are_accepted_alike(structure, method, name, call):
    reference = _build(structure)
    expected = call(reference, 2)
    for kind in GOOD_INDEX_KINDS:
        if method == "set_token" and kind.startswith("0-d"):
            continue  # test_set_token_accepts_0d_indices
        att = _build(structure)
        _same_answer(expected, call(att, _good_index(kind, 2)))
        assert_same_state(state_of(reference), state_of(att))


@pytest.mark.parametrize("kind", [k for k in GOOD_INDEX_KINDS if k.startswith("0-d")])
def test_set_token_accepts_0d_indices(kind):
    # a 0-d array fails as a dict key (unhashable); a 0-d tensor becomes a slot-table key
    reference, att = _fresh(), _fresh()
    reference.set_token(2, ROW, ROW, ROW)
    att.set_token(_good_index(kind, 2), ROW, ROW, ROW)
    assert_same_state(state_of(reference), state_of(att))


@pytest.mark.parametrize("structure, method, name, call", _index_cases())
def test_non_integer_indices_are_rejected(structure, method, name, call):
    att = _build(structure)
    before = state_of(att)
    for kind, value in BAD_INDICES.items():
        # with a head axis, head=None is a missing head rather than a wrong kind of index
        missing = name == "head" and value is None
        expected = "an index into the leading axes" if missing else "an integer index"
        with pytest.raises(TypeError, match=f"^{re.escape(name)}: expected {expected}") as info:
            call(att, value)
        assert repr(value) in str(info.value), kind  # what was received
        assert_same_state(before, state_of(att))


@pytest.mark.parametrize("kind", GOOD_INDEX_KINDS)
def test_head_without_a_head_axis_is_none_or_zero(kind):
    att = _fresh()
    expected = att.query(1, 1)
    assert att.query(1, 1, head=None) == expected
    assert att.query(1, 1, head=_good_index(kind, 0)) == expected
    before = state_of(att)
    with pytest.raises(IndexError, match="^head=1 is out of range: this structure has no head axis"):
        att.update_k(1, 1, 0.25, head=_good_index(kind, 1))
    assert_same_state(before, state_of(att))


@pytest.mark.parametrize("bad", [0.0, np.float64(0), False, np.False_, np.array([0, 0]), "0", ()])
def test_head_without_a_head_axis_rejects_non_integers(bad):
    att = _fresh()
    before = state_of(att)
    with pytest.raises(TypeError, match="^head: expected an integer index"):
        att.update_k(1, 1, 0.25, head=bad)
    with pytest.raises(TypeError, match="^head: expected an integer index"):
        att.query(1, 1, head=bad)
    assert_same_state(before, state_of(att))


def test_head_on_a_head_axis_is_required_and_checked():
    att = _fresh(batch=(2, 3))
    before = state_of(att)
    with pytest.raises(TypeError, match=r"^head: expected an index into the leading axes \(2, 3\), got None"):
        att.update_k(1, 1, 0.25)
    with pytest.raises(IndexError, match="^head=6 is out of range"):
        att.update_k(1, 1, 0.25, head=np.int64(6))
    with pytest.raises(IndexError, match=r"^head\[1\]=3 is out of range"):
        att.update_k(1, 1, 0.25, head=(1, np.array(3)))
    with pytest.raises(IndexError, match="^head: expected a 2-tuple"):
        att.update_k(1, 1, 0.25, head=(1, 2, 0))
    assert_same_state(before, state_of(att))
    assert att.query(1, 1, head=(np.int32(1), np.array(2))) == att.query(1, 1, head=5)


# ------------------------------------------------------------------ index arrays

# (structure, method, argument name, call(att, x)); every index array is [2, 1]
ARRAY_CALLS = [
    ("any", "query_many", "rows", lambda a, x: a.query_many(x, [1, 0])),
    ("any", "query_many", "cols", lambda a, x: a.query_many([1, 0], x)),
    ("dynamic", "query_rows", "rows", lambda a, x: a.query_rows(x)),
    ("dynamic", "update_k_many", "rows", lambda a, x: a.update_k_many(x, [1, 0], [0.25, -0.25])),
    ("dynamic", "update_k_many", "cols", lambda a, x: a.update_k_many([1, 0], x, [0.25, -0.25])),
    ("dynamic", "update_v_many", "rows", lambda a, x: a.update_v_many(x, [1, 0], [0.25, -0.25])),
    ("dynamic", "update_v_many", "cols", lambda a, x: a.update_v_many([1, 0], x, [0.25, -0.25])),
    ("heads (3,)", "query_many", "heads", lambda a, x: a.query_many([1, 0], [1, 0], heads=x)),
    ("heads (3,)", "update_k_many", "heads", lambda a, x: a.update_k_many([1, 0], [1, 0], [0.5, 1], heads=x)),
    ("heads (3,)", "update_v_many", "heads", lambda a, x: a.update_v_many([1, 0], [1, 0], [0.5, 1], heads=x)),
]


def _good_array(kind):
    if kind == "tensor":
        return _torch().tensor([2, 1])
    return {
        "list": [2, 1],
        "tuple": (2, 1),
        "int64 array": np.array([2, 1]),
        "int32 array": np.array([2, 1], dtype=np.int32),
        "uint8 array": np.array([2, 1], dtype=np.uint8),
    }[kind]


GOOD_ARRAY_KINDS = ["list", "tuple", "int64 array", "int32 array", "uint8 array"] + (
    ["tensor"] if _torch() else []
)
BAD_ARRAYS = {
    "float list": ([2.0, 1.0], TypeError, "expected integer indices, got dtype float64"),
    "float array": (np.array([2.0, 1.0]), TypeError, "expected integer indices"),
    "bool mask": (
        np.array([True, False]),
        TypeError,
        "expected integer indices, got dtype bool.*np.flatnonzero",
    ),
    "bool list": ([True, False], TypeError, "expected integer indices, got dtype bool"),
    "strings": (["2", "1"], TypeError, "expected integer indices"),
    "None": (None, TypeError, "expected (integer|head) indices"),
    "0-d": (np.array(2), ValueError, r"expected a 1-D array of indices, got shape \(\)"),
    "scalar": (2, ValueError, "expected a 1-D array of indices"),
    "2-D": ([[2, 1]], ValueError, "expected a 1-D array of indices"),
}


def _array_cases():
    return [
        pytest.param(structure, name, call, id=f"{structure}-{method}-{name}")
        for where, method, name, call in ARRAY_CALLS
        for structure in _structures(where)
    ]


@pytest.mark.parametrize("structure, name, call", _array_cases())
def test_index_array_kinds_are_accepted_alike(structure, name, call):
    reference = _build(structure)
    expected = call(reference, [2, 1])
    for kind in GOOD_ARRAY_KINDS:
        att = _build(structure)
        _same_answer(expected, call(att, _good_array(kind)))
        assert_same_state(state_of(reference), state_of(att))


@pytest.mark.parametrize("structure, name, call", _array_cases())
def test_bad_index_arrays_are_rejected(structure, name, call):
    att = _build(structure)
    before = state_of(att)
    for value, error, message in BAD_ARRAYS.values():
        with pytest.raises(error, match=f"^{name}: {message}"):
            call(att, value)
        assert_same_state(before, state_of(att))


def test_float_and_bool_tensors_are_not_index_arrays():
    torch = pytest.importorskip("torch")
    att = _fresh()
    before = state_of(att)
    with pytest.raises(TypeError, match="^rows: expected integer indices, got dtype float32"):
        att.query_rows(torch.tensor([2.0, 1.0]))
    with pytest.raises(TypeError, match="^rows: expected integer indices, got dtype bool"):
        att.update_k_many(torch.tensor([True, False]), [0, 0], [0.1, 0.1])
    with pytest.raises(TypeError, match="^i: expected an integer index, got Tensor"):
        att.query(torch.tensor(2.0), 0)
    with pytest.raises(TypeError, match="^i: expected an integer index, got Tensor"):
        att.query(torch.tensor(True), 0)
    assert_same_state(before, state_of(att))


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    "options, python_options",
    [
        ({"certify": np.True_}, {"certify": True}),
        ({"certify": np.False_}, {"certify": False}),
        ({"certify": np.array(False)}, {"certify": False}),
        ({"causal": np.True_}, {"causal": True}),
        ({"causal": np.False_, "certify": np.True_}, {"causal": False, "certify": True}),
    ],
)
def test_numpy_bool_flags_are_accepted(options, python_options):
    att = DynamicAttention(*_problem(), **options)
    reference = DynamicAttention(*_problem(), **python_options)
    assert type(att._certify) is bool and type(att.causal) is bool
    assert_same_state(state_of(reference), state_of(att))


@pytest.mark.parametrize("name", ["certify", "causal"])
@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0, np.array([True])])
def test_non_bool_flags_are_rejected(name, bad):
    with pytest.raises(TypeError, match=f"^{name}: expected True or False") as info:
        DynamicAttention(*_problem(), **{name: bad})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("kind", ["bool", "np.bool_", "0-d array", "0-d tensor"])
def test_key_mask_visible_accepts_numpy_bools(kind):
    if kind == "0-d tensor":
        values = [pytest.importorskip("torch").tensor(v) for v in (False, True)]
    else:
        values = [{"bool": v, "np.bool_": np.bool_(v), "0-d array": np.array(v)}[kind] for v in (False, True)]
    reference, att = _fresh(), _fresh()
    for python, value in zip((False, True), values, strict=True):
        reference.set_key_mask(2, python)
        att.set_key_mask(2, value)
        assert_same_state(state_of(reference), state_of(att))
    assert type(att.key_mask[2].item()) is bool


@pytest.mark.parametrize("bad", [0, 1, "yes", None, np.array([False])])
def test_key_mask_visible_rejects_non_bools(bad):
    att = _fresh()
    before = state_of(att)
    with pytest.raises(TypeError, match="^visible: expected True or False"):
        att.set_key_mask(2, bad)
    assert_same_state(before, state_of(att))


def test_hardness_check_flag_follows_the_policy():
    M = np.eye(3, dtype=np.uint8)
    HintedMvViaAttention(M, M, tau=0.5, check=np.False_)
    with pytest.raises(TypeError, match="^check: expected True or False"):
        HintedMvViaAttention(M, M, tau=0.5, check=1)


# ---------------------------------------------------------------------- scalars and names
@pytest.mark.parametrize(
    "boundaries, interval, inside, outside",
    [
        ("both", "[0, 1]", [0, 0.5, 1], [-0.1, 1.1]),
        ("left", "[0, 1)", [0, 0.5], [1, -1e-300]),
        ("right", "(0, 1]", [1, 1e-300], [0, 1.5]),
        ("neither", "(0, 1)", [0.5], [0, 1]),
    ],
)
def test_check_scalar_states_the_interval(boundaries, interval, inside, outside):
    for value in inside:
        assert check_scalar("x", value, low=0, high=1, include_boundaries=boundaries) == value
    for value in outside:
        with pytest.raises(ValueError, match=f"^x: expected a number in {re.escape(interval)}, got"):
            check_scalar("x", value, low=0, high=1, include_boundaries=boundaries)


def test_check_scalar_half_bounded_and_kinds():
    assert check_scalar("x", np.float32(2.5), low=0) == 2.5
    assert type(check_scalar("x", np.int64(3))) is float
    with pytest.raises(ValueError, match=r"^x: expected a number in \[2, inf\), got 1$"):
        check_scalar("x", 1, low=2)
    with pytest.raises(ValueError, match=r"^x: expected a number in \(-inf, 0\.5\], got 0\.75$"):
        check_scalar("x", 0.75, high=0.5)
    with pytest.raises(ValueError, match=r"^x: expected a number in \(0\.6931471805599453, 1000000\]"):
        check_scalar("x", 0.5, low=math.log(2), high=1e6, include_boundaries="right")
    for bad in (float("nan"), float("inf"), -np.inf):
        with pytest.raises(ValueError, match="^x: expected a finite number"):
            check_scalar("x", bad, low=0)
    for bad in (True, np.True_, "1", None, [1.0], 1j):
        with pytest.raises(TypeError, match="^x: expected a real number"):
            check_scalar("x", bad)
    with pytest.raises(ValueError, match="^include_boundaries: expected one of 'both', 'left', 'right'"):
        check_scalar("x", 1, low=0, include_boundaries="closed")
    assert format_interval(None, None) == "(-inf, inf)"


def test_check_choice_lists_the_names():
    assert check_choice("storage", "dense", {"dense": 1, "implicit": 2}) == "dense"
    for bad in ("sparse", None, 1, "Dense"):
        with pytest.raises(ValueError, match="^storage: expected one of 'dense', 'implicit', got "):
            check_choice("storage", bad, {"dense": 1, "implicit": 2})


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: omega_rect(2.5), ValueError, r"^k: expected a number in \[0, 2\], got 2\.5"),
        (lambda: omega_rect(0.5, "nope"), ValueError, "^table: expected one of 'best', "),
        (lambda: update_exponent(0.5, "fast"), ValueError, "^multiplication: expected one of "),
        (lambda: query_exponent(1.5), ValueError, r"^tau: expected a number in \[0, 1\]"),
        (lambda: query_exponent(0.5, "tight"), ValueError, "^bound: expected one of 'structure', 'paper'"),
        (lambda: max_hint_nonzeros(4, 0), ValueError, r"^tau: expected a number in \(0, 1\], got 0$"),
        (lambda: make_progress(3, "fancy"), ValueError, "^mode: expected one of 'auto', 'rich'"),
        (lambda: resolve_dtype("float16"), ValueError, "^dtype: expected one of 'float64', 'float32'"),
        (lambda: BenchConfig.preset(regime="gpu"), ValueError, "^regime: expected one of 'paper', 'llm'"),
    ],
)
def test_module_functions_use_the_shared_checks(call, error, message):
    with pytest.raises(error, match=message):
        call()
