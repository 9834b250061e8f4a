"""TensorBoard event files written without TensorFlow: tensorboardX's protos and record checksum, framed and
flushed here, synchronously (EventFile); and the cut of a killed run's later steps on resume."""

import itertools
import os
import socket
import struct
import time

from jaxlm import files


class EventFile:
  """This run's TensorBoard event file in WORKDIR/tensorboard/ (a resumed run adds one of its own; readers
  take a folder's files in name order, i.e. by start time): one event per metrics.jsonl line.

  Written here, on the calling thread, and flushed per event, as metrics.jsonl is: tensorboardX's
  SummaryWriter queues events to a thread whose flush() does not wait for the queue (measured: a process
  killed right after flush() had lost its last 2 of 10 steps), so a run killed after a checkpoint could
  miss steps that metrics.jsonl kept. tensorboardX still makes the events (its protos, its record
  checksum): no TensorFlow. No fsync per event: the page cache survives a killed process, and an fsync
  would wait behind the checkpoint writes. In a bucket, where objects cannot be appended to, the file is
  kept in memory and each event uploads it whole (as metrics.jsonl there)."""

  def __init__(self, folder: str):
    from tensorboardX.proto import event_pb2, summary_pb2  # (imported on the first write: jaxlm stays cheap)

    self._event, self._summary, self._session = event_pb2.Event, summary_pb2.Summary, event_pb2.SessionLog
    # Readers take a folder's files in name order, which must be the order the runs wrote them: the start
    # time to the nanosecond, zero-padded, comes first (a run restarted within the same second, or a count
    # of files going from 9 to 10, must not sort before the one it resumes); pid and count keep names unique.
    now = time.time_ns()
    name = (f"events.out.tfevents.{now // 10**9:010d}.{now % 10**9:09d}.{socket.gethostname()}.{os.getpid()}"
            f".{next(_opened):06d}")
    self.path = files.join(folder, name)
    self._remote = bytearray() if files.is_remote(folder) else None
    if self._remote is None:
      files.makedirs(folder)
      self._file = open(self.path, "ab")
    self._append(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, step: int, values: dict[str, float]) -> None:
    """The values as scalars of `step` (float32, as TensorBoard keeps them)."""
    summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._append(self._event(wall_time=time.time(), step=step, summary=summary))

  def start(self, step: int) -> None:
    """A session that writes from `step` on. A TensorBoard Python reader (EventAccumulator, the server's
    --load_fast=false) that holds a killed run's later steps already drops them at this SessionLog.START
    (drop_events_after took them out of the files for readers that start later). The server takes a
    run's first START for the run's beginning, not a restart: so every file has one, a fresh run's at 0."""
    status = self._session.START
    self._append(self._event(wall_time=time.time(), step=step, session_log=self._session(status=status)))

  def _append(self, event) -> None:
    record = _tf_record(event.SerializeToString())
    if self._remote is None:
      self._file.write(record)
      self._file.flush()
    else:
      self._remote += record
      files.write_bytes(self.path, bytes(self._remote))

  def close(self) -> None:
    if self._remote is None:
      self._file.close()


_opened = itertools.count()  # (event files this process has opened)


def drop_events_after(folder: str, step: int) -> None:
  """Rewrites the event files in `folder` without their events of steps after `step`, as drop_after does
  metrics.jsonl. The resumed run's START event alone would leave some: TensorBoard's Rust data server
  (its default reader) ignores START and drops a series' old points only from where that series has a
  point again, and a resumed run's first step has no mfu (untimed), so the killed run's mfu of that step
  stayed (seen in tests/test_tensorboard.py). A torn last record (the kill) goes too."""
  names = [name for name in files.listdir(folder) if "tfevents" in name]
  if not names:
    return
  from tensorboardX.proto import event_pb2

  for name in names:
    path = files.join(folder, name)
    data = files.read_bytes(path)
    kept = b"".join(r for r in _tf_records(data) if event_pb2.Event.FromString(r[12:-4]).step <= step)
    if kept == data:
      continue
    if not files.is_remote(path) and data.startswith(kept):
      os.truncate(path, len(kept))  # (in place: a temporary file beside it would be read as one more run file)
    else:
      files.write_bytes(path, kept)


def _tf_record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C (little-endian)."""
  from tensorboardX.record_writer import masked_crc32c

  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _tf_records(data: bytes):
  """The whole records of an event file, each with its framing (a torn last one is left out)."""
  at = 0
  while at + 12 <= len(data):
    (length,) = struct.unpack_from("<Q", data, at)
    end = at + 12 + length + 4
    if end > len(data):
      return
    yield data[at:end]
    at = end
