"""Real English text for the language-model benchmarks: Jane Austen's six novels.

Debian packages them (``r-cran-janeaustenr``, the R package janeaustenr) as an R lazy-load
database: one zlib stream per novel, each a serialised R character vector of the book's lines.
This reads those streams directly (no R needed, nothing executed: only strings are decoded). The
package is found installed, in a cache directory, or fetched there with ``apt-get download`` and
unpacked with ``dpkg-deb``.

    python benchmarks/corpus.py            # prints each novel's size
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

PACKAGE = "r-cran-janeaustenr"
DATABASE = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
CACHE = Path.home() / ".cache" / "pangkas-benchmarks"
# The order the database stores them in (alphabetical by R object name).
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_STRSXP, _CHARSXP = 16, 9


def database() -> Path:
    """The installed database, or the one unpacked in the cache (fetched if missing)."""
    installed = Path("/") / DATABASE
    if installed.exists():
        return installed
    cached = CACHE / PACKAGE / DATABASE
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, check=True, capture_output=True)
        deb = max(CACHE.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE / PACKAGE)], check=True)
    return cached


def _streams(raw: bytes) -> list[bytes]:
    """The database's zlib streams, each after its 4-byte length, in file order."""
    out, pos = [], 0
    while pos < len(raw):
        inflater = zlib.decompressobj()
        out.append(inflater.decompress(raw[pos + 4:]))
        pos = len(raw) - len(inflater.unused_data)
    return out


def _lines(blob: bytes) -> list[str]:
    """A serialised R character vector (XDR format, version 3) as Python strings."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR-serialised R object")
    pos = 2 + 12  # format, then three version ints
    (encoding_length,) = struct.unpack_from(">i", blob, pos)
    pos += 4 + encoding_length
    flags, count = struct.unpack_from(">ii", blob, pos)
    if flags & 0xFF != _STRSXP:
        raise ValueError("not a character vector")
    pos += 8
    lines = []
    for _ in range(count):
        flags, length = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if flags & 0xFF != _CHARSXP:
            raise ValueError("malformed character vector")
        if length >= 0:  # -1: NA
            lines.append(blob[pos:pos + length].decode("utf-8"))
            pos += length
    return lines


def novels() -> dict[str, str]:
    """Each novel's text (lines joined by newlines, blank lines kept as paragraph breaks)."""
    blobs = _streams(database().read_bytes())
    if len(blobs) != len(NOVELS):
        raise ValueError(f"expected {len(NOVELS)} novels in {PACKAGE}, found {len(blobs)}")
    return {name: "\n".join(_lines(blob)) for name, blob in zip(NOVELS, blobs)}


if __name__ == "__main__":
    for name, text in novels().items():
        print(f"{name}: {len(text):,} characters; opens: {text[:60]!r}")
