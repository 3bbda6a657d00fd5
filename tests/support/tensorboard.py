"""Read scalars back from TensorBoard event files (TFRecord framing + tensorboardX's Event protobuf)."""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path


def read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of one ``events.out.tfevents*`` file. A record is: length (uint64),
    its masked CRC (uint32), the serialized ``Event``, the data's masked CRC (uint32)."""
    from tensorboardX.proto.event_pb2 import Event

    data = Path(path).read_bytes()
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        event = Event.FromString(data[pos + 12: pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out[v.tag].append((event.step, v.simple_value))
    return dict(out)
