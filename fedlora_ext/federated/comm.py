"""Communication accounting: the exact bytes of what a method sends, tensor by tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes on the wire for a payload of tensors (values only, in their dtypes: indices included)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class CommLedger:
    """Bytes uploaded and downloaded, per round and per client."""

    rounds: list[dict[str, dict[int, int]]] = field(default_factory=list)

    def start_round(self) -> None:
        self.rounds.append({"up": {}, "down": {}})

    def record(self, direction: str, client: int, nbytes: int) -> None:
        current = self.rounds[-1][direction]
        current[client] = current.get(client, 0) + nbytes

    def round_total(self, direction: str, index: int = -1) -> int:
        return sum(self.rounds[index][direction].values())

    def total(self, direction: str) -> int:
        return sum(sum(r[direction].values()) for r in self.rounds)
