"""Streaming least squares: the normal equations of ``Y ≈ X T`` over calibration tokens, in O(d^2) memory.

ReplaceMe (Shopkhoev et al., 2025) fits a linear map ``T`` (``d x d``) from one activation ``X`` to a
target ``Y``, both ``[tokens, d]``. The closed form needs only ``XᵀX`` and ``XᵀY``: each batch adds its
own products and is dropped, so host and device memory are ``2 d^2`` float64 numbers whatever the
calibration size (Llama-2-7B, d = 4096: 268 MB; a 70B, d = 8192: 1.07 GB), never the activations.

Precision. Each batch's products are computed in ``product_dtype`` (float64 by default, as the
released code does; float32 is the faster choice on accelerators without fast float64, at the cost of
the batch's sum-of-products rounding) and always *added* into float64 sums, so the rounding of many
batches never accumulates in a short mantissa. The solve runs in float64 (Cholesky of
``XᵀX + ridge * I``).

A singular system is refused with the reason and the fix, not solved into noise: fewer tokens than
``d`` can never determine ``T`` (``XᵀX`` has rank <= tokens), and a Cholesky failure means ``X`` spans
fewer than ``d`` directions (dead channels, duplicated features): more calibration text, or ``ridge > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SingularSystemError(ValueError):
    """The normal equations cannot determine ``T``; the message names the numbers and the fix."""


PRODUCT_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class NormalEquations:
    """Running ``XᵀX`` and ``XᵀY`` (float64) of a linear fit ``Y ≈ X T`` with ``X``, ``Y`` of width ``d``.

    ``add`` accepts any leading shape (``[batch, seq, d]`` or ``[tokens, d]``) in any floating dtype,
    on any device; the sums live on the device of the first batch until :meth:`solve` is called.
    """

    width: int
    product_dtype: torch.dtype = torch.float64
    tokens: int = 0
    xtx: torch.Tensor | None = field(default=None, repr=False)
    xty: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width={self.width} must be >= 1.")
        if self.product_dtype not in PRODUCT_DTYPES.values():
            raise ValueError(f"product_dtype={self.product_dtype} is not allowed: use torch.float64 or torch.float32.")

    def _flat(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tensor.shape[-1] != self.width:
            raise ValueError(f"{what} has width {tensor.shape[-1]}, but these normal equations are for width {self.width}.")
        return tensor.reshape(-1, self.width).to(self.product_dtype)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add the tokens of ``x`` (and their targets ``y``; None adds only to ``XᵀX``)."""
        flat = self._flat(x, "x")
        if self.xtx is None:
            self.xtx = torch.zeros(self.width, self.width, dtype=torch.float64, device=flat.device)
            self.xty = torch.zeros(self.width, self.width, dtype=torch.float64, device=flat.device)
        self.xtx += (flat.T @ flat).double()
        self.tokens += flat.shape[0]
        if y is not None:
            self.add_cross(x, y)

    @torch.no_grad()
    def add_cross(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add ``XᵀY`` only (tokens already counted by :meth:`add`): a target that arrives later than its input."""
        flat_x, flat_y = self._flat(x, "x"), self._flat(y, "y")
        if flat_x.shape[0] != flat_y.shape[0]:
            raise ValueError(f"x has {flat_x.shape[0]} tokens but y has {flat_y.shape[0]}; each input token needs its target.")
        if self.xty is None:
            raise ValueError("add_cross before any add: add the inputs first (they count the tokens and size the sums).")
        self.xty += (flat_x.T @ flat_y).double()

    def check_determined(self, ridge: float = 0.0, fix: str = "") -> None:
        """Raise :class:`SingularSystemError` when fewer tokens than ``d`` were added and there is no ridge."""
        if ridge <= 0 and self.tokens < self.width:
            raise SingularSystemError(
                f"{self.tokens} calibration tokens cannot determine a {self.width} x {self.width} linear map (X^T X has rank at most "
                f"{self.tokens} < {self.width}). {fix}".rstrip()
            )

    @torch.no_grad()
    def solve(self, ridge: float = 0.0, fix: str = "", inverse: bool = False) -> torch.Tensor:
        """``T = (XᵀX + ridge * I)^-1 XᵀY`` in float64 on the sums' device.

        ``inverse=True`` forms the explicit inverse first, as the released code does (``torch.linalg.inv``);
        the default solves by Cholesky, which is cheaper and, on a well-conditioned system, the same to
        float64 rounding.
        """
        if self.xtx is None:
            raise SingularSystemError(f"No tokens were added: the linear map is undetermined. {fix}".rstrip())
        self.check_determined(ridge, fix)
        system = self.xtx + ridge * torch.eye(self.width, dtype=torch.float64, device=self.xtx.device)
        if inverse:
            return torch.linalg.inv(system) @ self.xty
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) != 0:
            eigenvalues = torch.linalg.eigvalsh(system)
            raise SingularSystemError(
                f"X^T X + ridge*I is not positive definite (ridge={ridge}, {self.tokens} tokens, smallest eigenvalue "
                f"{float(eigenvalues[0]):.3g}, largest {float(eigenvalues[-1]):.3g}): the calibration activations span fewer "
                f"than {self.width} directions. {fix}".rstrip()
            )
        return torch.cholesky_solve(self.xty, factor)
