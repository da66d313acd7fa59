"""Writing files and directories safely: atomically, and never over what pangkas did not write.

Every writer of pangkas goes through here. A file appears whole or not at all (written to a
temporary name beside it, then renamed). An existing file or non-empty directory is refused
unless the caller passes ``overwrite``; even then a directory keeps every entry pangkas does not
write itself, and nothing is ever deleted. A target that contains the input is refused outright.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import OperationFailed, PangkasError

STAGING = ".pangkas-staging-"  # temporary siblings pangkas writes and renames: .<name><STAGING>XXXX


def staging_prefix(path: Path) -> str:
    """The name prefix of the temporary siblings pangkas writes for ``path``."""
    return f".{path.name}{STAGING}"


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_file_target(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``path`` as a Path, if a file may be written there; else PangkasError saying why."""
    path = Path(path)
    if path.is_dir():
        raise PangkasError(f"{path} is a directory; name a file to write")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise PangkasError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _check_parent(path)
    return path


def check_directory_target(path: str | os.PathLike, *, overwrite: bool = False,
                           inputs: Iterable[str | os.PathLike] = (), overwrite_input: bool = False,
                           copied_from: str | os.PathLike | None = None) -> Path:
    """``path`` as a Path, if pangkas may write a directory there: absent, empty, or with
    ``overwrite`` (only the entries pangkas writes are replaced). A directory that holds one of
    ``inputs`` is refused; the input directory itself only with ``overwrite_input``; one inside
    ``copied_from`` (whose entries are copied into it) always."""
    path = Path(path)
    resolved = path.resolve()
    if copied_from is not None and Path(copied_from).resolve() in resolved.parents:
        raise PangkasError(f"{path} is inside {copied_from}, whose files are copied into it; write elsewhere")
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source:
            if overwrite_input:
                return path
            raise PangkasError(f"{path} is the input; write elsewhere or pass overwrite_input=True "
                               "(CLI: --overwrite-input)")
        if _inside(source, resolved):
            raise PangkasError(f"{path} contains the input {source}; write somewhere else")
    if path.exists() and not path.is_dir():
        raise PangkasError(f"{path} exists and is not a directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise PangkasError(f"{path} is not empty; pass overwrite=True (CLI: --overwrite) to replace "
                           "the files pangkas writes there (nothing else is touched)")
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise PangkasError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PangkasError(f"cannot write {path}: no permission to write in {parent}")


def write_file(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; an existing file is replaced only with ``overwrite``."""
    return write_with(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def write_with(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """``write_file`` for a writer of its own (``write(temporary_path)``, e.g. safetensors'
    ``save_file``), so a large file need not be assembled in memory first."""
    path = check_file_target(path, overwrite=overwrite)
    with _failing_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=staging_prefix(path))
        os.close(fd)
        try:
            write(Path(tmp))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # after the writer, which may create the file anew: not private
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _place(Path(tmp), path, overwrite)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def pyplot():
    """matplotlib's pyplot, drawing off-screen (Agg); PangkasError if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PangkasError("plots need matplotlib: pip install matplotlib (or 'pangkas[demo]')") from exc
    return plt


def write_figure(figure, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a matplotlib figure like ``write_file`` (format from the suffix, PNG by default), then
    close it (written or not)."""
    try:
        check_file_target(path, overwrite=overwrite)
        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
        return write_file(path, buffer.getvalue(), overwrite=overwrite)
    finally:
        pyplot().close(figure)


@contextlib.contextmanager
def _failing_write(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OperationFailed(f"cannot write {path}: {exc.strerror or exc}") from exc


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``path``; without ``overwrite``, a file that appeared meanwhile is kept."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no window in which another file is clobbered
    except FileExistsError:
        raise PangkasError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise PangkasError(f"{path} already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, **target) -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; on success its contents are published
    to ``path`` (see ``publish``), on any failure it is removed and ``path`` is untouched.
    ``target``: the options of ``check_directory_target``, checked before and after the work."""
    path = check_directory_target(path, **target)
    with _failing_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=staging_prefix(path)))  # same disk
    try:
        yield staging
        check_directory_target(path, **target)  # the target may have changed while the work ran
        with _failing_write(path):
            publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, path: Path) -> None:
    """Move everything in ``staging`` to ``path``: one rename when ``path`` is absent or empty,
    else entry by entry, replacing only the entries ``staging`` has."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # empty: ours to replace in one atomic rename
    if not path.exists():
        staging.rename(path)
        return
    _check_mergeable(staging, path)
    _merge(staging, path)


def _check_mergeable(source: Path, target: Path) -> None:
    for item in source.iterdir():
        there = target / item.name
        if item.is_dir() and there.exists():
            if not there.is_dir() or there.is_symlink():
                raise PangkasError(f"{there} is in the way of a directory pangkas writes; move it away")
            _check_mergeable(item, there)
        elif there.is_dir() and not there.is_symlink():
            raise PangkasError(f"{there} is a directory in the way of a file pangkas writes; move it away")


def _merge(source: Path, target: Path) -> None:
    for item in source.iterdir():
        there = target / item.name
        if item.is_dir() and there.is_dir():
            _merge(item, there)
        else:
            os.replace(item, there)
