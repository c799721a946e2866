"""Names for numbers people read: user names for uids (cached), errno names for
results, and the other way round for command-line filters."""
from __future__ import annotations

import errno
import functools
import pwd

UNSET_ID = 0xFFFFFFFF           # loginuid of a process no login session started


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str | None:
    """The name of uid in the password database, None when it has none."""
    if uid == UNSET_ID or uid < 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def uid_text(uid: int) -> str:
    """``1000(alice)``, ``1000`` when the name is unknown, ``unset`` for 4294967295."""
    if uid == UNSET_ID:
        return "unset"
    name = user_name(uid)
    return f"{uid}({name})" if name else str(uid)


def uid_of(text: str) -> int:
    """A uid from a number, a user name or ``unset``; ValueError otherwise."""
    text = text.strip()
    if text == "unset":
        return UNSET_ID
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {text}") from None


def errno_name(result: int) -> str:
    """``EACCES`` for -13; ``0`` stays ``0``; an unknown errno stays a number."""
    if result == 0:
        return "0"
    return errno.errorcode.get(-result, str(result))


def errno_of(text: str) -> int:
    """The negative result an errno name (``EACCES``, ``eperm``) or number stands for."""
    t = text.strip()
    if t.lstrip("-").isdigit():
        return -abs(int(t))
    value = getattr(errno, t.upper(), None)
    if not isinstance(value, int) or not t.upper().startswith("E"):
        raise ValueError(f"unknown errno name: {text}")
    return -value
