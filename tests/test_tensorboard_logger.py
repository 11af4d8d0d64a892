"""`logger=tensorboard`: a run writes TensorBoard event files holding its train loss and its dev metric.

The files are read back by a reader written here from the formats' specifications (TFRecord framing
with masked CRC-32C, the protobuf wire format of `Event` and `Summary`), and also by TensorBoard's own
EventAccumulator where the tensorboard package is installed.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import pytest

from kdexp.errors import ConfigError
from kdexp.loggers import crc32c, event_record
from kdexp.run import compose_config, run
from tests.test_pipeline import tiny_cfg


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(message: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    fields, at = [], 0
    while at < len(message):
        key, at = _varint(message, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(message, at)
        elif wire == 1:
            value, at = struct.unpack_from("<d", message, at)[0], at + 8
        elif wire == 5:
            value, at = struct.unpack_from("<f", message, at)[0], at + 4
        elif wire == 2:
            length, at = _varint(message, at)
            value, at = message[at : at + length], at + length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.append((number, wire, value))
    return fields


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[bytes]:
    """The records of a TFRecord file, each checksum checked."""
    data, at, records = path.read_bytes(), 0, []
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack_from("<I", data, at + 8)[0] == _masked(crc32c(header)), f"{path}: bad length CRC"
        record = data[at + 12 : at + 12 + length]
        assert struct.unpack_from("<I", data, at + 12 + length)[0] == _masked(crc32c(record)), f"{path}: bad CRC"
        records.append(record)
        at += 12 + length + 4
    return records


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files under `folder`; the first event of each file
    is its file version."""
    found: dict[str, list[tuple[int, float]]] = defaultdict(list)
    files = sorted(folder.rglob("*tfevents*"))
    assert files, f"no event file under {folder}"
    for path in files:
        events = [dict((n, v) for n, _, v in _fields(record)) for record in read_events(path)]
        assert events[0].get(3) == b"brain.Event:2", events[0]
        for event in events:
            if 5 not in event:
                continue
            for number, _, value in _fields(event[5]):  # Summary.value
                assert number == 1
                fields = {n: (w, v) for n, w, v in _fields(value)}
                if 2 in fields and fields[2][0] == 5:  # simple_value
                    found[fields[1][1].decode()].append((int(event.get(2, 0)), fields[2][1]))
    return dict(found)


def test_crc32c_is_the_castagnoli_checksum() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0


def test_an_event_record_reads_back_as_written() -> None:
    record = event_record(12.5, 7, {"train/loss": 0.25, "val/accuracy": 0.5})
    (length,) = struct.unpack_from("<Q", record)
    event = {n: v for n, _, v in _fields(record[12 : 12 + length])}
    assert event[1] == 12.5 and event[2] == 7
    values = [{n: v for n, _, v in _fields(value)} for _, _, value in _fields(event[5])]
    assert values == [{1: b"train/loss", 2: 0.25}, {1: b"val/accuracy", 2: 0.5}]


def test_the_logger_type_accepts_tensorboard_and_names_it_when_refusing() -> None:
    from kdexp.config import LoggerSchema

    assert compose_config(["logger=tensorboard"]).logger.type == "tensorboard"
    LoggerSchema(type="tensorboard").check()
    with pytest.raises(ConfigError, match="tensorboard"):
        LoggerSchema(type="tensorbored").check()


def test_a_run_with_logger_tensorboard_writes_its_train_loss_and_dev_metric(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "task=sst2",
        "method=vanilla_kd",
        "logger=tensorboard",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=2",
    )
    results = run(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "tensorboard"
    logged = scalars(folder)
    assert {"train/loss", "train/loss/ce", "train/loss/kd", "val/accuracy"} <= set(logged), sorted(logged)
    steps = [step for step, _ in logged["train/loss"]]
    assert len(steps) == 6 and steps == sorted(steps)  # 12 rows in batches of 4, 2 epochs, every step logged
    assert all(value == value and value >= 0 for _, value in logged["train/loss"])
    assert len(logged["val/accuracy"]) >= 2  # a dev score per epoch (and the final evaluation)
    best = results["metrics"]["val/accuracy"]
    assert any(abs(value - best) < 1e-6 for _, value in logged["val/accuracy"]), (best, logged["val/accuracy"])

    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    assert {"train/loss", "val/accuracy"} <= set(accumulator.Tags()["scalars"])
