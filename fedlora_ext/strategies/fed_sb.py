"""Fed-SB (Singhal et al., "Fed-SB: a silver bullet for extreme communication efficiency and performance
in (private) federated LoRA fine-tuning", arXiv 2502.15436), over LoRA-SB (arXiv 2411.19557).

Each adapted layer's update is dW = s B R A with B [m, r] and A [r, n] fixed and identical on every client
and the server, and a trainable R [r, r]. Clients train R (and the head) only and upload R: r^2 numbers
per module, whatever the model's width. The server averages it, R = sum_k p_k R_k, p_k = n_k / n, which is
exact: sum_k p_k s B R_k A = s B (sum_k p_k R_k) A, because B and A are shared. The aggregate is an average
of same-shaped uploads, so DP-FedAvg and the server optimizers apply to R.

Shared initialisation. The paper sets B, R, A from a truncated SVD of a first full-gradient estimate on
training data; a server here holds no training data and may not use the clients' (that would make the
initialisation a function of private records outside any DP account). So B and A are random orthonormal
frames, derived from the run's shared seed and the module's name (B: orthonormal columns, A: orthonormal
rows, each the Q of a QR of a float64 Gaussian drawn on the CPU, so every party derives the same bits),
and R starts at 0 (dW = 0 at the start, as in plain LoRA). Orthonormal frames keep the paper's structure
(B and A are singular vectors there too), so s sigma(R) are exactly the singular values of dW. Nothing of
B or A goes on the wire; the server keeps them in its state (checkpointed, evaluated, exported).

Export: peft carries s B R A as an ordinary LoRA adapter with B' = B R (``adapters.fold_latent``).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies.base import Strategy, factor_kind, register


def orthonormal(rows: int, cols: int, seed: int) -> Tensor:
    """A float32 [rows, cols] matrix with orthonormal columns (rows >= cols) from ``seed``, float64 on the CPU."""
    gaussian = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(gaussian).Q.to(torch.float32)


def frame_seed(run_seed: int, name: str) -> int:
    """The seed of one fixed factor: a stable function of the run's seed and the tensor's name."""
    return zlib.crc32(f"fed_sb/{run_seed}/{name}".encode()) * 2654435761 % (2**63)


def shared_frame(tensors: dict[str, Tensor], run_seed: int) -> dict[str, Tensor]:
    """The fixed B (orthonormal columns) and A (orthonormal rows) of every module of ``tensors``."""
    frame = {}
    for name, t in tensors.items():
        kind = factor_kind(name)
        if kind == "lora_B":  # [m, r]
            frame[name] = orthonormal(t.shape[0], t.shape[1], frame_seed(run_seed, name)).to(t.device)
        elif kind == "lora_A":  # [r, n]
            frame[name] = orthonormal(t.shape[1], t.shape[0], frame_seed(run_seed, name)).T.contiguous().to(t.device)
    return frame


@register
class FedSB(Strategy):
    name = "fed_sb"
    averages_updates = True
    heterogeneous_ranks = False
    latent_factor = True

    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)  # R = 0 and the head as every party builds them
        self._frame = shared_frame(state.tensors, self.config.seed)
        state.tensors.update({n: t.clone() for n, t in self._frame.items()})
        return state

    def download(self, state: GlobalState, client, round_index: int):
        return {n: t.clone() for n, t in state.tensors.items() if factor_kind(n) in ("lora_R", "head")}

    def prepare(self, model, client, payload, round_index) -> None:
        # the fixed frame: every client derives it from the run's shared seed (kept once here)
        super().prepare(model, client, {**self._frame, **payload}, round_index)

    def trainable(self, round_index: int) -> dict[str, bool]:
        return {"A": False, "B": False, "R": True, "head": True}

    def upload_kinds(self, round_index: int) -> set[str]:
        return {"lora_R", "head"}
