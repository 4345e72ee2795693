"""Backend layer: registry, torch tensors in -> torch tensors out, SDPA as a second reference.

The whole suite already runs once per installed backend (conftest's autouse
``backend`` fixture); these tests check what is specific to backends. CUDA tests
are skipped cleanly when no GPU is present (torch.cuda is only asked inside the
tests, never at import time).
"""

import numpy as np
import pytest

from dynattn import DynamicAttention
from dynattn.backends import BACKENDS, resolve_backend, use_backend
from dynattn.baselines import BASELINES
from dynattn.testing import as_numpy, assert_attention_close, random_problem


@pytest.fixture(autouse=True)
def backend():
    """Here the backend follows the inputs (overrides conftest's per-backend runs)."""
    with use_backend("auto"):
        yield "auto"


def test_registry_lists_valid_names():
    assert set(BACKENDS) == {"numpy", "torch"}
    with pytest.raises(ValueError, match="backend: expected one of 'numpy', 'torch', 'auto', got 'jax'"):
        resolve_backend("jax")
    with pytest.raises(ValueError, match="backend: expected one of"):
        DynamicAttention(*random_problem(3, 3, 2, 2), backend="cupy")
    with pytest.raises(ValueError, match="backend: expected one of"):
        use_backend("tensorflow")


def test_auto_follows_numpy_inputs():
    att = DynamicAttention(*random_problem(4, 5, 2, 3))
    assert att.backend == "numpy"
    assert isinstance(att.output(), np.ndarray)


torch = pytest.importorskip("torch")


def devices():
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    return found


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("storage", ["dense", "implicit"])
def test_torch_tensors_in_tensors_out(device, dtype, storage):
    Q, K, V = (
        torch.from_numpy(x).to(device=device, dtype=dtype) for x in random_problem(9, 11, 4, 3, seed=1)
    )
    Q_before = Q.clone()
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.5, storage=storage)
    assert att.backend == "torch"
    out = att.output()
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device.type == device
    row = att.query_row(2)
    assert row.dtype == dtype and row.device.type == device and row.shape == (3,)
    many = att.query_many([0, 8], [2, 1])
    assert many.device.type == device
    att.update_k(3, 1, 0.25)
    att.set_value(4, torch.ones(3, dtype=dtype, device=device))
    assert isinstance(att.query(1, 1), float)
    K_now, V_now = as_numpy(att.K), as_numpy(att.V)
    assert_attention_close(
        as_numpy(att.output()), as_numpy(Q), K_now, V_now, scale=0.5, dtype=np.dtype(str(dtype)[6:])
    )
    assert torch.equal(Q, Q_before)  # the caller's tensor is untouched
    att._check()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(half):
    Q, K, V = (torch.from_numpy(x).to(half) for x in random_problem(6, 7, 4, 2, seed=2))
    att = DynamicAttention(Q, K, V)
    assert att.dtype == np.float32  # stored as float32
    out = att.output()
    assert out.dtype == half
    reference = torch.nn.functional.scaled_dot_product_attention(
        Q.double(), K.double(), V.double(), scale=1.0
    )
    tolerance = 1e-2 if half == torch.bfloat16 else 2e-3  # the half dtype's own rounding of O
    assert torch.allclose(out.double(), reference, atol=tolerance, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_agrees_after_token_edits(causal, dtype):
    """torch.nn.functional.scaled_dot_product_attention as an additional reference."""
    heads, n, d = 4, 33, 8
    rng = np.random.default_rng(3)
    Q, K, V = (torch.from_numpy(rng.standard_normal((heads, n, d))).to(dtype) for _ in range(3))
    att = DynamicAttention(Q, K, V, scale=d**-0.5, causal=causal, tau=0.5)
    for token in (0, 7, 32, 7):
        k = torch.from_numpy(rng.standard_normal((heads, d))).to(dtype)
        v = torch.from_numpy(rng.standard_normal((heads, d))).to(dtype)
        att.set_token(token, k=k, v=v)
        K[:, token], V[:, token] = k, v
        expected = torch.nn.functional.scaled_dot_product_attention(
            Q.double(), K.double(), V.double(), is_causal=causal, scale=d**-0.5
        )
        tolerance = 1e-12 if dtype == torch.float64 else 2e-6
        assert torch.allclose(att.output().double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_on_torch(name):
    Q, K, V = (torch.from_numpy(x) for x in random_problem(8, 9, 3, 2, seed=4))
    impl = BASELINES[name](Q, K, V, tau=0.5)
    assert impl.backend == "torch"
    impl.update_k(2, 1, 0.5)
    impl.update_v(3, 0, -0.5)
    K[2, 1] += 0.5
    V[3, 0] -= 0.5
    out = impl.output()
    assert isinstance(out, torch.Tensor)
    assert_attention_close(as_numpy(out), Q.numpy(), K.numpy(), V.numpy(), scale=1.0, dtype=np.float64)


def test_save_on_torch_load_on_numpy(tmp_path):
    Q, K, V = (torch.from_numpy(x) for x in random_problem(5, 6, 2, 3, seed=5))
    att = DynamicAttention(Q, K, V, tau=1.0)
    att.update_k(1, 0, 0.3)
    att.save(tmp_path / "s.npz")
    loaded = DynamicAttention.load(tmp_path / "s.npz", backend="numpy")
    assert loaded.backend == "numpy"
    np.testing.assert_allclose(loaded.output(), as_numpy(att.output()), atol=1e-14, rtol=0)
    again = DynamicAttention.load(tmp_path / "s.npz", backend="torch")
    assert again.backend == "torch" and isinstance(again.output(), torch.Tensor)


@pytest.mark.skipif("not torch.cuda.is_available()")
def test_cuda_state_stays_on_the_device():
    Q, K, V = (torch.randn(2, 64, 16, device="cuda") for _ in range(3))
    att = DynamicAttention(Q, K, V)
    for name, (_owner, _spec, buffer) in att._state._buffers.items():
        if hasattr(buffer, "device"):
            assert buffer.device.type == "cuda", name
    assert att.query_rows([1, 2]).device.type == "cuda"
