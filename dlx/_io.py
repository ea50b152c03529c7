"""Files dlx writes: one atomic writer and one PNG encoder, used by every module that writes.

``atomic_write`` writes beside the target, flushes, and renames over it, so a reader (or a
resumed sweep) never sees half a file; new files get 0o666 less the user's umask, as ``open()``
gives them (a report or a results folder on a shared file system stays readable by others), and a
replaced file keeps its permission bits, owner and group.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from pathlib import Path

from .errors import DlxError

__all__ = ["atomic_write", "write_bytes", "png_bytes"]


def atomic_write(path, write, *, fsync: bool = True) -> Path:
    """``write(tmp)`` a file beside ``path``'s target, flush it to disk, rename it over the target.

    A symlink is followed (its target is replaced; the link stays). An existing file's permission
    bits are kept, and its owner and group where the system lets us set them; a new file is
    created with 0o666 less the umask, as ``open()`` creates files. ``fsync=False`` skips the
    flush to disk (the file still survives a killed process, as a SQLite WAL commit at
    ``synchronous=NORMAL`` does; a sweep's per-row PNGs use it).
    """
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise DlxError(f"argument `path` names a directory, not a file: {str(path)!r}")
    mode = owner = None
    if target.exists():
        st = os.stat(target)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            # 0o600 while it is written when the old file's bits are to be restored; else the umask's
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is not None else 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(e.errno, f"cannot write {str(path)!r}: {e.strerror}") from None
    else:  # pragma: no cover
        raise DlxError(f"could not create a temporary file beside {str(target)!r}")
    os.close(fd)
    try:
        if mode is None:  # the bits open() gives a new file here: 0o666 less the umask
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(str(tmp))
        if owner is not None and hasattr(os, "chown"):
            try:  # a file in a shared folder keeps its group (and owner, where we may set it)
                os.chown(tmp, *owner)
            except OSError:
                try:
                    os.chown(tmp, -1, owner[1])
                except OSError:
                    pass
        os.chmod(tmp, mode)  # after chown, which may clear set-id bits; the writer may set its own
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(target.parent)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes, *, fsync: bool = True) -> Path:
    """``atomic_write`` of ``data``."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, fsync=fsync)


def png_bytes(image, compress_level: int = 1) -> bytes:
    """PNG file bytes of a PIL image, a uint8 (h, w, 3) array or tensor, or a (3, h, w) tensor
    (uint8, or float in [0, 1] rounded as diffusers makes its PIL images).

    zlib level 1: five times faster to write than Pillow's default 6, files ~20% larger (a sweep
    writes one PNG per row; Pillow releases the GIL while it compresses, so rows encode on threads).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np
        import torch

        if isinstance(image, torch.Tensor):
            t = image.detach()
            if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
                t = t.permute(1, 2, 0)
            if t.dtype != torch.uint8:
                t = (t.float() * 255).round().clamp(0, 255).to(torch.uint8)
            image = t.cpu().contiguous().numpy()
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise DlxError(f"png_bytes takes a PIL image or uint8 (h, w, 3) pixels; got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
