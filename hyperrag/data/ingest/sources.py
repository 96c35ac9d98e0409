"""Finding the input files safely: folders walked without following links, zips read in memory.

Nothing is ever extracted to disk, so a zip's ``../`` paths could not escape anyway; they are
still refused by name, with symbolic links, encrypted members and zip bombs (checked from the
headers first, then again while each member is read).
"""
from __future__ import annotations

import os
import re
import stat
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

SUFFIXES = (".txt", ".md", ".pdf", ".html", ".htm", ".docx", ".jsonl")
MAX_ZIP_BYTES = 1024 * 2**20  # total uncompressed bytes one zip may hold
MAX_ZIP_RATIO = 100  # uncompressed/compressed, for members over RATIO_FLOOR (prose rarely beats 10)
RATIO_FLOOR = 2**20
MAX_ZIP_MEMBERS = 10_000


class IngestError(ValueError):
    """One input that cannot be used; the message names the file (and page or line) and why."""


def human(n: float) -> str:
    """A byte count people can read: 512 B, 4.9 KiB, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass
class Item:
    """One input file, read only when its turn comes."""

    label: str  # the file relative to its input root; a zip member as "<zip>/<member>"
    read: Callable[[], bytes]


def collect(paths: Sequence[str | Path], out_dir: Path, max_file_bytes: int, max_zip_bytes: int,
            stack: ExitStack, errors: list[str], notes: list[str]) -> list[Item]:
    """Every readable input file, in a stable order; refusals go to ``errors``, skipped types to ``notes``."""
    items: list[Item] = []
    out_real = out_dir.resolve()
    for raw in paths:
        root = Path(raw)
        if root.is_symlink():
            errors.append(f"{root}: a symbolic link: refused (links are not followed)")
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                here = Path(dirpath)
                for name in list(dirnames):
                    sub = here / name
                    if sub.is_symlink() or sub.resolve() == out_real:
                        dirnames.remove(name)
                        if sub.is_symlink():
                            errors.append(f"{sub.relative_to(root).as_posix()}: a symbolic link: refused (links are not followed)")
                dirnames.sort()
                for name in sorted(filenames):
                    path = here / name
                    items += _file_items(path, path.relative_to(root).as_posix(), max_file_bytes, max_zip_bytes, stack, errors, notes)
        elif root.exists():
            items += _file_items(root, root.name, max_file_bytes, max_zip_bytes, stack, errors, notes)
        else:
            errors.append(f"{root}: no such file or folder")
    return items


def _file_items(path: Path, label: str, max_file_bytes: int, max_zip_bytes: int, stack: ExitStack,
                errors: list[str], notes: list[str]) -> list[Item]:
    mode = path.lstat().st_mode
    suffix = path.suffix.lower()
    if stat.S_ISLNK(mode):
        errors.append(f"{label}: a symbolic link: refused (links are not followed)")
    elif not stat.S_ISREG(mode):
        errors.append(f"{label}: not a regular file: skipped")
    elif suffix != ".zip" and suffix not in SUFFIXES:
        notes.append(f"{label}: skipped: {suffix or 'no extension'} is not a supported type ({', '.join(SUFFIXES)}, .zip)")
    elif path.stat().st_size > max_file_bytes:
        errors.append(f"{label}: {human(path.stat().st_size)} is over the {human(max_file_bytes)} size limit")
    elif suffix == ".zip":
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
            return _zip_items(archive, label, max_file_bytes, max_zip_bytes, errors, notes)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            errors.append(f"{label}: not a readable zip ({err})")
    else:
        return [Item(label, path.read_bytes)]
    return []


def _unsafe(name: str) -> bool:
    """A member path that would land outside the folder it is unpacked in (zip slip)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"^[A-Za-z]:", name))


def _zip_items(archive: zipfile.ZipFile, label: str, max_file_bytes: int, max_zip_bytes: int,
               errors: list[str], notes: list[str]) -> list[Item]:
    """Members of a zip, checked from its headers; the reads check the sizes again as they go."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    declared = sum(i.file_size for i in infos)
    if len(infos) > MAX_ZIP_MEMBERS:
        errors.append(f"{label}: {len(infos)} members, over the {MAX_ZIP_MEMBERS} limit: refused")
        return []
    if declared > max_zip_bytes:
        errors.append(f"{label}: declares {human(declared)} uncompressed, over the "
                      f"{human(max_zip_bytes)} limit (zip bomb?): refused")
        return []
    budget = [max_zip_bytes]  # bytes left to read from this zip, whatever its headers say
    items = []
    for info in infos:
        name, where = info.filename, f"{label}/{info.filename}"
        suffix = PurePosixPath(name).suffix.lower()
        if _unsafe(name):
            errors.append(f"{where}: unsafe path in zip (zip slip): refused")
        elif stat.S_ISLNK(info.external_attr >> 16):
            errors.append(f"{where}: a symbolic link in zip: refused (links are not followed)")
        elif info.flag_bits & 0x1:
            errors.append(f"{where}: encrypted zip member: not read")
        elif suffix not in SUFFIXES:
            notes.append(f"{where}: skipped: {suffix or 'no extension'} is not a supported type"
                         + (" (zips inside zips are not opened)" if suffix == ".zip" else ""))
        elif info.file_size > max_file_bytes:
            errors.append(f"{where}: {human(info.file_size)} is over the {human(max_file_bytes)} size limit")
        elif info.file_size > RATIO_FLOOR and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            errors.append(f"{where}: compressed {info.file_size // max(info.compress_size, 1)}:1, over the "
                          f"{MAX_ZIP_RATIO}:1 limit (zip bomb?): refused")
        else:
            items.append(Item(where, lambda a=archive, i=info, w=where: _read_member(a, i, w, max_file_bytes, budget)))
    return items


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, max_file_bytes: int,
                 budget: list[int]) -> bytes:
    """Read in blocks and stop as soon as a member outgrows its header or a limit."""
    limit = min(info.file_size, max_file_bytes, budget[0])
    out = bytearray()
    try:
        with archive.open(info) as member:
            while block := member.read(2**20):
                out += block
                if len(out) > limit:
                    raise IngestError(f"{where}: holds more than its header's {info.file_size} bytes or a size "
                                      f"limit (zip bomb?): refused")
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as err:
        raise IngestError(f"{where}: not readable from the zip ({err})") from None
    budget[0] -= len(out)
    return bytes(out)


