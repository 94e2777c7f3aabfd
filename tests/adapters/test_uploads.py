"""Staging uploads: plain files and .tar.gz / .tgz / .tar / .zip archives become a flat directory of the
adapter's files; traversal, links, special files, pickles, damaged archives and oversized (or
inflating) uploads, and archives of too many members or too many header bytes, are refused with an
UploadError that names the culprit."""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from loraplex.adapters_store.uploads import (
    MAX_ARCHIVE_MEMBERS,
    PICKLE_SUFFIXES,
    ZIP_DIRECTORY_MAX_BYTES,
    UploadError,
    stage_upload,
)
from loraplex.errors import ErrorKind

CONFIG = b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
WEIGHTS = os.urandom(200_000)  # incompressible, so damage to a compressed archive lands in its data
ADAPTER = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
MiB = 1 << 20


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "staged"
    path.mkdir()
    return path


def staged_files(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def staged_bytes(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.iterdir())


def plain(files: dict[str, bytes]) -> list[tuple[str, io.BytesIO]]:
    return [(name, io.BytesIO(data)) for name, data in files.items()]


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", extra: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    """A tar of `files` (member path -> data; a path ending in "/" is a directory) plus `extra` headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path.rstrip("/"))
            if path.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes], extra: tuple[zipfile.ZipInfo, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        for info in extra:
            archive.writestr(info, b"target")
    return buf.getvalue()


def under(prefix: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {prefix + name: data for name, data in files.items()}


def test_plain_files(dest: Path) -> None:
    parts = plain({**ADAPTER, "README.md": b"# hi", "trainer_state.json": b"{}"})
    assert stage_upload(parts, dest, max_bytes=MiB) == ["README.md"]
    assert staged_files(dest) == {**ADAPTER, "trainer_state.json": b"{}"}


@pytest.mark.parametrize(("suffix", "mode"), [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_tar_with_members_under_directories(dest: Path, suffix: str, mode: str) -> None:
    members = {"my-adapter/": b"", "my-adapter/inner/": b"", "my-adapter/adapter_config.json": CONFIG,
               "my-adapter/inner/adapter_model.safetensors": WEIGHTS, "my-adapter/README.md": b"# hi"}
    ignored = stage_upload([("adapter" + suffix, io.BytesIO(tar_bytes(members, mode)))], dest, max_bytes=MiB)
    assert ignored == ["my-adapter/README.md"]
    assert staged_files(dest) == ADAPTER


def test_zip_with_members_under_a_directory(dest: Path) -> None:
    data = zip_bytes({"out/": b"", **under("out/", ADAPTER), "out/README.md": b"# hi"})
    assert stage_upload([("adapter.zip", io.BytesIO(data))], dest, max_bytes=MiB) == ["out/README.md"]
    assert staged_files(dest) == ADAPTER


def test_zip_from_a_stream_that_cannot_seek(dest: Path) -> None:
    class Stream(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return self.inner.readinto(buffer)

    stage_upload([("adapter.zip", Stream(zip_bytes(ADAPTER)))], dest, max_bytes=MiB)
    assert staged_files(dest) == ADAPTER


@pytest.mark.parametrize("member", ["../evil", "a/../../adapter_config.json", "..\\adapter_config.json"])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_traversal_member_is_refused(tmp_path: Path, dest: Path, member: str, kind: str) -> None:
    files = {**ADAPTER, member: b"pwned"}
    data = tar_bytes(files) if kind == "tar.gz" else zip_bytes(files)
    with pytest.raises(UploadError, match=f"archive member '{re.escape(member)}' escapes the archive"):
        stage_upload([(f"x.{kind}", io.BytesIO(data))], dest, max_bytes=MiB)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_absolute_member_is_refused(dest: Path, kind: str) -> None:
    files = {**ADAPTER, "/tmp/adapter_config.json": CONFIG}
    data = tar_bytes(files) if kind == "tar.gz" else zip_bytes(files)
    with pytest.raises(UploadError, match="archive member '/tmp/adapter_config.json' escapes the archive"):
        stage_upload([(f"x.{kind}", io.BytesIO(data))], dest, max_bytes=MiB)


def link(name: str, kind: bytes, target: str = "/etc/passwd") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(("info", "message"), [
    (link("d/adapter_model.safetensors", tarfile.SYMTYPE), "'d/adapter_model.safetensors' is a symbolic link"),
    (link("d/notes.txt", tarfile.LNKTYPE, "d/adapter_config.json"), "'d/notes.txt' is a hard link"),
    (link("d/fifo", tarfile.FIFOTYPE, ""), "'d/fifo' is a device, fifo"),
    (link("d/dev", tarfile.CHRTYPE, ""), "'d/dev' is a device, fifo"),
])
def test_tar_links_and_special_files_are_refused(dest: Path, info: tarfile.TarInfo, message: str) -> None:
    data = tar_bytes({"d/adapter_config.json": CONFIG}, extra=(info,))
    with pytest.raises(UploadError, match=message):
        stage_upload([("x.tar.gz", io.BytesIO(data))], dest, max_bytes=MiB)
    assert not (dest / "adapter_model.safetensors").exists()


def test_zip_symlink_is_refused(dest: Path) -> None:
    info = zipfile.ZipInfo("d/adapter_model.safetensors")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = zip_bytes({"d/adapter_config.json": CONFIG}, extra=(info,))
    with pytest.raises(UploadError, match="'d/adapter_model.safetensors' is a symbolic link"):
        stage_upload([("x.zip", io.BytesIO(data))], dest, max_bytes=MiB)


@pytest.mark.parametrize("name", ["../adapter_config.json", "sub/adapter_config.json", "..\\x", "", ".", ".."])
def test_traversal_part_filename_is_refused(tmp_path: Path, dest: Path, name: str) -> None:
    parts = plain({"adapter_model.safetensors": WEIGHTS}) + [(name, io.BytesIO(CONFIG))]
    with pytest.raises(UploadError, match="is not a plain file name"):
        stage_upload(parts, dest, max_bytes=MiB)
    assert list(dest.iterdir()) == [] and not (tmp_path / "adapter_config.json").exists()


def test_pickle_file_is_refused(dest: Path) -> None:
    with pytest.raises(UploadError, match="'adapter_model.bin' is a pickle file, and the upload has no "
                       "adapter_model.safetensors; pickle files are never loaded"):
        stage_upload(plain({"adapter_config.json": CONFIG, "adapter_model.bin": WEIGHTS}), dest, max_bytes=MiB)


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.PT", "x.pth", "x.pkl", "x.ckpt"])
def test_pickle_weights_in_an_archive_are_refused(dest: Path, name: str) -> None:
    data = tar_bytes(under("out/", {"adapter_config.json": CONFIG, name: b"\x80\x04"}))
    with pytest.raises(UploadError, match=f"archive member 'out/{name}' is a pickle file.*safetensors"):
        stage_upload([("x.tgz", io.BytesIO(data))], dest, max_bytes=MiB)
    assert not any(p.suffix.lower() in PICKLE_SUFFIXES for p in dest.iterdir())


@pytest.mark.parametrize("name", ["training_args.bin", "optimizer.pt", "rng_state.pth"])
def test_pickles_beside_safetensors_weights_are_skipped_unread(dest: Path, name: str) -> None:
    data = tar_bytes(under("checkpoint-20/", {**ADAPTER, name: b"\x80\x04"}))
    ignored = stage_upload([("x.tgz", io.BytesIO(data))], dest, max_bytes=MiB)
    assert ignored == [f"checkpoint-20/{name}"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(ADAPTER)


def test_missing_weights(dest: Path) -> None:
    with pytest.raises(UploadError, match=r"lacks adapter_model.safetensors \(ignored: README.md\)"):
        stage_upload(plain({"adapter_config.json": CONFIG, "README.md": b""}), dest, max_bytes=MiB)


def test_missing_everything(dest: Path) -> None:
    with pytest.raises(UploadError, match="lacks adapter_config.json and adapter_model.safetensors"):
        stage_upload([("x.zip", io.BytesIO(zip_bytes({"README.md": b""})))], dest, max_bytes=MiB)


def test_the_same_file_twice_is_refused(dest: Path) -> None:
    data = zip_bytes({**under("a/", ADAPTER), "b/adapter_config.json": CONFIG})
    with pytest.raises(UploadError, match="'b/adapter_config.json': the upload holds adapter_config.json twice"):
        stage_upload([("x.zip", io.BytesIO(data))], dest, max_bytes=MiB)


def test_the_same_part_twice_is_refused(dest: Path) -> None:
    parts = plain(ADAPTER) + [("adapter_config.json", io.BytesIO(CONFIG))]
    with pytest.raises(UploadError, match="file 'adapter_config.json': the upload holds adapter_config.json twice"):
        stage_upload(parts, dest, max_bytes=MiB)


def test_an_archive_with_other_files_is_refused(dest: Path) -> None:
    parts = plain({"adapter_config.json": CONFIG}) + [("weights.zip", io.BytesIO(zip_bytes(ADAPTER)))]
    with pytest.raises(UploadError, match="'weights.zip' is an archive sent along with other files"):
        stage_upload(parts, dest, max_bytes=MiB)


def flip(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize(("name", "data"), [
    ("x.tar.gz", os.urandom(5000)),
    ("x.tgz", b""),
    ("x.tar", os.urandom(5000)),
    ("x.zip", os.urandom(5000)),
    ("x.tar.gz", tar_bytes(ADAPTER)[:-5000]),  # truncated
    ("x.zip", zip_bytes(ADAPTER)[:-200]),  # truncated, central directory gone
    ("x.tar.gz", flip(tar_bytes(ADAPTER))),  # caught by the gzip checksum
    ("x.zip", flip(zip_bytes(ADAPTER))),  # caught by the member's CRC
])
def test_damaged_archive_is_refused(dest: Path, name: str, data: bytes) -> None:
    with pytest.raises(UploadError, match=f"^files: '{name}' is not a valid .tar.gz/.zip archive: ") as info:
        stage_upload([(name, io.BytesIO(data))], dest, max_bytes=MiB)
    assert info.value.kind is ErrorKind.INVALID and info.value.field == "files"


def test_plain_files_over_the_size_limit(dest: Path) -> None:
    limit = len(CONFIG) + len(WEIGHTS) - 1
    message = f"^files: upload exceeds the size limit of {limit} bytes.*--max-adapter-size"
    with pytest.raises(UploadError, match=message) as info:
        stage_upload(plain(ADAPTER), dest, max_bytes=limit)
    assert info.value.kind is ErrorKind.TOO_LARGE and info.value.field == "files"
    assert staged_bytes(dest) <= limit


def test_exactly_at_the_size_limit(dest: Path) -> None:
    stage_upload(plain(ADAPTER), dest, max_bytes=len(CONFIG) + len(WEIGHTS))
    assert staged_files(dest) == ADAPTER


BOMB = {"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(10_000_000)}


@pytest.mark.parametrize(("name", "data"), [("bomb.zip", zip_bytes(BOMB)), ("bomb.tar.gz", tar_bytes(BOMB))])
def test_inflating_archive_stops_at_the_size_limit(dest: Path, name: str, data: bytes) -> None:
    assert len(data) < 100_000
    with pytest.raises(UploadError, match=f"exceeds the size limit of {MiB} bytes") as info:
        stage_upload([(name, io.BytesIO(data))], dest, max_bytes=MiB)
    assert info.value.kind is ErrorKind.TOO_LARGE
    assert staged_bytes(dest) < 2 * MiB


def test_inflating_ignored_tar_member_is_refused(dest: Path) -> None:
    data = tar_bytes({**ADAPTER, "junk.txt": bytes(10_000_000)})
    with pytest.raises(UploadError, match=f"holds more than the size limit of {MiB} bytes in files an adapter") as info:
        stage_upload([("x.tar.gz", io.BytesIO(data))], dest, max_bytes=MiB)
    assert info.value.kind is ErrorKind.TOO_LARGE


class Reader(io.BytesIO):
    """An upload that remembers how far it was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.furthest = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


def empty_members(count: int) -> bytes:
    """A tar of `count` empty members (one header each, 512 bytes), as the issue's 2-million-member bomb."""
    header = tarfile.TarInfo("junk/x").tobuf(format=tarfile.GNU_FORMAT)
    return header * count + bytes(2 * tarfile.BLOCKSIZE)


@pytest.mark.parametrize(("name", "pack"), [("many.tar", bytes), ("many.tar.gz", gzip.compress)])
def test_an_archive_of_many_empty_members_stops_at_the_member_limit(dest: Path, name: str, pack) -> None:
    data = pack(empty_members(100 * MAX_ARCHIVE_MEMBERS))  # 51 MB of headers, unbounded ~3 s and a list of all
    upload = Reader(data)
    start = time.perf_counter()
    with pytest.raises(UploadError, match=f"'{name}' holds more than {MAX_ARCHIVE_MEMBERS} members") as info:
        stage_upload([(name, upload)], dest, max_bytes=1 << 30)
    assert time.perf_counter() - start < 1
    assert info.value.kind is ErrorKind.TOO_LARGE and info.value.field == "files"
    if name.endswith(".tar"):  # read up to the member past the limit (and one tar record beyond), no further
        assert upload.furthest <= (MAX_ARCHIVE_MEMBERS + 1) * tarfile.BLOCKSIZE + tarfile.RECORDSIZE


def test_tar_headers_count_toward_the_size_limit(dest: Path) -> None:
    huge = tarfile.TarInfo("out/notes.txt")
    huge.pax_headers = {"comment": "x" * (4 * MiB)}  # one pax record, read whole by tarfile
    data = tar_bytes(under("out/", ADAPTER), mode="w:gz", extra=(huge,))
    with pytest.raises(UploadError, match=f"more than the size limit of {MiB} bytes in files an adapter does not "
                       "use and tar headers") as info:
        stage_upload([("x.tar.gz", io.BytesIO(data))], dest, max_bytes=MiB)
    assert info.value.kind is ErrorKind.TOO_LARGE


def many_entries_zip(count: int, name_length: int = 8) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"{i:0{name_length}d}", b"")
    return buf.getvalue()


def with_entry_count(data: bytes, count: int) -> bytes:
    """`data` with its end record claiming `count` entries (a lie zipfile does not check)."""
    at = data.rfind(b"PK\x05\x06")
    return data[:at + 8] + struct.pack("<HH", count, count) + data[at + 12:]


def test_a_zip_of_too_many_entries_is_refused_from_its_end_record(dest: Path, monkeypatch) -> None:
    data = many_entries_zip(MAX_ARCHIVE_MEMBERS + 1)
    monkeypatch.setattr(zipfile, "ZipFile", None)  # refused before zipfile reads the directory
    with pytest.raises(UploadError, match=f"'many.zip' holds more than {MAX_ARCHIVE_MEMBERS} members") as info:
        stage_upload([("many.zip", io.BytesIO(data))], dest, max_bytes=MiB)
    assert info.value.kind is ErrorKind.TOO_LARGE


def test_a_zip_whose_end_record_lies_about_its_entries_is_refused(dest: Path) -> None:
    data = with_entry_count(many_entries_zip(MAX_ARCHIVE_MEMBERS + 1), 2)
    with pytest.raises(UploadError, match=f"holds more than {MAX_ARCHIVE_MEMBERS} members"):
        stage_upload([("many.zip", io.BytesIO(data))], dest, max_bytes=MiB)


def test_a_zip_with_an_oversized_central_directory_is_refused(dest: Path) -> None:
    data = with_entry_count(many_entries_zip(MAX_ARCHIVE_MEMBERS, name_length=1000), 2)
    with pytest.raises(UploadError, match=f"central directory of \\d+ bytes, over the {ZIP_DIRECTORY_MAX_BYTES}"):
        stage_upload([("long.zip", io.BytesIO(data))], dest, max_bytes=16 * MiB)


def test_an_archive_at_the_member_limit_is_accepted(dest: Path) -> None:
    junk = {f"out/junk-{i}.txt": b"" for i in range(MAX_ARCHIVE_MEMBERS - len(ADAPTER))}
    for name, data in [("x.tar.gz", tar_bytes({**junk, **ADAPTER})), ("x.zip", zip_bytes({**junk, **ADAPTER}))]:
        for path in dest.iterdir():
            path.unlink()
        stage_upload([(name, io.BytesIO(data))], dest, max_bytes=MiB)
        assert staged_files(dest) == ADAPTER
