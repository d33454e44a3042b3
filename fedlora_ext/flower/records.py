"""Tensors and configurations as Flower records: payloads travel as ArrayRecords, never pickles.

An :class:`~flwr.app.Array` holds a NumPy ``.npy`` image written and read with ``allow_pickle=False``;
bfloat16, which NumPy lacks, travels as its raw little-endian bytes under our own ``stype``. Decoding
checks that every entry is an Array whose declared dtype and shape match its bytes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.validation import RejectedUpdate

_RAW = "fedlora.torch_raw"  # stype of a tensor NumPy cannot hold (bfloat16): its bytes, little-endian
_RAW_DTYPES = {"bfloat16": torch.bfloat16}


def to_arrays(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord of CPU copies of ``tensors``, keys and order kept."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype in _RAW_DTYPES.values():
            raw = tensor.view(torch.uint16).numpy()
            data = raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
            record[name] = Array(dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(tensor.shape),
                                 stype=_RAW, data=data)
        else:
            record[name] = Array(tensor.numpy())
    return record


def from_arrays(record) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord; anything that is not a well-formed Array raises RejectedUpdate."""
    if not isinstance(record, ArrayRecord):
        raise RejectedUpdate(f"expected an ArrayRecord of tensors, got {type(record).__name__}")
    out = {}
    for name, array in record.items():
        out[name] = _to_tensor(name, array)
    return out


def _to_tensor(name: str, array) -> Tensor:
    if not isinstance(array, Array):
        raise RejectedUpdate(f"entry {name!r} is a {type(array).__name__}, expected an Array")
    shape = tuple(int(d) for d in array.shape)
    if array.stype == _RAW and array.dtype in _RAW_DTYPES:
        dtype = _RAW_DTYPES[array.dtype]
        expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if len(array.data) != expected:
            raise RejectedUpdate(f"entry {name!r}: {len(array.data)} bytes for {array.dtype}{list(shape)}, expected {expected}")
        raw = np.frombuffer(array.data, dtype="<u2").astype(np.uint16)
        return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)
    try:
        values = array.numpy()  # np.load(allow_pickle=False): object arrays are refused
    except Exception as error:  # malformed bytes from a peer: a rejection, not a crash
        raise RejectedUpdate(f"entry {name!r} could not be decoded: {error}") from None
    if tuple(values.shape) != shape or str(values.dtype) != array.dtype:
        raise RejectedUpdate(f"entry {name!r} declares {array.dtype}{list(shape)} but holds "
                             f"{values.dtype}{list(values.shape)}")
    if values.dtype.byteorder == (">" if sys.byteorder == "little" else "<"):
        values = values.astype(values.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(values).copy())
    except TypeError as error:  # a dtype torch has no tensor for (strings, datetimes)
        raise RejectedUpdate(f"entry {name!r} has dtype {values.dtype}, which is not a tensor dtype: {error}") from None


def config_record(config: FedConfig, **extra) -> ConfigRecord:
    """The run's configuration for a node (JSON; the node runs exactly the server's) and scalars."""
    return ConfigRecord({"fedlora.config": json.dumps(config.to_dict()), **extra})


def config_from_record(record) -> FedConfig:
    if not isinstance(record, ConfigRecord) or "fedlora.config" not in record:
        raise ValueError("message: expected a ConfigRecord 'config' with the run's 'fedlora.config'")
    return FedConfig.from_dict(json.loads(record["fedlora.config"]))
