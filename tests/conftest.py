import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")


def state_of(obj):
    """A deep copy of every attribute of ``obj`` (arrays, dicts, counters, storage) for equality checks."""
    state = {k: v for k, v in vars(obj).items() if k not in ("_buffers", "_storage")}
    state = copy.deepcopy(state)
    if hasattr(obj, "_buffers"):
        state["_buffers"] = {name: buffer.copy() for name, (_, buffer) in obj._buffers.items()}
    if hasattr(obj, "_storage"):
        state["_storage"] = copy.deepcopy(vars(obj._storage))
    return state


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
