"""Orthonormal Hadamard matrices of the widths LLMs use: ``2^m``, ``2^m (q + 1)`` and ``2^m 2 (q + 1)`` for primes ``q``.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H Hᵀ = n I``; LinearPatch rotates the
residual stream by ``H / sqrt(n)`` so that a per-channel scale acts on spread-out channels. Orders:

- ``2^m``: Sylvester's construction, ``H_2m = [[H, H], [H, -H]]``;
- ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60, ...): Paley's first construction;
- ``2 (q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, 76, ...): Paley's second construction;
- and their Kronecker products with ``2^m``: 576 = 36 x 16 (SmolLM2-135M), 960 = 60 x 16, 5120 = 20 x 256,
  3072 = 12 x 256, 3584 = 28 x 128; 2048, 4096 and 8192 are powers of two.

Widths with no such factorisation (e.g. 100 x 2^m) raise :class:`HadamardError`; LinearPatch then
offers its diagonal form (``rotation: none``). Any Hadamard matrix of the right order serves the method
(they differ by signed permutations and the choice of block); a given matrix is not what another
implementation uses unless it is the same construction.
"""

from __future__ import annotations

import functools

import torch


class HadamardError(ValueError):
    """No construction here gives a Hadamard matrix of the requested order."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester(n: int) -> torch.Tensor:
    """The +-1 Sylvester matrix of order ``n`` (a power of two), float64."""
    if not _power_of_two(n):
        raise HadamardError(f"Sylvester's construction needs a power of two, got {n}.")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q) with ``chi`` the quadratic character (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def paley(order: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of ``order`` = ``q + 1`` (prime ``q ≡ 3 mod 4``) or ``2 (q + 1)`` (prime ``q ≡ 1 mod 4``)."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        jac = _jacobsthal(q)
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        jac = _jacobsthal(q)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, jac
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        blocks = torch.where(c[:, :, None, None] == 0, plus, minus) * torch.where(c == 0, 1.0, c)[:, :, None, None]
        return blocks.permute(0, 2, 1, 3).reshape(order, order)
    raise HadamardError(f"No Paley construction of order {order}.")


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix ``H / sqrt(n)`` of order ``n`` (float64, CPU): ``sylvester(2^m) ⊗ paley(K)``."""
    if n < 1:
        raise HadamardError(f"order {n} must be >= 1.")
    power = n & -n  # largest power of two dividing n
    for k in sorted({n // p for p in (power >> s for s in range(power.bit_length())) if n % p == 0}):
        if k == 1:
            core = torch.ones(1, 1, dtype=torch.float64)
        else:
            try:
                core = paley(k)
            except HadamardError:
                continue
        matrix = torch.kron(sylvester(n // k), core)
        return matrix / n**0.5
    raise HadamardError(
        f"No Hadamard matrix of order {n} is built here (orders 2^m, 2^m (q + 1) with prime q ≡ 3 mod 4, 2^m 2 (q + 1) with prime "
        "q ≡ 1 mod 4). Use compensate.rotation=none (LinearPatch's diagonal form) for this width."
    )
