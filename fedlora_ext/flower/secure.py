"""SecAgg+ (Bell et al., CCS'20) for one training round, driven over Flower's Message API.

The server runs the four stages of the protocol with ``grid.send_and_receive``; every node runs
Flower's own client side (``flwr.client.mod.secaggplus_mod``, wrapped by
:func:`fedlora_ext.flower.client_app.secure_train_mod`):

1. setup: each sampled node makes two key pairs and sends its public keys;
2. share keys: each node gets its neighbours' public keys (a ring of ``shares`` nodes around it) and
   sends each neighbour, encrypted for it, Shamir shares of its mask seed and of its first secret key;
3. collect masked vectors: the train message, plus the shares addressed to the node; the node trains,
   weights its upload, quantises it, adds its private mask and the pairwise masks and sends the sum;
4. unmask: every node that delivered a vector sends, for each neighbour, the share of its mask seed
   (it delivered) or of its secret key (it dropped after sharing keys); ``threshold`` shares rebuild
   either, so the masks cancel and only the sum is left.

The server learns the sum of the weighted, quantised uploads of the nodes that delivered a vector and
the sum of their weights, never one upload or one weight: :func:`secure_mean` returns their quotient.

Weights. Flower's client multiplies its update by ``q_k / T`` with ``q_k = round(n_k / max_weight * T)``
(T = ``quantization_range``). With ``max_weight = T / s``, ``s = T // max_k n_k``, q_k = s n_k exactly,
so the weights are proportional to the counts n_k (no rounding of the weights) and q_k / T <= 1.

Quantisation bound (:func:`quantization_bound`). Flower's ``quantize`` clips each weighted value to
[-c, c] (c = ``clipping_range``), maps it to (v + c) T / (2 c) and rounds *stochastically* to the
floor or the ceiling (``np.random``), so each value's error is below one step, 2 c / T; ``dequantize``
is exact in float64 (the client sends float64 values). Over the K nodes that delivered a vector, the
sum of the weighted values is off by less than K * 2 c / T, and dividing by the weight sum
sum_k q_k / T = s * sum_k n_k / T gives, for every value of the mean and as long as no value was
clipped (|x| <= c; the client logs any that was),

    |secure mean - exact weighted mean| < K * (2 c / T) / (s * sum_k n_k / T) = 2 c K / (s * sum_k n_k).

The sums live modulo 2**32; K * T < 2**32 keeps them from wrapping (checked every round).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedlora_ext.core.config import FedConfig

log = logging.getLogger("fedlora_ext.flower")

MODULUS = 2**32  # masks and sums live modulo this (Flower's default modulus_range)


class SecureAggregationError(RuntimeError):
    """Too few nodes are left for the protocol to rebuild the masks: the round has no aggregate."""


@dataclass(frozen=True)
class SecureSettings:
    """The protocol's parameters for a run (``FedConfig``'s ``secagg_*``) and the per-stage timeout."""

    shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    timeout: float | None = None

    @classmethod
    def of(cls, config: FedConfig, timeout: float | None = None) -> SecureSettings:
        return cls(config.secagg_shares, config.secagg_threshold, config.secagg_clipping_range,
                   config.secagg_quantization_range, timeout)


def weight_scale(quantization_range: int, counts: Mapping[int, int]) -> int:
    """s = T // max n_k: with max_weight = T / s every node's quantised weight is exactly s n_k."""
    largest = max(counts.values())
    if largest > quantization_range:
        raise SecureAggregationError(f"a client holds {largest} examples, more than secagg_quantization_range = "
                                     f"{quantization_range}; raise it")
    return quantization_range // largest


def quantization_bound(settings: SecureSettings, counts: Mapping[int, int], largest: int | None = None) -> float:
    """The largest error of any value of :func:`secure_mean` against the exact weighted mean of the
    uploads of the nodes ``counts`` (node -> n_k, those whose vectors were summed): 2 c K / (s sum n_k),
    s = T // ``largest`` (the largest n_k of the nodes sampled; default: of ``counts``)."""
    scale = weight_scale(settings.quantization_range, {0: largest or max(counts.values())})
    return 2 * settings.clipping_range * len(counts) / (scale * sum(counts.values()))


@dataclass
class SecureResult:
    """What a secure round leaves the server: the mean, who is in it, and the collect-stage replies
    (their update cleared by the node: only the records the node lets leave)."""

    mean: dict[str, np.ndarray]
    contributors: list[int]
    failed: dict[int, str]
    collect_messages: dict[int, Message]
    collect_replies: list[Message]
    bytes_up: dict[int, int]


@dataclass
class _Protocol:
    """The server's state of one run of the protocol (node ids are Flower's)."""

    settings: SecureSettings
    sampled: list[int]
    neighbours: dict[int, set[int]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared_keys: set[int] = field(default_factory=set)  # nodes whose key shares went out (step 2 done)
    delivered: dict[int, list[np.ndarray]] = field(default_factory=dict)  # node -> its masked vector
    failed: dict[int, str] = field(default_factory=dict)


def secure_mean(grid: Grid, trains: Mapping[int, Message], counts: Mapping[int, int],
                shapes: Mapping[str, tuple[int, ...]], settings: SecureSettings,
                after_stage: Callable[[str], None] | None = None) -> SecureResult:
    """Runs SecAgg+ over the train messages ``trains`` (node -> message): the weighted mean
    (weights ``counts``, node -> n_k) of the uploads, float64, names and shapes ``shapes`` (sorted by
    name, as the nodes send them). Raises SecureAggregationError when too few nodes are left.
    ``after_stage(stage)`` runs after the setup and share-keys stages (tests pause the server there)."""
    after_stage = after_stage or (lambda stage: None)
    sampled = sorted(trains)
    if len(sampled) < 2:
        raise SecureAggregationError(f"secure aggregation needs at least 2 sampled nodes, got {len(sampled)}")
    if len(sampled) * settings.quantization_range >= MODULUS:
        raise SecureAggregationError(f"{len(sampled)} nodes * secagg_quantization_range = "
                                     f"{settings.quantization_range} would wrap the sums modulo 2**32; lower it")
    protocol = _Protocol(settings, sampled)
    names = sorted(shapes)
    scale = weight_scale(settings.quantization_range, {n: counts[n] for n in sampled})
    _setup(grid, protocol, max_weight=settings.quantization_range / scale)
    after_stage(Stage.SETUP)
    forwarded = _share_keys(grid, protocol)
    after_stage(Stage.SHARE_KEYS)
    collect_messages, replies, bytes_up = _collect(grid, protocol, trains, forwarded,
                                                   [(1,)] + [tuple(shapes[n]) for n in names])
    total = _unmask(grid, protocol)
    factor, values = int(total[0][0]), total[1:]
    delivered = len(protocol.delivered)
    c, t = settings.clipping_range, settings.quantization_range
    summed = dequantize(values, c, t)  # sum_k q_k 2c/T - c, float64
    mean = {name: (v - (delivered - 1) * c) * (t / factor) for name, v in zip(names, summed)}
    return SecureResult(mean, sorted(protocol.delivered), protocol.failed, collect_messages, replies, bytes_up)


# ---- the four stages -------------------------------------------------------------------------------
def _exchange(grid: Grid, protocol: _Protocol, messages: dict[int, Message], stage: str) -> dict[int, Message]:
    """Sends ``messages`` (node -> message) and returns the good replies by node; a node that fails or
    does not answer within the timeout is noted in ``protocol.failed`` and left out from then on."""
    replies = grid.send_and_receive(list(messages.values()), timeout=protocol.settings.timeout)
    # a reply names the message it answers (the grid gave each its id); an error may come from the SuperLink
    by_id = {message.metadata.message_id: node for node, message in messages.items()}
    good: dict[int, Message] = {}
    for reply in replies:
        node = by_id.get(reply.metadata.reply_to_message_id)
        if node is None or node in good:
            continue
        if reply.has_error():
            protocol.failed[node] = f"stage {stage}: {reply.error.reason}"
            continue
        if RECORD_KEY_CONFIGS not in reply.content.config_records:
            protocol.failed[node] = f"stage {stage}: the reply has no {RECORD_KEY_CONFIGS!r} record"
            continue
        good[node] = reply
    for node in messages:
        if node not in good and node not in protocol.failed:
            protocol.failed[node] = f"stage {stage}: no reply within the timeout"
    for node, reason in protocol.failed.items():
        if node in messages and node not in good:
            log.warning("secure aggregation: node %s left the round at %s", node, reason)
    return good


def _message(node: int, record: dict, content: RecordDict | None = None) -> Message:
    content = content if content is not None else RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(record)
    return Message(content, node, MessageType.TRAIN)


def _check_neighbours(protocol: _Protocol, alive: set[int], stage: str) -> None:
    """Every node still in the protocol needs ``threshold`` live neighbours (itself included)."""
    needed = protocol.settings.threshold
    short = {node: len(protocol.neighbours[node] & alive) for node in alive
             if len(protocol.neighbours[node] & alive) < needed}
    if not alive or short:
        raise SecureAggregationError(
            f"after stage {stage}, {len(alive)} of {len(protocol.sampled)} sampled nodes are left and "
            + (f"nodes {sorted(short)} have {min(short.values())} live neighbours, " if short else "")
            + f"fewer than secagg_threshold = {needed}; failures: {protocol.failed}")


def _setup(grid: Grid, protocol: _Protocol, max_weight: float) -> None:
    settings, sampled = protocol.settings, protocol.sampled
    half = min(settings.shares, len(sampled)) >> 1
    shares = min(2 * half + 1, len(sampled))  # a ring of 2 half + 1 nodes around each (all when fewer)
    if settings.threshold > shares:
        raise SecureAggregationError(f"secagg_threshold = {settings.threshold} exceeds the {shares} shares of "
                                     f"{len(sampled)} sampled nodes (secagg_shares = {settings.shares})")
    ring = list(sampled)
    random.SystemRandom().shuffle(ring)  # a fresh ring every round, as Flower's own workflow draws it
    protocol.neighbours = {node: {ring[(i + d) % len(ring)] for d in range(-half, half + 1)}
                           for i, node in enumerate(ring)}
    record = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(sampled), Key.SHARE_NUMBER: shares,
              Key.THRESHOLD: settings.threshold, Key.CLIPPING_RANGE: float(settings.clipping_range),
              Key.TARGET_RANGE: int(settings.quantization_range), Key.MOD_RANGE: MODULUS,
              Key.MAX_WEIGHT: float(max_weight)}
    replies = _exchange(grid, protocol, {n: _message(n, dict(record)) for n in sampled}, Stage.SETUP)
    for node, reply in replies.items():
        keys = reply.content.config_records[RECORD_KEY_CONFIGS]
        protocol.public_keys[node] = (bytes(keys[Key.PUBLIC_KEY_1]), bytes(keys[Key.PUBLIC_KEY_2]))
    _check_neighbours(protocol, set(protocol.public_keys), Stage.SETUP)


def _share_keys(grid: Grid, protocol: _Protocol) -> dict[int, tuple[list[int], list[bytes]]]:
    """Broadcasts the public keys; returns, per node, the (sources, ciphertexts) addressed to it."""
    alive = set(protocol.public_keys)
    messages = {}
    for node in alive:
        record = {str(n): list(protocol.public_keys[n]) for n in protocol.neighbours[node] & alive}
        messages[node] = _message(node, {**record, Key.STAGE: Stage.SHARE_KEYS})
    replies = _exchange(grid, protocol, messages, Stage.SHARE_KEYS)
    protocol.shared_keys = set(replies)
    forwarded: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in replies}
    for source, reply in replies.items():
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        for destination, ciphertext in zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST], strict=True):
            if destination in forwarded and destination in protocol.neighbours[source]:
                forwarded[destination][0].append(source)
                forwarded[destination][1].append(ciphertext)
    _check_neighbours(protocol, protocol.shared_keys, Stage.SHARE_KEYS)
    return forwarded


def _collect(grid: Grid, protocol: _Protocol, trains: Mapping[int, Message],
             forwarded: dict[int, tuple[list[int], list[bytes]]], shapes: list[tuple[int, ...]]):
    """The train messages with the shares for each node; keeps each well-formed masked vector."""
    messages = {}
    for node, (sources, ciphertexts) in forwarded.items():
        content = RecordDict(dict(trains[node].content.items()))
        record = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: sources}
        messages[node] = _message(node, record, content)
    replies = _exchange(grid, protocol, messages, Stage.COLLECT_MASKED_VECTORS)
    bytes_up = {}
    for node, reply in replies.items():
        chunks = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        try:
            vector = [bytes_to_ndarray(chunk) for chunk in chunks]
            if [v.shape for v in vector] != shapes or any(v.dtype.kind not in "iu" for v in vector):
                raise ValueError(f"shapes {[v.shape for v in vector]}, expected integer arrays of {shapes}")
        except Exception as error:  # noqa: BLE001 - a malformed vector is left out, its masks removed
            protocol.failed[node] = f"stage {Stage.COLLECT_MASKED_VECTORS}: malformed masked vector: {error}"
            log.warning("secure aggregation: node %s: %s", node, protocol.failed[node])
            continue
        protocol.delivered[node] = [v.astype(np.int64) for v in vector]
        bytes_up[node] = sum(len(chunk) for chunk in chunks)
    _check_neighbours(protocol, set(protocol.delivered), Stage.COLLECT_MASKED_VECTORS)
    return messages, [replies[n] for n in sorted(replies)], bytes_up


def _unmask(grid: Grid, protocol: _Protocol) -> list[np.ndarray]:
    """Gathers the shares, rebuilds the masks and returns the unmasked sum (mod 2**32)."""
    delivered = set(protocol.delivered)
    dropped = protocol.shared_keys - delivered  # their pairwise masks are in the others' vectors
    messages = {node: _message(node, {Key.STAGE: Stage.UNMASK,
                                      Key.ACTIVE_NODE_ID_LIST: sorted(protocol.neighbours[node] & delivered),
                                      Key.DEAD_NODE_ID_LIST: sorted(protocol.neighbours[node] & dropped)})
                for node in delivered}
    replies = _exchange(grid, protocol, messages, Stage.UNMASK)
    shares: dict[int, list[bytes]] = {node: [] for node in delivered | dropped}
    for reply in replies.values():
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True):
            if owner in shares:
                shares[owner].append(share)
    short = sorted(owner for owner, got in shares.items() if len(got) < protocol.settings.threshold)
    if short:
        raise SecureAggregationError(f"stage {Stage.UNMASK}: fewer than secagg_threshold = "
                                     f"{protocol.settings.threshold} shares came back for nodes {short}; "
                                     f"failures: {protocol.failed}")
    vectors = list(protocol.delivered.values())
    total = [sum(parts) % MODULUS for parts in zip(*vectors)]
    shapes = [v.shape for v in total]
    for owner, got in shares.items():
        secret = combine_shares(got)
        if owner in delivered:  # the seed of its private mask
            total = [t - m for t, m in zip(total, pseudo_rand_gen(secret, MODULUS, shapes))]
            continue
        for peer in protocol.neighbours[owner] & delivered:  # its first secret key: the pairwise masks
            key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(protocol.public_keys[peer][0]))
            mask = pseudo_rand_gen(key, MODULUS, shapes)
            # the peer added the mask when its id is the larger one, else subtracted it: undo that
            sign = -1 if peer > owner else 1
            total = [t + sign * m for t, m in zip(total, mask)]
    return [t % MODULUS for t in total]
