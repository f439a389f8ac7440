"""Hessians of a linear layer's reconstruction loss, and the checks every solver shares.

Convention of the reference GPTQ: for inputs x_1..x_n (one row per token),
H = 2/n * sum_t x_t x_t^T, so that ||W X - Q X||^2 / n = tr((W-Q) H (W-Q)^T) / 2.
"""

from __future__ import annotations

import torch

from luq.errors import LuqError


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over activation batches, kept in float64 on `device`."""

    def __init__(self, n_features: int, device: torch.device | str | None = None):
        self.n_features = n_features
        self._sum = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations shaped [..., n_features] (every leading index is a token)."""
        if x.shape[-1] != self.n_features:
            raise LuqError(f"activations have {x.shape[-1]} features, the Hessian expects {self.n_features}")
        x = x.reshape(-1, self.n_features).to(self._sum.device, torch.float64)
        self._sum.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n * sum x x^T in float32 (zeros before any batch)."""
        if self.n_tokens == 0:
            return self._sum.float()
        return (self._sum * (2.0 / self.n_tokens)).float()

    def take(self) -> torch.Tensor:
        """`hessian`, computed in place of the float64 sums, which are given up (no float64
        temporary: for a 5504-wide input that is 242 MB less at the peak)."""
        total, self._sum = self._sum, None
        if self.n_tokens:
            total.mul_(2.0 / self.n_tokens)
        return total.float()


def reconstruction_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) = 2/n ||D X||^2 for a weight difference D (float64 sum, no [out, out] temporary)."""
    return ((D.float() @ H.float()) * D.float()).sum(dtype=torch.float64).item()


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||W X - Q X||^2 / ||W X||^2 over the calibration tokens behind H."""
    return reconstruction_error(W - Q, H) / reconstruction_error(W, H)


def check_problem(W: torch.Tensor, H: torch.Tensor, solver: str) -> None:
    """One clear LuqError for any (W, H) a solver cannot take."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise LuqError(f"{solver}: the weight must be a 2-D tensor [out, in], got {shape}")
    if not W.is_floating_point():
        raise LuqError(f"{solver}: the weight must be floating point, got {W.dtype}")
    cols = W.shape[1]
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or tuple(H.shape) != (cols, cols):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise LuqError(f"{solver}: the Hessian must be [{cols}, {cols}] for a weight with {cols} columns, got {shape}")
    if W.numel() == 0:
        raise LuqError(f"{solver}: the weight is empty {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise LuqError(f"{solver}: the weight contains NaN or inf")
    if not torch.isfinite(H).all():
        raise LuqError(f"{solver}: the Hessian contains NaN or inf")
    Hf = H.float()
    scale = Hf.abs().max().clamp_min(1e-30)
    if (Hf - Hf.T).abs().max() > 1e-4 * scale:
        raise LuqError(f"{solver}: the Hessian is not symmetric (max |H - H^T| = {(Hf - Hf.T).abs().max().item():.3g})")
    if (torch.diagonal(Hf) < 0).any():
        raise LuqError(f"{solver}: the Hessian has negative diagonal entries; it must be 2/n * sum x x^T")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead columns and relative damping, as the reference GPTQ does them.

    Returns float32 copies (W, H) and the boolean mask of dead columns: a column whose
    input was always zero (H_jj = 0) gets H_jj = 1 and its weights set to 0, since no
    input ever reads them. Then H += damp * mean(diag H) * I.
    """
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp * torch.mean(torch.diagonal(H))
    return W, H, dead


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, solver: str) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), the form GPTQ's updates read.

    If H is too ill-conditioned for Cholesky, the damping is raised tenfold up to
    three times before giving up with a clear error.
    """
    diag = torch.arange(H.shape[0], device=H.device)
    extra = damp * torch.mean(torch.diagonal(H))
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L  # [cols, cols] each: at most two of them alive at once
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info.item() == 0:
                return U
        H = H.clone()
        extra = extra * 10
        H[diag, diag] += extra
    raise LuqError(f"{solver}: the Hessian is not positive definite even after raising the damping; "
                   "is the calibration set large enough for this layer's width?")
