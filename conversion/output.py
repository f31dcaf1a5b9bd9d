"""Writing natsl-convert's output directory atomically.

The checkpoint is written into a hidden temp dir beside OUT (`.OUT.natsl-tmp-<pid>-<random>`) and renamed
into place, so a failure never leaves a partial OUT:
- any exception or interrupt removes the temp dir; SIGTERM is turned into an exception while writing, so a
  terminated conversion cleans up too;
- an existing OUT is moved aside (`.OUT.natsl-old-<pid>-<random>`) only once the new one is complete, and moved
  back if the swap fails;
- a conversion killed outright (SIGKILL, power loss) cannot clean up: the next conversion to the same OUT
  removes the temp dirs of processes that no longer run (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_TAG, OLD_TAG = "natsl-tmp", "natsl-old"


def check_output_path(src: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse OUT inside a SRC directory, OUT on or around SRC, and an existing OUT without overwrite."""
    out_r = out.resolve()
    if src is not None:
        src_r = src.resolve()
        if src_r.is_dir() and (out_r == src_r or src_r in out_r.parents):
            raise ValueError(f"OUT {out} lies inside SRC {src}; write the converted checkpoint to a separate directory.")
        if out_r in src_r.parents:
            raise ValueError(f"SRC {src} lies inside OUT {out}; writing OUT would destroy the source. Pick another OUT.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it, or pick another OUT.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; remove it or pick another OUT.")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` into a temp dir beside `out`, then rename it into place (see the module docstring).

    The temp dir is made with a plain `mkdir` (mode 0o777 & ~umask), so OUT gets the permissions of any
    directory its user creates (mkdtemp's 0o700 would make it unreadable to other users), and every file
    written into it gets 0o666 & ~umask, as a plain `open` would give it (transformers writes
    model.safetensors 0o600; copied files would keep their source's mode).
    """
    with _sigterm_raises():
        tmp = old = None
        try:
            tmp = _make_temp_dir(out)
            remove_stale(out)
            write(tmp)
            _normalise_modes(tmp)
            if out.exists():
                old = _fresh_dir(out, OLD_TAG, create=False)
                out.rename(old)
            tmp.rename(out)
        except BaseException:
            try:
                if old is not None and old.exists() and not out.exists():
                    old.rename(out)  # the swap failed halfway: put the previous OUT back
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale(out: Path) -> list[Path]:
    """Remove what conversions into `out` left when they were killed (their process is gone): their temp dirs,
    and an OUT they had moved aside once a complete OUT exists again (without one, the aside dir holds the only
    copy of the previous OUT and is left alone). Returns the paths removed."""
    removed = []
    for path in sorted(out.parent.glob(f".{out.name}.natsl-*-*")):
        tag, pid = _tag_and_pid(out, path)
        if tag is None or _alive(pid) or (tag == OLD_TAG and not out.exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _tag_and_pid(out: Path, path: Path) -> tuple[str | None, int]:
    rest = path.name[len(f".{out.name}."):]
    for tag in (TMP_TAG, OLD_TAG):
        pid = rest[len(tag) + 1:].split("-", 1)[0]
        if rest.startswith(f"{tag}-") and pid.isdigit():
            return tag, int(pid)
    return None, 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_temp_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return _fresh_dir(out, TMP_TAG, create=True)
    except PermissionError as err:
        raise PermissionError(
            f"Cannot write into {out.parent} (permission denied); pick an OUT in a directory you can write to."
        ) from err


@contextlib.contextmanager
def _sigterm_raises():
    """While writing, SIGTERM raises SystemExit(143) (the exit status of a terminated process), so the
    cleanup of `write_atomically` runs. Only the main thread can set signal handlers; elsewhere SIGTERM
    keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _normalise_modes(root: Path) -> None:
    """Give everything under `root` the mode a plain mkdir / open would: root's own mode (0o777 & ~umask),
    without the execute bits for files. Read from root's mode, so the process umask is never changed."""
    dir_mode = stat.S_IMODE(root.stat().st_mode)
    file_mode = dir_mode & 0o666
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


def current_umask() -> int:
    """The process umask: read from /proc/self/status where Linux has it, else set and put back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_stamps(root: Path) -> dict[Path, tuple[int, int, int]]:
    """{file: (inode, mtime_ns, size)} of the regular files under `root` (empty when it does not exist)."""
    stamps = {}
    for path in Path(root).rglob("*") if Path(root).is_dir() else ():
        try:
            st = path.lstat()
        except OSError:  # gone meanwhile (another process renamed its temp file)
            continue
        if stat.S_ISREG(st.st_mode):
            stamps[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return stamps


def honour_umask(root: Path, before: dict | None = None) -> list[Path]:
    """Give the files under `root` written since `before` (`file_stamps(root)` taken before writing; None: every
    file) the mode a plain `open()` would have given them, 0o666 & ~umask (0o644 under umask 022). safetensors
    writes model.safetensors through a private temp file, so a plain `save_pretrained` leaves it 0o600, and
    files a save copies keep their source's mode. Files of other users are left alone. Returns the files changed."""
    mode = 0o666 & ~current_umask()
    changed = []
    for path, stamp in file_stamps(root).items():
        if before is not None and before.get(path) == stamp:
            continue
        try:
            st = path.lstat()
            if stat.S_IMODE(st.st_mode) == mode or st.st_uid != getattr(os, "getuid", lambda: st.st_uid)():
                continue
            os.chmod(path, mode)
        except OSError:  # gone meanwhile, or not ours to change after all
            continue
        changed.append(path)
    return changed


def _fresh_dir(out: Path, tag: str, *, create: bool) -> Path:
    """An unused path `.<OUT name>.<tag>-<pid>-<random>` beside `out`; made with os.mkdir (umask-respecting)
    when `create`. The pid lets a later run tell a dead conversion's leftovers from a running one's."""
    for _ in range(100):
        path = out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, like any mkdir
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"Could not find an unused .{out.name}.{tag}-* name in {out.parent}.")


__all__ = ["check_output_path", "current_umask", "file_stamps", "honour_umask", "remove_stale", "write_atomically"]
