"""Uploaded adapter files -> a flat staged directory, safely.

An upload is either plain files or one .tar.gz / .tgz / .tar / .zip archive of them. Only the files an
adapter is made of are written; archive members that would escape the archive (absolute paths, '..',
links, devices) are refused; pickle files are never written, and refused when they would be the
weights; the bytes written are counted while copying, so an archive that inflates beyond the size
limit (a zip bomb) stops at the limit. An archive's members are counted too, and its headers are read
within a byte budget, so one of millions of empty members stops at the member limit instead of being
listed whole.
"""

from __future__ import annotations

import gzip
import lzma
import re
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

from loraplex.errors import ErrorKind, LoraplexError

ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
GZIP_TAR_SUFFIXES = (".tar.gz", ".tgz")
ARCHIVE_SUFFIXES = (*GZIP_TAR_SUFFIXES, ".tar", ".zip")
CHUNK = 1 << 20
# An adapter is two or three files (plus the directories and stray files a trainer leaves beside them);
# a thousand members is far beyond any real one, and reading that many headers costs milliseconds.
MAX_ARCHIVE_MEMBERS = 1000
# What a tar may add to its files' bytes: a 512-byte header and up to 511 bytes of padding per member,
# and the end-of-archive record. Inflated tar bytes beyond the size limit plus this are refused.
TAR_FRAMING_BYTES = MAX_ARCHIVE_MEMBERS * 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE
# A zip's central directory is read whole by zipfile before any member: it may hold at most this many
# bytes (46 fixed bytes per entry, then its name and extra fields: 512 is generous for an adapter's).
ZIP_DIRECTORY_MAX_BYTES = MAX_ARCHIVE_MEMBERS * 512
# The end-of-central-directory record: signature, disk numbers, entries on this disk and in all, the
# directory's size and offset, the comment's length (which is at most 65535 bytes, after the record).
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SEARCH_BYTES = _EOCD.size + 0xFFFF
# What a damaged, truncated or foreign file raises while it is read as an archive.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, lzma.LZMAError, EOFError,
                   NotImplementedError, RuntimeError)
_DRIVE = re.compile(r"^[A-Za-z]:")


class UploadError(LoraplexError):
    """An upload that cannot be staged: its field is `files`, its message names the offending part or
    member and the fix, its kind is INVALID, or TOO_LARGE past the size limit."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.INVALID) -> None:
        super().__init__("files", message, kind)


def stage_upload(parts: list[tuple[str, BinaryIO]], dest: Path, max_bytes: int) -> list[str]:
    """Write the adapter files of `parts` ((client filename, binary file) pairs) flat into `dest`, an
    existing empty directory. One part named *.tar.gz / *.tgz / *.tar / *.zip is unpacked. Returns the
    names that were ignored (files an adapter does not use). On UploadError, `dest` is to be discarded."""
    for filename, _ in parts:
        _check_part_name(filename)
    stager = _Stager(Path(dest), max_bytes)
    if len(parts) == 1 and _is_archive(parts[0][0]):
        _unpack(parts[0][0], parts[0][1], stager)
    else:
        for filename, src in parts:
            if _is_archive(filename):
                raise UploadError(f"'{filename}' is an archive sent along with other files; send the archive "
                                  "alone, or the adapter's files without an archive")
            if stager.wants(f"file '{filename}'", filename, filename):
                stager.write(filename, src)
    stager.check_complete()
    return stager.ignored


def _is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _check_part_name(filename: str) -> None:
    if filename in ("", ".", "..") or any(c in filename for c in "/\\\0"):
        raise UploadError(f"upload filename {filename!r} is not a plain file name; send each file under its "
                          "base name (e.g. adapter_config.json), without directories")


class _Stager:
    """The files written so far, the bytes they hold, and what was ignored."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.written = 0
        self.kept: set[str] = set()
        self.ignored: list[str] = []
        self.pickles: list[str] = []  # how messages name them

    def wants(self, what: str, name: str, file_name: str) -> bool:
        """Whether to write a file called `file_name` (`name` is what the upload calls it, `what` how
        messages name it); raises on a second file of the same name. Pickles (a Trainer's
        training_args.bin beside the adapter, say) are skipped unread."""
        if file_name.lower().endswith(PICKLE_SUFFIXES):
            self.pickles.append(what)
        if file_name not in ALLOWED_FILES:
            self.ignored.append(name)
            return False
        if file_name in self.kept:
            raise UploadError(f"{what}: the upload holds {file_name} twice; send exactly one of each file")
        return True

    def write(self, file_name: str, src: BinaryIO) -> None:
        """Copy `src` to dest/file_name in chunks, stopping as soon as the upload passes max_bytes."""
        self.kept.add(file_name)
        with open(self.dest / file_name, "xb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise _size_error(self.max_bytes)
                out.write(chunk)

    def check_complete(self) -> None:
        if "adapter_model.safetensors" not in self.kept and self.pickles:
            raise UploadError(f"{self.pickles[0]} is a pickle file, and the upload has no "
                              "adapter_model.safetensors; pickle files are never loaded (unpickling can run "
                              "arbitrary code): convert the weights to safetensors (e.g. with "
                              "safetensors.torch.save_file, or save_pretrained(safe_serialization=True))")
        missing = [name for name in REQUIRED_FILES if name not in self.kept]
        if missing:
            ignored = f" (ignored: {', '.join(self.ignored[:10])})" if self.ignored else ""
            raise UploadError(f"the upload lacks {' and '.join(missing)}{ignored}; a PEFT LoRA adapter is "
                              f"{' + '.join(REQUIRED_FILES)}, as save_pretrained writes them")


def _unpack(filename: str, src: BinaryIO, stager: _Stager) -> None:
    try:
        if filename.lower().endswith(".zip"):
            _unpack_zip(filename, src, stager)
        else:
            _unpack_tar(filename, src, stager)
    except UploadError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise UploadError(f"'{filename}' is not a valid .tar.gz/.zip archive: {e}; send a .tar.gz, .tar or .zip "
                          "of the adapter's files") from e


def _member_file_name(member: str) -> str:
    """The base name an archive member is kept under; raises if its path leaves the archive."""
    parts = re.split(r"[/\\]", member)
    if member.startswith(("/", "\\")) or _DRIVE.match(member) or ".." in parts:
        raise UploadError(f"archive member '{member}' escapes the archive (absolute path or '..'); pack the "
                          "adapter's files with relative paths")
    return parts[-1]


def _unpack_tar(filename: str, src: BinaryIO, stager: _Stager) -> None:
    # Read as a stream, member after member (tarfile lists each one it has read: the member limit bounds
    # that list). The gzip layer is opened here rather than by tarfile, which does not check the gzip
    # checksum; reading it to the end (after the tar's end marker) does. Every inflated byte (headers,
    # ignored members, trailing data) is read through the budget.
    gzipped = filename.lower().endswith(GZIP_TAR_SUFFIXES)
    with (gzip.GzipFile(fileobj=src, mode="rb") if gzipped else nullcontext(src)) as inflated:
        stream = _TarBudget(inflated, filename, stager.max_bytes)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for count, member in enumerate(tar, 1):
                _check_member_count(filename, count)
                file_name = _member_file_name(member.name)
                _check_tar_type(member)
                if member.isdir():
                    continue
                if stager.wants(f"archive member '{member.name}'", member.name, file_name):
                    stager.write(file_name, tar.extractfile(member))
        for _ in iter(lambda: stream.read(CHUNK), b""):
            pass


class _TarBudget:
    """The inflated tar stream, refused once more than the size limit plus TAR_FRAMING_BYTES of it has
    been read: files, ignored files, headers (long names and pax records included) and trailing data."""

    def __init__(self, stream: BinaryIO, filename: str, max_bytes: int) -> None:
        self.stream = stream
        self.filename = filename
        self.max_bytes = max_bytes
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.read_bytes += len(data)
        if self.read_bytes > self.max_bytes + TAR_FRAMING_BYTES:
            raise UploadError(f"'{self.filename}' holds more than the size limit of {self.max_bytes} bytes in "
                              f"files an adapter does not use and tar headers (beyond {TAR_FRAMING_BYTES} bytes "
                              "of headers); pack only adapter_config.json and adapter_model.safetensors",
                              ErrorKind.TOO_LARGE)
        return data


def _check_member_count(filename: str, count: int) -> None:
    if count > MAX_ARCHIVE_MEMBERS:
        raise UploadError(f"'{filename}' holds more than {MAX_ARCHIVE_MEMBERS} members; an adapter is a few "
                          "files: pack only adapter_config.json and adapter_model.safetensors (and "
                          "trainer_state.json)", ErrorKind.TOO_LARGE)


def _check_tar_type(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        raise UploadError(f"archive member '{member.name}' is a {kind} (to '{member.linkname}'); links are never "
                          "followed: pack the files themselves (e.g. tar --dereference)")
    if not (member.isfile() or member.isdir()):
        raise UploadError(f"archive member '{member.name}' is a device, fifo or other special file; pack only "
                          "the adapter's regular files")


def _unpack_zip(filename: str, src: BinaryIO, stager: _Stager) -> None:
    with _seekable(src, stager.max_bytes) as seekable:
        _check_zip_directory(filename, seekable)
        with zipfile.ZipFile(seekable) as archive:
            _unpack_zip_members(filename, archive, stager)


def _check_zip_directory(filename: str, seekable: BinaryIO) -> None:
    """Refuses a zip whose central directory (which zipfile reads whole, into one ZipInfo per entry)
    is over the limits, from its end record: one read of at most 64 KiB at the end of the file."""
    end = seekable.seek(0, 2)
    seekable.seek(max(0, end - _EOCD_SEARCH_BYTES))
    tail = seekable.read()
    seekable.seek(0)
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise zipfile.BadZipFile("no end-of-central-directory record")
    _, _, _, _, entries, directory_bytes, _, _ = _EOCD.unpack_from(tail, at)
    _check_member_count(filename, entries)  # Zip64 (0xFFFF entries) is refused here too
    if directory_bytes > ZIP_DIRECTORY_MAX_BYTES:
        raise UploadError(f"'{filename}' has a central directory of {directory_bytes} bytes, over the "
                          f"{ZIP_DIRECTORY_MAX_BYTES} an adapter's few files could need; pack only "
                          "adapter_config.json and adapter_model.safetensors", ErrorKind.TOO_LARGE)


def _unpack_zip_members(filename: str, archive: zipfile.ZipFile, stager: _Stager) -> None:
    # The end record's count may lie: count the entries that zipfile found in the (bounded) directory.
    _check_member_count(filename, len(archive.infolist()))
    for info in archive.infolist():
        file_name = _member_file_name(info.filename)
        _check_zip_type(info)
        if info.is_dir():
            continue
        if stager.wants(f"archive member '{info.filename}'", info.filename, file_name):
            with archive.open(info) as member:
                stager.write(file_name, member)


def _check_zip_type(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16  # unix st_mode, where the archiver recorded one
    if stat.S_ISLNK(mode):
        raise UploadError(f"archive member '{info.filename}' is a symbolic link; links are never followed: pack "
                          "the files themselves (e.g. zip without --symlinks)")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UploadError(f"archive member '{info.filename}' is a device, fifo or other special file; pack only "
                          "the adapter's regular files")


@contextmanager
def _seekable(src: BinaryIO, max_bytes: int) -> Iterator[BinaryIO]:
    """`src` itself when it can seek (zip reads its index at the end), else a temporary copy of it."""
    try:
        seekable = src.seekable()
    except AttributeError:  # SpooledTemporaryFile before Python 3.11 seeks but has no seekable()
        seekable = hasattr(src, "seek")
    if seekable:
        yield src
        return
    with tempfile.TemporaryFile() as copy:
        copied = 0
        for chunk in iter(lambda: src.read(CHUNK), b""):
            copied += len(chunk)
            if copied > max_bytes + CHUNK:  # the archive's own headers may add a little to the files
                raise _size_error(max_bytes)
            copy.write(chunk)
        copy.seek(0)
        yield copy


def _size_error(max_bytes: int) -> UploadError:
    return UploadError(f"upload exceeds the size limit of {max_bytes} bytes; upload a smaller adapter or start "
                       "the server with a larger --max-adapter-size", ErrorKind.TOO_LARGE)
