"""Array backends: where the structure's state lives and its arithmetic runs.

The structure is written once against the small set of operations below; a
backend maps them onto one array library. Backends are chosen by name
(``backend="numpy" | "torch" | "auto"``), held in the plain registry
:data:`BACKENDS`, and imported lazily: ``torch`` is imported only when the torch
backend is asked for (or ``"auto"`` sees a torch tensor). ``"auto"`` picks the
backend of the input arrays.

Bookkeeping (which rows are pending, masks, positions, per-column error
bounds) always stays in host numpy arrays; the n-sized state (weights,
snapshot, stabilizers, drift bounds, the inputs and their float64 copies)
lives in the backend's arrays, on its device.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from dynattn._validation import check_choice


class NumpyBackend:
    """numpy arrays on the host (always available)."""

    name = "numpy"
    float64 = np.float64
    device = "cpu"

    def __init__(self, device: Any = None):
        if device not in (None, "cpu"):
            raise ValueError(f"device: the numpy backend runs on the CPU, got {device!r}")

    # creation and conversion
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def asarray(self, value: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(value, dtype=dtype)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def astype(self, value: np.ndarray, dtype: Any) -> np.ndarray:
        return value.astype(dtype)

    def copy(self, value: np.ndarray) -> np.ndarray:
        return value.copy()

    def storage_dtype(self, dtype: np.dtype) -> Any:
        return dtype

    def dtypes_for(self, dtype: Any, example: Any) -> tuple[Any, Any]:
        """(storage dtype, output dtype or None for "the storage dtype") for ``dtype=``."""
        return (np.float64 if dtype is None else dtype), None

    def shares_memory(self, a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.shares_memory(a, b))

    def unit_roundoff(self, dtype: Any) -> float:
        """Half the machine epsilon of ``dtype``: the relative rounding of a returned answer."""
        return float(np.finfo(dtype).eps) / 2

    def public(self, array: np.ndarray) -> np.ndarray:
        """A read-only view of a state array handed to the user."""
        view = array.view()
        view.flags.writeable = False
        return view

    def nbytes(self, array: np.ndarray) -> int:
        return int(array.nbytes)

    # math
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    isfinite = staticmethod(np.isfinite)
    einsum = staticmethod(np.einsum)

    def where(self, condition: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(condition, a, b)

    def exp_(self, value: np.ndarray) -> np.ndarray:
        """``exp`` in place (no temporary of the operand's size); returns ``value``."""
        return np.exp(value, out=value)

    def fill_where_not_(self, value: np.ndarray, keep: np.ndarray, fill: float) -> None:
        """``value[~keep] = fill`` in place (``keep``: a host boolean array broadcastable to it)."""
        np.copyto(value, fill, where=~keep)

    def maximum_(self, target: np.ndarray, other: Any) -> None:
        """``target = max(target, other)`` in place."""
        np.maximum(target, other, out=target)

    def matmul_into(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``a @ b`` written into ``out`` (a reused buffer: no fresh memory to fault in)."""
        return np.matmul(a, b, out=out)

    def amax(self, value: np.ndarray, axis: int) -> np.ndarray:
        return value.max(axis=axis)

    def sum(self, value: np.ndarray, axis: int) -> np.ndarray:
        return value.sum(axis=axis)

    def swap_last(self, value: np.ndarray) -> np.ndarray:
        """Transpose the last two axes (a view)."""
        return np.swapaxes(value, -1, -2)

    def move_to_front(self, value: np.ndarray, axis: int) -> np.ndarray:
        return np.moveaxis(value, axis, 0)

    def nonzero(self, value: Any) -> tuple[np.ndarray, ...]:
        """Indices of the true entries, as host int64 arrays."""
        return np.nonzero(value)

    def index(self, value: np.ndarray) -> np.ndarray:
        """A host index array in the form this backend indexes with."""
        return value

    def sync(self) -> None:
        """Wait for queued device work (benchmarks)."""


class TorchBackend:
    """torch tensors on ``device`` (the inputs' device under ``"auto"``).

    float32 and float64 state; float16/bfloat16 inputs are stored as float32
    (outputs are returned in the inputs' dtype). The float64 working copies and
    the snapshot are float64 on the device, as with numpy.
    """

    name = "torch"

    def __init__(self, device: Any = None):
        self.torch = torch = importlib.import_module("torch")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.float64 = torch.float64

    _DTYPES = {"float32": "float32", "float64": "float64", "bool": "bool", "int64": "int64"}

    def _dtype(self, dtype: Any) -> Any:
        if dtype is None or isinstance(dtype, self.torch.dtype):
            return dtype
        return getattr(self.torch, np.dtype(dtype).name if np.dtype(dtype) != bool else "bool")

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)

    def asarray(self, value: Any, dtype: Any = None) -> Any:
        if isinstance(value, np.ndarray):
            value = self.torch.from_numpy(np.ascontiguousarray(value))
        return self.torch.as_tensor(value, dtype=self._dtype(dtype), device=self.device)

    def to_numpy(self, value: Any) -> np.ndarray:
        torch = self.torch
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.dtype in (torch.float16, torch.bfloat16):
                value = value.float()
            return value.cpu().numpy()
        return np.asarray(value)

    def astype(self, value: Any, dtype: Any) -> Any:
        """A new tensor of ``dtype``, as numpy's ``astype`` (``.to`` alone returns the tensor
        itself when the dtype already matches, and callers may write into the result)."""
        return value.to(self._dtype(dtype), copy=True)

    def copy(self, value: Any) -> Any:
        return value.clone()

    def storage_dtype(self, dtype: np.dtype) -> Any:
        return self._dtype(dtype)

    def dtypes_for(self, dtype: Any, example: Any) -> tuple[Any, Any]:
        """Storage dtype (numpy name) and output dtype: float32/float64 tensors keep
        their dtype; float16/bfloat16 are stored as float32 and answered in their dtype."""
        torch = self.torch
        wanted = dtype
        if wanted is None:
            if not isinstance(example, torch.Tensor):
                return np.float64, None
            wanted = example.dtype
        if isinstance(wanted, torch.dtype):
            if wanted in (torch.float16, torch.bfloat16):
                return np.float32, wanted
            if wanted in (torch.float32, torch.float64):
                return str(wanted).removeprefix("torch."), None
            raise TypeError(f"dtype: expected float32 or float64 (or float16/bfloat16 inputs), got {wanted}")
        return wanted, None

    def shares_memory(self, a: Any, b: Any) -> bool:
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())

    def unit_roundoff(self, dtype: Any) -> float:
        """Half the machine epsilon of ``dtype`` (a torch dtype or a numpy one)."""
        return float(self.torch.finfo(self._dtype(dtype)).eps) / 2

    def public(self, array: Any) -> Any:
        """A copy of a state tensor handed to the user (tensors have no read-only flag)."""
        return array.clone()

    def nbytes(self, array: Any) -> int:
        return int(array.element_size() * array.numel())

    def exp(self, value: Any) -> Any:
        return self.torch.exp(value)

    def log(self, value: Any) -> Any:
        return self.torch.log(value)

    def sqrt(self, value: Any) -> Any:
        return self.torch.sqrt(value)

    def abs(self, value: Any) -> Any:
        return self.torch.abs(value)

    def isfinite(self, value: Any) -> Any:
        return self.torch.isfinite(value)

    def einsum(self, spec: str, *operands: Any) -> Any:
        return self.torch.einsum(spec, *operands)

    def exp_(self, value: Any) -> Any:
        return value.exp_()

    def fill_where_not_(self, value: Any, keep: np.ndarray, fill: float) -> None:
        hidden = self.torch.from_numpy(np.ascontiguousarray(~keep)).to(value.device)
        value.masked_fill_(hidden, fill)

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        torch = self.torch
        if isinstance(condition, np.ndarray):
            condition = torch.from_numpy(np.array(condition, dtype=bool)).to(self.device)
        reference = a if isinstance(a, torch.Tensor) else b
        a = (
            a
            if isinstance(a, torch.Tensor)
            else torch.as_tensor(a, dtype=reference.dtype, device=self.device)
        )
        b = (
            b
            if isinstance(b, torch.Tensor)
            else torch.as_tensor(b, dtype=reference.dtype, device=self.device)
        )
        return torch.where(condition, a, b)

    def maximum_(self, target: Any, other: Any) -> None:
        if not isinstance(other, self.torch.Tensor):
            other = self.torch.as_tensor(other, dtype=target.dtype, device=target.device)
        self.torch.maximum(target, other, out=target)

    def matmul_into(self, a: Any, b: Any, out: Any) -> Any:
        return self.torch.matmul(a, b, out=out)

    def amax(self, value: Any, axis: int) -> Any:
        return self.torch.amax(value, dim=axis)

    def sum(self, value: Any, axis: int) -> Any:
        return self.torch.sum(value, dim=axis)

    def swap_last(self, value: Any) -> Any:
        return value.transpose(-1, -2)

    def move_to_front(self, value: Any, axis: int) -> Any:
        return self.torch.movedim(value, axis, 0)

    def nonzero(self, value: Any) -> tuple[np.ndarray, ...]:
        if isinstance(value, np.ndarray):
            return np.nonzero(value)
        return tuple(x.cpu().numpy() for x in self.torch.nonzero(value, as_tuple=True))

    def index(self, value: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(value)).to(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


#: Backends by name; each is imported only when it is used.
BACKENDS: dict[str, type[NumpyBackend] | type[TorchBackend]] = {
    "numpy": NumpyBackend,
    "torch": TorchBackend,
}


#: Backend used when ``backend=None`` is passed (``"auto"``: the inputs' array type).
_default = {"name": "auto"}


class use_backend:
    """Context manager (and setter) for the default backend: ``with use_backend("torch"): ...``."""

    def __init__(self, name: str):
        resolve_backend(name)  # validate now
        self._previous = _default["name"]
        _default["name"] = name

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        _default["name"] = self._previous


def is_torch_tensor(value: Any) -> bool:
    """True for a torch tensor, without importing torch when it is not loaded."""
    module = type(value).__module__
    return module.startswith("torch") and type(value).__name__ in ("Tensor", "Parameter")


def resolve_backend(name: str | None, *arrays: Any, device: Any = None) -> NumpyBackend | TorchBackend:
    """The backend called ``name``; ``"auto"`` picks torch when any input is a torch tensor;
    ``None`` is the default set by :class:`use_backend` (``"auto"`` unless changed)."""
    if name is None:
        name = _default["name"]
    check_choice("backend", name, (*BACKENDS, "auto"))
    tensors = [a for a in arrays if is_torch_tensor(a)]
    if name == "auto":
        name = "torch" if tensors else "numpy"
    if name == "torch":
        if device is None and tensors:
            device = tensors[0].device
        try:
            return TorchBackend(device)
        except ImportError as exc:
            raise ImportError(
                "backend='torch' needs PyTorch: pip install 'dynattn[torch]' "
                "(on these machines: pip install torch==2.13.0)"
            ) from exc
    return NumpyBackend(device)
