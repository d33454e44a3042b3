"""Compressed data files (``my.csv.gz``, ``my.jsonl.zst``): the format is the suffix before the compression
suffix, and the file is decompressed into a temporary file with that suffix, which the ordinary reader then
reads (so the rows, and with them the content fingerprint, are those of the decompressed file).

gzip goes through the standard library; zstd through the first of ``compression.zstd`` (Python 3.14),
``zstandard`` or ``pyzstd`` that is installed, else one error line naming the file and what to install.
A corrupt or truncated file is one error line naming the file.
"""

from __future__ import annotations

import importlib
import shutil
import zlib
from pathlib import Path

#: compression suffixes and the name of their compression
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
#: the zstd modules tried, in order
ZSTD_MODULES = ("compression.zstd", "zstandard", "pyzstd")
_ZSTD_INSTALL = "pip install zstandard"


def split_suffix(path: Path) -> tuple[str, str | None]:
    """(the format suffix, lower case; the compression or None): ``a.CSV.gz`` -> (``.csv``, ``gzip``)."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), COMPRESSIONS[suffix]
    return suffix, None


def _zstd_open(path: Path, what: str):
    """A binary reader of the decompressed bytes of ``path``, through the first zstd module installed."""
    for name in ZSTD_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if name == "zstandard":  # all frames (a file may hold several), and the file closed with the reader
            return module.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return module.open(path, "rb")
    raise ValueError(f"{what}: file {str(path)!r} is zstd-compressed and no zstd module is installed; install one "
                     f"with: {_ZSTD_INSTALL} (or decompress it first: zstd -d {path.name})")


def decompress(path: Path, compression: str, target: Path, what: str) -> Path:
    """``path`` decompressed into ``target`` (written in 1 MiB chunks); returns ``target``.

    Raises:
        ValueError: no zstd module, or the file is not valid ``compression`` data (one line, naming it).
    """
    import gzip

    with open(target, "wb") as out:
        try:
            with gzip.open(path, "rb") if compression == "gzip" else _zstd_open(path, what) as source:
                shutil.copyfileobj(source, out, 1 << 20)
        except Exception as error:  # bad magic, bad CRC, a truncated stream; the zstd modules' ZstdError
            if not isinstance(error, (OSError, EOFError, zlib.error)) and type(error).__name__ != "ZstdError":
                raise
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{what}: file {str(path)!r} is not a valid {compression} file ({text})") from None
    return target
