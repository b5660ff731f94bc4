"""Atomic writes (directories and files): everything is written under a temporary name and renamed when
complete, so a killed run leaves either the previous output or the new one, never a half-written one.

What they write gets the permissions of any file the user creates (``0666`` less the umask: ``0644`` under the
usual ``022``). safetensors writes its files ``0600``, which kept the weights of a model from another user or
a container reading them while every other file of the directory was readable."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask`` sets it to read it,
    which races with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def share_like_user_files(path: str | Path) -> None:
    """Give ``path`` (a file, or every file under a directory) the mode a file the user creates gets."""
    mask = _umask()
    path = Path(path)
    for f in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(f, (0o666 | (f.stat().st_mode & 0o111)) & ~mask)


def atomic_dir(dst: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary directory beside ``dst``, then replace ``dst`` with it."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        share_like_user_files(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def atomic_file(dst: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``dst``, then rename it onto ``dst``: a run killed
    or failing midway leaves no half-written ``dst`` (and the previous one, if any, intact)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        write(tmp)
        share_like_user_files(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return dst
