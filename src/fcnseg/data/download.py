"""Downloading and safely extracting dataset archives (PASCAL VOC2012), with checksums.

A download goes to ``NAME.part`` and is renamed to ``NAME`` only once its MD5 matches, so an
interrupted or corrupt transfer never takes the place of a good archive. A ``.part`` left by an
interruption is resumed with an HTTP Range request when the server honours it, and restarted
otherwise. An archive already at the destination (downloaded earlier or put there by hand) is
checked and used. Extraction refuses members that would land outside the target folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Sequence

from fcnseg.errors import DataError

VOC2012_FILENAME = "VOCtrainval_11-May-2012.tar"
VOC2012_URLS = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    # torchvision's source since the official host became unreliable
    "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
)
VOC2012_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"  # torchvision's checksum of the official archive
DOWNLOADABLE = ("voc2012",)

_CHUNK = 1 << 20


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(urls: Sequence[str], dest: str | os.PathLike, md5: str, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Downloads ``dest`` from the first of ``urls`` that delivers a file with the right MD5.

    Args:
        urls: tried in order (http, https or file).
        dest: final path; the transfer goes to ``dest + ".part"`` and is renamed after the check.
        md5: expected hex digest.
        progress: show progress (a bar on a terminal, plain lines in a log).
        timeout: seconds to wait for the server on each network operation.

    Returns:
        ``dest``.

    Raises:
        DataError: every URL failed; the message lists why and how to get the file by hand.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            _download(url, part, progress=progress, timeout=timeout)
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as err:
            failures.append(f"{url}: {getattr(err, 'reason', None) or err}")
            continue
        actual = md5sum(part)
        if actual == md5:
            os.replace(part, dest)
            return dest
        failures.append(f"{url}: downloaded file has MD5 {actual}, expected {md5}")
        part.unlink()  # corrupt: resuming it would only append to garbage
    raise DataError(
        f"could not download {dest.name}:\n  " + "\n  ".join(failures) + "\n"
        f"Download it by hand from {urls[0] if urls else 'its official site'}, check that its MD5 is {md5}, "
        f"and put it at {dest}; it will then be used without downloading."
    )


def _download(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    from fcnseg.progress import progress_bar

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "fcnseg"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return  # nothing left to send: the .part is complete, and the checksum decides
        raise
    with response:
        resumed = offset and getattr(response, "status", None) == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            part.unlink()  # the server sent a different range than asked; start over cleanly
            return _download(url, part, progress=progress, timeout=timeout)
        if not resumed:
            offset = 0  # the server ignored Range (or the URL is a file): the body is the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if resumed else "wb") as f, progress_bar(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
                offset += len(chunk)
    # http.client reports a dropped connection as a short read, not an error: without this check
    # the partial file would fail the checksum and be deleted instead of resumed next time.
    if total is not None and offset < total:
        raise OSError(f"connection closed after {offset} of {total} bytes (run again to resume)")


def check_members(tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    """Returns the archive's members after checking that none would be written outside ``target``.

    Raises:
        DataError: a member with an absolute or escaping path, a link pointing outside, or a
            device file.
    """
    target = target.resolve()
    members = tar.getmembers()
    for member in members:
        where = (target / member.name).resolve()
        problem = None
        if os.path.isabs(member.name) or not where.is_relative_to(target):
            problem = "its path leads outside the target folder"
        elif member.issym() and not (where.parent / member.linkname).resolve().is_relative_to(target):
            problem = f"it is a symbolic link to {member.linkname}, outside the target folder"
        elif member.islnk() and not (target / member.linkname).resolve().is_relative_to(target):
            problem = f"it is a hard link to {member.linkname}, outside the target folder"
        elif member.isdev():
            problem = "it is a device file"
        if problem:
            raise DataError(f"{tar.name}: refusing to extract member {member.name!r}: {problem}; the archive is not trustworthy")
    return members


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike, *, progress: bool = True) -> Path:
    """Extracts a tar archive into ``target`` without letting any member escape it.

    Members are checked first (nothing is written if one is unsafe), then extracted with
    tarfile's ``"data"`` filter where Python has it, into a temporary folder inside ``target``
    that is moved into place at the end: an interrupted extraction leaves no half-written tree
    that looks complete.

    Returns:
        ``target``.

    Raises:
        DataError: unreadable archive or an unsafe member.
    """
    from fcnseg.progress import progress_bar

    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = check_members(tar, target)
            scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target))
            try:
                for member in progress_bar(members, desc=f"extracting {archive.name}", unit="file", disable=not progress):
                    if hasattr(tarfile, "data_filter"):
                        tar.extract(member, scratch, filter="data")
                    else:  # Python < 3.11.4: rely on check_members alone
                        tar.extract(member, scratch)
                _merge_into(scratch, target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except (tarfile.TarError, EOFError) as err:
        raise DataError(f"cannot extract {archive}: {err.__class__.__name__}: {err}") from None
    return target


def _merge_into(source: Path, target: Path) -> None:
    # Renames within one filesystem: each file appears whole, and existing folders are merged.
    for entry in source.iterdir():
        dest = target / entry.name
        if entry.is_dir() and not entry.is_symlink() and dest.is_dir():
            _merge_into(entry, dest)
        else:
            os.replace(entry, dest)


def find_voc2012(root: str | os.PathLike) -> Path | None:
    """Returns the ``VOC2012`` folder under ``root``, or None.

    ``root`` may be the folder holding ``VOCdevkit/``, ``VOCdevkit/`` itself, or ``VOC2012/``. It
    lives here, with the archive's layout, so that `fcnseg.data.voc` depends on this module and
    not the other way round.
    """
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


def download_voc2012(
    root: str | os.PathLike,
    *,
    urls: Sequence[str] | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Makes sure ``root/VOCdevkit/VOC2012`` exists, downloading and extracting the archive if needed.

    An extracted copy is used as is; an archive at ``root/VOCtrainval_11-May-2012.tar`` (from an
    earlier run or put there by hand) is checked and extracted; otherwise it is downloaded (2 GB)
    from ``urls`` in order. The archive is kept, so a later run can extract it again.

    Args:
        root: the folder to hold ``VOCdevkit/`` and the archive.
        urls: where to download from; None means `VOC2012_URLS` (read at call time, so tests
            and mirrors can replace it).
        md5: expected checksum; None means `VOC2012_MD5`.
        progress: show progress (bars on a terminal, plain lines in a log).

    Returns:
        the ``VOC2012`` folder.

    Raises:
        DataError: no URL works (the message says where to put a hand-downloaded copy), the
            archive's checksum is wrong, or it does not hold VOC2012.
    """
    urls = VOC2012_URLS if urls is None else urls
    md5 = VOC2012_MD5 if md5 is None else md5
    root = Path(root)
    found = find_voc2012(root)
    if found is not None:
        return found
    tar = root / VOC2012_FILENAME
    if tar.is_file():
        actual = md5sum(tar)
        if actual != md5:
            raise DataError(f"{tar} has MD5 {actual}, expected {md5}: it is incomplete or a different file. "
                            "Delete it to download again, or replace it with the official archive.")
    else:
        fetch(urls, tar, md5, progress=progress)
    safe_extract(tar, root, progress=progress)
    found = find_voc2012(root)
    if found is None:
        raise DataError(f"{tar} was extracted into {root} but holds no VOCdevkit/VOC2012/ImageSets/Segmentation")
    return found
