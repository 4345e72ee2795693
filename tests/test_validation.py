"""Bad input: a clear error naming the argument, and nothing changed."""

import numpy as np
import pytest

from conftest import assert_same_state, state_of
from dynattn import DynamicAttention
from dynattn.baselines import BASELINES
from dynattn.testing import as_numpy, random_problem

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
    with pytest.raises(ValueError, match="K: logits"):
        DynamicAttention(Q * 1e160, K * 1e160, V)
    att = DynamicAttention(Q * 1e150, K, V)
    before = state_of(att)
    with pytest.raises(ValueError, match="delta: logits"):
        att.update_k(0, 0, 1e200)
    assert_same_state(before, state_of(att))


def test_integer_inputs_are_converted():
    Q = np.arange(6).reshape(3, 2)
    att = DynamicAttention(Q, Q[:2], np.ones((2, 1), dtype=np.int64))
    assert as_numpy(att.K).dtype == np.float64
    np.testing.assert_allclose(as_numpy(att.output()), 1.0)
