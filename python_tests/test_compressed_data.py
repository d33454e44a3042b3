"""Compressed data files (issue 26, item 6): ``my.csv.gz``, ``my.jsonl.zst`` are read as the file they
decompress to, so their content fingerprints (and tokens) are those of the uncompressed file, which
test_data_pipeline.py pins; a corrupt file, a missing zstd module or a compressed file that does not name
its format is one error line naming the file.

zstd is read through ``compression.zstd`` / ``zstandard`` / ``pyzstd``; where none is installed (this
machine: Python 3.11, no zstandard) the real round trip is skipped and the plumbing is tested with a
stand-in module that reads gzip through zstandard's API.
"""

from __future__ import annotations

import gzip
import importlib
import sys
import types

import pytest

from fedtools import fedlora
from fedlora_ext.app.cli import main
from fedlora_ext.data.compressed import ZSTD_MODULES, decompress, split_suffix
from fedlora_ext.data.sources import looks_like_path
from fedlora_ext.data.task import build_task
from test_data_pipeline import CASES, GOLDEN, tokens_digest

TINY_RUN = ["--model", "tiny-bert", "--rounds", "1", "--clients", "2", "--no-dp", "--iid", "--set", "local_steps=1",
            "--set", "seq_len=16", "--set", "batch_size=8", "--quiet"]
#: the pinned cases that read one text file, and that file's name
FILE_CASES = {"user csv": "my.csv", "user sft jsonl": "sft.jsonl", "user txt": "docs.txt",
              "user documents jsonl": "docs.jsonl"}


def zstd_module():
    """The first zstd module installed (each has ``compress``), or None."""
    for name in ZSTD_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    return None


def compressed_config(case: str, tmp_path, suffix: str, write):
    """The pinned case's config, its data file replaced by ``write(bytes)``'s compressed copy (the plain
    file removed, so nothing can read it)."""
    config = CASES[case](tmp_path)
    plain = tmp_path / FILE_CASES[case]
    assert config.dataset == str(plain)
    packed = tmp_path / (plain.name + suffix)
    packed.write_bytes(write(plain.read_bytes()))
    plain.unlink()
    return config.replace(dataset=str(packed))


class _FakeZstandard(types.ModuleType):
    """zstandard's reading API over gzip data: ZstdDecompressor().stream_reader(file, closefd=True)."""

    class ZstdError(Exception):
        pass

    class ZstdDecompressor:
        def stream_reader(self, handle, read_across_frames=False, closefd=True):
            assert read_across_frames and closefd  # a multi-frame file read whole, the file closed
            handle.close()  # the real reader owns the file it is given; this stand-in reopens it by name
            return gzip.open(handle.name, "rb")


@pytest.fixture
def fake_zstd(monkeypatch):
    importlib.import_module("datasets")  # it probes for zstandard when first imported: let it see the real one

    for name in ZSTD_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "zstandard", _FakeZstandard("zstandard"))


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_a_gzip_file_has_the_fingerprint_and_tokens_of_the_file_it_decompresses_to(case, tmp_path):
    task = build_task(compressed_config(case, tmp_path, ".gz", gzip.compress))
    assert (task.fingerprint, tokens_digest(task), task.eval_split, list(task.notes)) == GOLDEN[case]


def test_a_zstd_file_read_through_the_zstandard_api_has_the_fingerprint_of_its_content(tmp_path, fake_zstd):
    task = build_task(compressed_config("user csv", tmp_path, ".zst", gzip.compress))
    assert task.fingerprint == GOLDEN["user csv"][0]


@pytest.mark.skipif(zstd_module() is None, reason="no zstd module installed (compression.zstd, zstandard, pyzstd)")
def test_a_real_zstd_file_has_the_fingerprint_of_its_content(tmp_path):
    task = build_task(compressed_config("user sft jsonl", tmp_path, ".zst", zstd_module().compress))
    assert task.fingerprint == GOLDEN["user sft jsonl"][0]


def test_different_contents_give_different_fingerprints(tmp_path):
    first = build_task(compressed_config("user csv", tmp_path, ".gz", gzip.compress))
    (tmp_path / "other").mkdir()
    changed = compressed_config("user csv", tmp_path / "other", ".gz",
                                lambda data: gzip.compress(data.replace(b"review 3 ", b"review three ")))
    assert build_task(changed).fingerprint != first.fingerprint


def test_the_gzip_header_does_not_enter_the_fingerprint(tmp_path):
    """The same content compressed with another level and timestamp (other bytes) is the same data."""
    one = build_task(compressed_config("user csv", tmp_path, ".gz", lambda d: gzip.compress(d, 9, mtime=1)))
    (tmp_path / "again").mkdir()
    two = compressed_config("user csv", tmp_path / "again", ".gz", lambda d: gzip.compress(d, 1, mtime=2))
    assert build_task(two).fingerprint == one.fingerprint == GOLDEN["user csv"][0]


def test_the_format_is_the_suffix_before_the_compression_suffix(tmp_path):
    assert split_suffix(tmp_path / "a.CSV.GZ") == (".csv", "gzip")
    assert split_suffix(tmp_path / "a.b.jsonl.zst") == (".jsonl", "zstd")
    assert split_suffix(tmp_path / "a.csv") == (".csv", None)
    assert looks_like_path("reviews.csv.gz") and looks_like_path("docs.jsonl.zst")
    assert not looks_like_path("org/name")


def cli_error(argv, capsys) -> str:
    code = main(["run", *TINY_RUN, *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedlora: error:"), lines
    return lines[0]


def test_a_corrupt_or_truncated_gzip_file_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(b"text,label\nnot gzip at all\n")
    line = cli_error(["--dataset", str(bad), "--out", str(tmp_path / "r1")], capsys)
    assert repr(str(bad)) in line and "is not a valid gzip file" in line, line
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzip.compress(b"text,label\n" + b"a b c,pos\n" * 500)[:-20])
    line = cli_error(["--dataset", str(cut), "--out", str(tmp_path / "r2")], capsys)
    assert repr(str(cut)) in line and "is not a valid gzip file" in line, line


def test_without_a_zstd_module_a_zst_file_is_one_line_naming_it_and_what_to_install(tmp_path, capsys, monkeypatch):
    for name in ZSTD_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    packed = tmp_path / "data.jsonl.zst"
    packed.write_bytes(b"\x28\xb5\x2f\xfd not really")
    line = cli_error(["--dataset", str(packed), "--out", str(tmp_path / "r")], capsys)
    assert repr(str(packed)) in line and "no zstd module is installed" in line
    assert "pip install zstandard" in line


def test_a_compressed_file_must_name_its_format(tmp_path, capsys):
    packed = tmp_path / "data.gz"
    packed.write_bytes(gzip.compress(b"text,label\na,pos\n"))
    line = cli_error(["--dataset", str(packed), "--out", str(tmp_path / "r")], capsys)
    assert "a gzip file must name its format before '.gz'" in line and "'(none)'" in line


def test_a_bad_byte_in_a_gzip_file_names_the_compressed_file(tmp_path, capsys):
    packed = tmp_path / "latin.csv.gz"
    packed.write_bytes(gzip.compress("text,label\ncaf\u00e9 ok,pos\n".encode("latin-1")))
    line = cli_error(["--dataset", str(packed), "--out", str(tmp_path / "r")], capsys)
    assert f"file {str(packed)!r} (decompressed) is not valid utf-8 text: byte 0xe9" in line, line


def test_decompress_refuses_a_corrupt_file_in_one_line(tmp_path):
    bad = tmp_path / "x.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="is not a valid gzip file") as refused:
        decompress(bad, "gzip", tmp_path / "out.csv", f"dataset {str(bad)!r}")
    assert len(str(refused.value).splitlines()) == 1


def test_fedlora_run_trains_on_a_gzip_csv(tmp_path):
    """The CLI as a user types it, from another folder, on ``reviews.csv.gz``."""
    rows = "".join(f"review {i} {'great fine' if i % 2 else 'awful bad'},{'pos' if i % 2 else 'neg'}\n"
                   for i in range(40))
    (tmp_path / "reviews.csv.gz").write_bytes(gzip.compress(("text,label\n" + rows).encode()))
    done = fedlora("run", *TINY_RUN, "--dataset", "reviews.csv.gz", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "reviews.csv.gz (32 train / 8 test, 2 labels)" in done.stdout, done.stdout
