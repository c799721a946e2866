"""The daemon's configuration file: ``key = value`` lines, ``#`` comments.

Every key has a documented default (DEFAULTS below, and systemd/fswatchaudit.conf which
sets each one to it), so an empty or missing file is a complete configuration.  Unknown
keys, repeated keys and bad values are refused with ``file:line`` so that a typo never
silently leaves a default in force.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends import BACKENDS as BACKEND_NAMES
from ..errors import LocatedError
from ..sinks.rotating import DISK_FULL_ACTIONS, FSYNC_POLICIES
from ..units import parse_size

DEFAULT_PATH = "/etc/fswatchaudit/fswatchaudit.conf"

BACKENDS = ("auto", *BACKEND_NAMES)


class ConfigError(LocatedError):
    """A configuration that cannot be used; the message says which key and where."""


@dataclass(frozen=True)
class Config:
    """Settings of one daemon run; field docs are the key documentation."""
    # Directory whose *.rules files (lexical order) are the rules in force.
    rules_dir: str = "/etc/fswatchaudit/rules.d"
    # Where the msgpack log lives; created 0700 if missing.
    log_dir: str = "/var/log/fswatchaudit"
    # File name of the current log inside log_dir; rotated ones get .1, .2, ...
    log_file: str = "audit.log"
    # Rotate when the current log reaches this size (bytes; K, M, G suffixes).
    rotate_size: int = 8 * 1024 * 1024
    # How many rotated files to keep (log_file.1 ... log_file.N); 0 keeps none.
    rotate_count: int = 5
    # Seconds between two flushes of the write buffer to the file.
    flush_interval: float = 1.0
    # fsync after every flush ("flush"), only when rotating and closing ("rotate"),
    # or leave it to the kernel ("never").
    fsync: str = "flush"
    # eBPF ring buffer size in bytes (a power of two, at least 4K).
    ring_buffer_size: int = 32 * 1024 * 1024
    # auto picks the best usable one: ebpf, fanotify, inotify.
    backend: str = "auto"
    # What to do when the log file system is full or below space_left:
    # keep-going (count the events not written), drop-oldest (delete the oldest rotated
    # file and go on), stop (stop auditing: the backend is closed; the daemon keeps
    # running and answering `ctl -s` with the reason until it is restarted).
    disk_full_action: str = "keep-going"
    # Free space under which the file system counts as full: bytes (K, M, G) or a
    # percentage of its size ("5%"); 0 means only a real ENOSPC counts.
    space_left: str = "64M"
    # The control socket (fswatchaudit ctl); its directory is made root-only.
    control_socket: str = "/run/fswatchaudit/control.sock"
    # Seconds between two sd_notify STATUS= updates.
    status_interval: float = 10.0
    # Chain every record of the msgpack log to the previous one by a hash ("yes"), so
    # that `fswatchaudit log verify` finds an edited, deleted or reordered record.
    chain: bool = True
    # With a sealing key (made by `fswatchaudit log keygen`), the chain head is sealed
    # every seal_interval seconds with a key that evolves forward; empty: no seals.
    seal_key_file: str = ""
    seal_interval: float = 60.0
    # More places records go besides the msgpack log, one block of keys per sink:
    #   sink.NAME.kind = jsonl | auditd | syslog | journald
    #   sink.NAME.SETTING = VALUE     (see the README for each kind's settings)
    sinks: tuple[dict[str, Any], ...] = ()

    @property
    def log_path(self) -> str:
        return os.path.join(self.log_dir, self.log_file)


DEFAULTS = Config()
KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "sinks")

def _size(minimum: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        n = parse_size(text)
        if n < minimum:
            raise ValueError(f"{text!r} is too small (at least {minimum} bytes)")
        return n
    return conv


def _ring(text: str) -> int:
    n = _size(4096)(text)
    if n & (n - 1):
        raise ValueError(f"{text!r} is not a power of two")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"bad count {text!r}: expected a whole number") from None
    if not 0 <= n <= 1000:
        raise ValueError(f"{n} is out of range 0..1000")
    return n


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            n = float(text)
        except ValueError:
            raise ValueError(f"bad number of seconds {text!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"{text} is out of range {lo:g}..{hi:g} seconds")
        return n
    return conv


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text not in options:
            raise ValueError(f"bad value {text!r}: choose from {', '.join(options)}")
        return text
    return conv


def _abs_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    return os.path.normpath(text)


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise ValueError(f"{text!r}: expected yes or no")


def _optional_abs_path(text: str) -> str:
    return _abs_path(text) if text else ""


def _file_name(text: str) -> str:
    if not text or "/" in text or text in (".", ".."):
        raise ValueError(f"{text!r} must be a plain file name (no '/')")
    return text


def _space_left(text: str) -> str:
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"bad percentage {text!r}") from None
        if not 0 <= pct < 100:
            raise ValueError(f"{text} is out of range 0%..99%")
        return text
    parse_size(text)
    return text


CONVERTERS: dict[str, Callable[[str], object]] = {
    "rules_dir": _abs_path,
    "log_dir": _abs_path,
    "log_file": _file_name,
    "rotate_size": _size(4096),
    "rotate_count": _count,
    "flush_interval": _seconds(0.01, 60),
    "fsync": _choice(FSYNC_POLICIES),
    "ring_buffer_size": _ring,
    "backend": _choice(BACKENDS),
    "disk_full_action": _choice(DISK_FULL_ACTIONS),
    "space_left": _space_left,
    "control_socket": _abs_path,
    "status_interval": _seconds(0.1, 3600),
    "chain": _yes_no,
    "seal_key_file": _optional_abs_path,
    "seal_interval": _seconds(1, 86400),
}
assert set(CONVERTERS) == set(KEYS)


def parse(text: str, source: str | None = None) -> Config:
    """A Config from the text of a configuration file; raises ConfigError."""
    values: dict[str, Any] = {}
    seen: dict[str, int] = {}
    sinks: dict[str, dict[str, tuple[str, int]]] = {}      # name -> setting -> (value, line)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # a comment after a value needs a blank before the '#'
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"expected 'key = value', got {raw.strip()!r}", source, number)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key.startswith("sink."):
            name, _, setting = key[len("sink."):].partition(".")
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not setting:
                raise ConfigError(f"bad sink key {key!r}: expected sink.NAME.SETTING with "
                                  "NAME of letters, digits, '-' and '_'", source, number)
            block = sinks.setdefault(name, {})
            if setting in block:
                raise ConfigError(f"{key} given twice (first on line {block[setting][1]})",
                                  source, number)
            block[setting] = (value, number)
            continue
        if key not in CONVERTERS:
            close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}", source, number)
        if key in seen:
            raise ConfigError(f"{key} given twice (first on line {seen[key]})", source,
                              number)
        seen[key] = number
        try:
            values[key] = CONVERTERS[key](value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}", source, number) from None
    values["sinks"] = tuple(_sink(name, block, source) for name, block in sinks.items())
    return Config(**values)


def _sink(name: str, block: dict[str, tuple[str, int]], source: str | None) -> dict[str, Any]:
    """One sink's settings from its sink.NAME.* keys, checked against its kind."""
    from ..sinks.kinds import settings_for
    first = min(line for _, line in block.values())
    if "kind" not in block:
        raise ConfigError(f"sink {name!r} has no sink.{name}.kind", source, first)
    kind, line = block["kind"]
    given = {k: v for k, (v, _) in block.items() if k != "kind"}
    try:
        return settings_for(kind, given, name)
    except ValueError as exc:
        raise ConfigError(f"sink {name}: {exc}", source, line) from None


def load(path: str | None) -> Config:
    """The configuration at path; None means DEFAULT_PATH if it exists, else defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return Config()
        path = DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", path) from None
    except UnicodeDecodeError:
        raise ConfigError("configuration is not UTF-8 text", path) from None
    return parse(text, path)
