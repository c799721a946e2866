"""Operation names, the one list every backend, rule and report uses.

An operation is what happened to a filesystem object, normalised across backends and
syscalls.  ``ATTR`` is an attribute change whose kind the backend cannot tell
(inotify and fanotify report only "attributes changed").
"""
from __future__ import annotations

CREATE = "create"
MKDIR = "mkdir"
MKNOD = "mknod"
SYMLINK = "symlink"
LINK = "link"
RENAME = "rename"
UNLINK = "unlink"
RMDIR = "rmdir"
CHMOD = "chmod"
CHOWN = "chown"
SETXATTR = "setxattr"
REMOVEXATTR = "removexattr"
TRUNCATE = "truncate"
UTIME = "utime"
ATTR = "attr"
OPEN = "open"
EXEC = "exec"

CREATE_OPS = frozenset({CREATE, MKDIR, MKNOD, SYMLINK, LINK, RENAME})
REMOVE_OPS = frozenset({RENAME, UNLINK, RMDIR})
ATTR_OPS = frozenset({CHMOD, CHOWN, SETXATTR, REMOVEXATTR, TRUNCATE, UTIME, ATTR})
OPEN_OPS = frozenset({OPEN})
EXEC_OPS = frozenset({EXEC})
ALL_OPS = CREATE_OPS | REMOVE_OPS | ATTR_OPS | OPEN_OPS | EXEC_OPS
