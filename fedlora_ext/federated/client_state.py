"""A client's state as plain data: tensors plus a JSON-friendly dict, and back.

Where a client's state must outlive a process (a Flower node between messages, a checkpoint) it is
stored as tensors (safetensors, Flower ArrayRecords) and JSON, never pickled. The noise key is in the
dict only when ``secret=True``: the owner's own storage, never anything that is sent.
"""

from __future__ import annotations

from typing import Any

from fedlora_ext.core.state import ClientState
from fedlora_ext.dp.accountant import PrivacyAccount
from fedlora_ext.dp.sgd import ClientPrivacy, NoiseStream

_TRANSIENT = ("a2_masks",)  # set by local_update and consumed by upload within one round


def client_meta(client: ClientState, *, secret: bool) -> dict[str, Any]:
    """Everything but the tensors: id, rank, example count, info and, when private, the account and
    the stream's offset (and its key only with ``secret``)."""
    meta: dict[str, Any] = {"cid": client.cid, "rank": client.rank, "num_examples": client.num_examples,
                            "info": {k: v for k, v in client.info.items() if k not in _TRANSIENT}}
    if client.privacy is not None:
        account = client.privacy.account
        meta["privacy"] = {"accountant": account.accountant, "delta": account.delta,
                           "noise_multiplier": account.noise_multiplier, "sample_rate": account.sample_rate,
                           "history": [list(h) for h in account.history], "offset": client.privacy.noise.offset,
                           "max_grad_norm": client.privacy.max_grad_norm, "target_epsilon": account.target_epsilon,
                           "population": account.population, "delta_rule": account.delta_rule}
        if secret:
            meta["privacy"]["seed"] = client.privacy.noise.seed
    return meta


def restore_client(meta: dict[str, Any], tensors: dict, *, seed: int | None = None) -> ClientState:
    """The inverse of :func:`client_meta` with the client's tensors; the key comes from the meta or
    ``seed`` (a private client without either cannot continue: its stream would restart)."""
    client = ClientState(cid=int(meta["cid"]), rank=int(meta["rank"]), num_examples=int(meta["num_examples"]),
                         tensors=dict(tensors), info=dict(meta.get("info", {})))
    privacy = meta.get("privacy")
    if privacy is not None:
        key = privacy.get("seed", seed)
        if key is None:
            raise ValueError(f"client {client.cid}: its noise key is missing; a private client cannot resume without it")
        account = PrivacyAccount(accountant=privacy["accountant"], delta=float(privacy["delta"]),
                                 noise_multiplier=float(privacy["noise_multiplier"]),
                                 sample_rate=float(privacy["sample_rate"]),
                                 history=[(float(s), float(q), int(n)) for s, q, n in privacy["history"]],
                                 target_epsilon=None if privacy.get("target_epsilon") is None else float(privacy["target_epsilon"]),
                                 population=None if privacy.get("population") is None else int(privacy["population"]),
                                 delta_rule=str(privacy.get("delta_rule", "given")))
        client.privacy = ClientPrivacy(account=account, noise=NoiseStream(int(key), int(privacy["offset"])),
                                       max_grad_norm=float(privacy["max_grad_norm"]))
    return client
