"""Outputs: encoders turn records into bytes, sinks decide where bytes go."""
from __future__ import annotations

from .base import Fanout, Sink
from .encode import ENCODERS, Encoder, HumanEncoder, JsonEncoder, MsgpackEncoder
from .memory import ListSink
from .reader import LogFormatError, LogReader, iter_records, rotated_files, show
from .rotating import DISK_FULL_ACTIONS, FSYNC_POLICIES, RotatingFileSink
from .stream import StreamSink

__all__ = ["DISK_FULL_ACTIONS", "ENCODERS", "Encoder", "FSYNC_POLICIES", "Fanout",
           "HumanEncoder", "JsonEncoder", "ListSink", "LogFormatError", "LogReader",
           "MsgpackEncoder", "RotatingFileSink", "Sink", "StreamSink", "iter_records",
           "rotated_files", "show"]
