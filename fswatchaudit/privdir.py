"""Private directories of the auditor (the NATS spool, the compiled-program cache):
created 0700, and never used through a symlink or when someone else could write them."""
from __future__ import annotations

import errno
import os
import stat


def open_private_dir(path: str) -> int:
    """The directory, created 0700 when missing; an existing one must be a real
    directory (never a symlink) of this user that nobody else may write."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}"
    elif st.st_mode & 0o022:
        problem = f"group or others may write it (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        os.close(fd)
        raise OSError(errno.EPERM, f"refusing directory {path}: {problem}")
    return fd
