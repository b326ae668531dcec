"""qcompile.backends.hooked: reading a kernel library and its kernel list from an artifact."""
from __future__ import annotations

import json

import pytest

from qcompile.backends.hooked import load_library_bytes, read_kernel_files
from qcompile.errors import ArtifactError


def test_neither_file_means_no_kernels():
    assert read_kernel_files({"model.so": b""}, "lut", "k.so", "k.json", list) == ([], None)


def test_both_files_are_parsed():
    files = {"k.so": b"\x7fELF", "k.json": json.dumps({"kernels": [{"kernel": "a"}]}).encode()}
    rows, lib = read_kernel_files(files, "amx", "k.so", "k.json",
                                  lambda rows: [r["kernel"] for r in rows])
    assert rows == ["a"] and lib == b"\x7fELF"


@pytest.mark.parametrize("files,match", [
    ({"k.so": b""}, "has both k.so and k.json or neither"),
    ({"k.json": b"{}"}, "has both k.so and k.json or neither"),
    ({"k.so": b"", "k.json": b"not json"}, "k.json is corrupt"),
    ({"k.so": b"", "k.json": b'{"rows": []}'}, "k.json is corrupt"),
])
def test_half_or_corrupt_kernel_files_are_refused(files, match):
    with pytest.raises(ArtifactError, match=match) as e:
        read_kernel_files(files, "lut", "k.so", "k.json", list)
    assert e.value.hint is None or "--target lut" in e.value.hint


def test_library_bytes_are_loaded_from_a_file_that_then_goes():
    seen = []

    def load(path):
        seen.append(path)
        assert path.read_bytes() == b"lib"
        return "module"
    assert load_library_bytes(b"lib", "x.so", load, "qc-test-") == "module"
    assert seen[0].name == "x.so" and not seen[0].exists()
