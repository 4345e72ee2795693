import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from dynattn.testing import as_numpy, reference_attention, value_scale

settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")


def pytest_addoption(parser):
    """``--fuzz-long[=FACTOR]``: the long (soak) profile of tests/test_fuzz.py."""
    parser.addoption(
        "--fuzz-long",
        action="store",
        nargs="?",
        type=int,
        const=4,
        default=1,
        metavar="FACTOR",
        help="tests/test_fuzz.py: multiply sequences, steps and hypothesis examples by FACTOR (default 4)",
    )


def state_of(obj):
    """A deep copy of every attribute of ``obj`` (arrays, dicts, counters, the whole state of a
    DynamicAttention) for equality checks."""
    skip = {"_state", "_storage", "_xp"}
    if hasattr(obj, "_state"):
        skip |= {"_Q", "_K", "_V"}  # views of the state's arrays
    state = {k: _host(v) for k, v in vars(obj).items() if k not in skip}
    state = copy.deepcopy(state)
    if hasattr(obj, "_state"):
        arrays, numbers = obj._state.export()
        state["_state"] = {"arrays": arrays, "numbers": copy.deepcopy(numbers)}
    return state


def _host(value):
    """numpy copy of a torch tensor (state comparisons), anything else unchanged."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy().copy()
    return value


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        _assert_equal(before[key], after[key], key)


def _assert_equal(a, b, where):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        assert np.array_equal(a, b, equal_nan=True), f"{where} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif hasattr(a, "__dict__") and not callable(a):
        _assert_equal(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), f"{where} changed: {a!r} -> {b!r}"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _available_backends():
    names = ["numpy"]
    try:
        import torch  # noqa: F401

        names.append("torch")
    except ImportError:
        pass
    return names


BACKEND_NAMES = _available_backends()


@pytest.fixture(autouse=True, params=BACKEND_NAMES)
def backend(request):
    """Every test runs once per installed backend (numpy always; torch when installed):
    structures built without ``backend=`` use this one."""
    from dynattn.backends import use_backend

    with use_backend(request.param):
        yield request.param


#: Rates for tau="auto" in tests: fixed (not measured), so that the policy's decisions
#: are the same on every machine; tests that need other decisions set their own.
TEST_RATES = (2e10, 5e9, 2e-6)


@pytest.fixture(autouse=True)
def policy_rates():
    """Every test runs with :data:`TEST_RATES`, restored afterwards whatever it set."""
    from dynattn import policy

    with policy.use_rates(policy.Rates(*TEST_RATES)):
        yield


def assert_rows_certified(att, Q, K, V, *, mask=None):
    """Every row of every head of ``att`` against the extended-precision reference of
    ``Q, K, V: (H, n, d)`` (float64 copies of its inputs, heads flattened), each row's
    measured error within its ``error_bound``."""
    for h in range(Q.shape[0]):
        reference = reference_attention(Q[h], K[h], V[h], scale=att._scale, mask=mask, precise=True)
        scale = value_scale(V[h])
        for i in range(Q.shape[1]):
            answer = as_numpy(att.query_row(i)).reshape(Q.shape[0], -1)[h].astype(np.float64)
            err = np.abs(answer - reference[i]) / scale
            bound = att.error_bound(i, head=h if att.batch_shape else None)
            assert np.all(err <= bound), (h, i, err.max(), bound)
