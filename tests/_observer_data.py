"""Shared test data for the observer / fake-quant tests: hypothesis strategies of float32 batches."""
import torch
from hypothesis import strategies as st


def _make(kind: str, seed: int, shape: tuple, scale: float, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    makers = {
        "normal": lambda: torch.randn(n, generator=g),
        "uniform": lambda: torch.rand(n, generator=g) * 2 - 1,
        "relu": lambda: torch.relu(torch.randn(n, generator=g)),
        "lognormal": lambda: torch.randn(n, generator=g).mul(2).exp(),
        "heavy": lambda: torch.randn(n, generator=g) ** 3,
        "constant": lambda: torch.full((n,), 0.37),
        "zeros": lambda: torch.zeros(n),
        "integers": lambda: torch.randint(-3, 4, (n,), generator=g).float(),
        "spikes": lambda: torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0),
    }
    x = makers[kind]()
    if kind not in ("zeros",):
        x = x * scale + shift
    return x.reshape(shape).to(torch.float32)


KINDS = ["normal", "uniform", "relu", "lognormal", "heavy", "constant", "zeros", "integers", "spikes"]


@st.composite
def batch_lists(draw, shape=None, max_batches=4, kinds=KINDS):
    """A list of 1..max_batches float32 tensors of one shape (drawn unless given)."""
    if shape is None:
        shape = draw(st.sampled_from([(1,), (7,), (2, 3, 5), (4, 16), (3, 2, 4, 4)]))
    count = draw(st.integers(1, max_batches))
    out = []
    for _ in range(count):
        kind = draw(st.sampled_from(kinds))
        seed = draw(st.integers(0, 2**16))
        scale = draw(st.sampled_from([1e-3, 1.0, 7.5, 1e3]))
        shift = draw(st.sampled_from([0.0, -2.0, 5.0]))
        out.append(_make(kind, seed, shape, scale, shift))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal float32 tensors (bit patterns), treating +0 and -0 as equal."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())
