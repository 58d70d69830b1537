"""TensorBoard event files: round trip through torch's SummaryWriter, CRC checks, corrupt and
torn records, resumed runs (bad-inputs.md A14, D15, D16)."""
from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from loaders.errors import DataWarnings  # noqa: E402
from loaders.formats.tensorboard import crc32c, iter_records, masked_crc32c, read_tensorboard  # noqa: E402


def write_run(d: Path, steps: range, base: float = 0.0, every_eval: int = 5) -> Path:
    w = SummaryWriter(log_dir=str(d))
    for s in steps:
        w.add_scalar("train/loss", base + 1.0 / (s + 1), s)
        w.add_scalar("train/grad_norm", 2.0 + s, s)
        w.add_scalar("train/learning_rate", 1e-3, s)
        w.add_scalar("train/epoch", s / 10, s)
        if s % every_eval == 0:
            w.add_scalar("eval/loss", base + 0.5 / (s + 1), s)
            w.add_scalar("eval/g1_loss", base + 0.7 / (s + 1), s)
    w.close()
    files = sorted(d.glob("events.out.tfevents.*"))
    return files[-1]


def frames(data: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of every record, from the framing alone (reference parser)."""
    out, off = [], 0
    while off + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[off:off + 8])
        if off + 16 + n > len(data):
            break
        out.append((off, n))
        off += 16 + n
    return out


def test_crc32c_reference_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283          # the standard CRC-32C check value
    assert crc32c(b"") == 0
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 1000):
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(b) == tb_masked(b)


def test_batched_crc_equals_scalar_crc() -> None:
    from loaders.formats.tensorboard import _masked_crc_batch
    rng = np.random.default_rng(1)
    for n in (1, 8, 61):
        mat = rng.integers(0, 256, (20, n), dtype=np.uint8)
        assert _masked_crc_batch(mat).tolist() == [masked_crc32c(row.tobytes()) for row in mat]


def test_round_trip_every_record(tmp_path: Path) -> None:
    write_run(tmp_path, range(300))
    run = read_tensorboard(tmp_path)
    loss = run.series("loss")
    assert loss["step"].tolist() == list(range(300))            # no reservoir sampling
    assert np.allclose(loss["value"], np.float32([1.0 / (s + 1) for s in range(300)]), rtol=0, atol=0)
    assert run.series("grad_norm")["value"].tolist() == [float(np.float32(2.0 + s)) for s in range(300)]
    assert set(run.evals["series"]) == {"eval/loss", "eval/g1_loss"}
    assert run.meta["val_series_preferred"] == "eval/loss"
    assert run.evals[run.evals["series"] == "eval/loss"]["step"].tolist() == list(range(0, 300, 5))
    assert run.window_averaged == {}  # logged every step: no window
    assert run.warnings == []


def test_single_file_and_lightning_tags(tmp_path: Path) -> None:
    w = SummaryWriter(log_dir=str(tmp_path))
    for s in range(10):
        w.add_scalar("train_loss", 1.0 + s, s)
        w.add_scalar("val_loss", 2.0 + s, s)
        w.add_scalar("epoch", 0, s)
    w.close()
    f = next(tmp_path.glob("events.out.tfevents.*"))
    run = read_tensorboard(f)
    assert run.series("loss")["value"].tolist() == [1.0 + s for s in range(10)]
    assert run.evals["loss"].tolist() == [2.0 + s for s in range(10)]


def test_hf_callback_tags_mark_window(tmp_path: Path) -> None:
    w = SummaryWriter(log_dir=str(tmp_path))
    for s in range(25, 501, 25):
        w.add_scalar("train/loss", 1.0, s)
        w.add_scalar("train/learning_rate", 1e-3, s)
        w.add_scalar("train/epoch", s / 500, s)
    w.close()
    assert read_tensorboard(tmp_path).window_averaged == {"loss": 25}


def test_d15_torn_tail_keeps_complete_records(tmp_path: Path) -> None:
    f = write_run(tmp_path, range(50))
    data = f.read_bytes()
    f.write_bytes(data[:-7])
    fr = frames(data)
    w = DataWarnings()
    recs = list(iter_records(f, w))
    assert len(recs) == len(fr) - 1
    off_last = fr[-1][0]
    assert w == [f"{f}: record {len(fr) - 1} at offset {off_last} incomplete (length {fr[-1][1]} exceeds the "
                 f"{len(data) - 7 - off_last - 12} bytes left); {len(data) - 7 - off_last} bytes unread"]
    run = read_tensorboard(tmp_path)
    assert len(run.series("loss")) >= 48


def test_d15_flipped_payload_byte(tmp_path: Path) -> None:
    f = write_run(tmp_path, range(50))
    data = bytearray(f.read_bytes())
    fr = frames(bytes(data))
    k = len(fr) // 2
    off = fr[k][0]
    data[off + 12] ^= 0xFF
    f.write_bytes(bytes(data))
    w = DataWarnings()
    recs = list(iter_records(f, w))
    assert [r[0] for r in recs] == list(range(k))
    assert w == [f"{f}: record {k} at offset {off} fails CRC; {len(data) - off} bytes unread"]


def test_d15_huge_length_allocates_nothing(tmp_path: Path) -> None:
    f = write_run(tmp_path, range(20))
    data = bytearray(f.read_bytes())
    fr = frames(bytes(data))
    k = 3
    off = fr[k][0]
    length = struct.pack("<Q", 2**60)
    data[off:off + 12] = length + struct.pack("<I", masked_crc32c(length))   # a valid length CRC
    f.write_bytes(bytes(data))
    w = DataWarnings()
    assert len(list(iter_records(f, w))) == k
    assert len(w) == 1 and f"record {k} at offset {off} incomplete (length {2**60} exceeds" in w[0]
    # The same length with a wrong length CRC is caught by the length check.
    data[off + 8:off + 12] = b"\0\0\0\0"
    f.write_bytes(bytes(data))
    w2 = DataWarnings()
    assert len(list(iter_records(f, w2))) == k and "fails CRC (length field)" in w2[0]


def test_d16_two_writers_resumed_run(tmp_path: Path) -> None:
    write_run(tmp_path, range(10), base=0.0)
    write_run(tmp_path, range(5, 13), base=100.0)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    run = read_tensorboard(tmp_path)
    loss = run.series("loss")
    assert loss["step"].tolist() == list(range(13))
    exp = [np.float32(1.0 / (s + 1)) if s < 5 else np.float32(100.0 + 1.0 / (s + 1)) for s in range(13)]
    assert np.array_equal(loss["value"].to_numpy(np.float32), np.array(exp, dtype=np.float32))
    assert f"{tmp_path}: resume at step 5 (overlap 5-9)" in run.warnings


def test_a14_dev_zero_event_file_terminates(tmp_path: Path) -> None:
    write_run(tmp_path, range(5))
    os.symlink("/dev/zero", tmp_path / "events.out.tfevents.1")
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(run=read_tensorboard(tmp_path)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive()
    run = box["run"]
    assert len(run.series("loss")) == 5  # type: ignore[attr-defined]
    bad = [w for w in run.warnings if "events.out.tfevents.1: " in w]  # type: ignore[attr-defined]
    assert len(bad) == 1 and ("symlink leaves run dir" in bad[0] or "not a regular file" in bad[0])


def test_keras_style_split_folders(tmp_path: Path) -> None:
    for split, base in (("train", 1.0), ("validation", 2.0)):
        w = SummaryWriter(log_dir=str(tmp_path / split))
        for s in range(3):
            w.add_scalar("epoch_loss", base + s, s)
        w.close()
    run = read_tensorboard(tmp_path)
    assert run.series("loss")["value"].tolist() == [1.0, 2.0, 3.0]
    assert run.evals["series"].unique().tolist() == ["validation/epoch_loss"]


def test_missing_tensorboard_gives_an_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from loaders.errors import TrainauditError
    f = write_run(tmp_path, range(3))
    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto.event_pb2", None)
    with pytest.raises(TrainauditError, match=r"pip install trainaudit\[tensorboard\]"):
        read_tensorboard(f)


def test_lightning_tensorboard_versions_and_checkpoints(tmp_path: Path) -> None:
    """Lightning's TensorBoardLogger layout: the newest version_N is read (like its CSV logs) with
    the checkpoints in version_N/checkpoints/, each at the global_step stored in it."""
    import torch

    logs = tmp_path / "lightning_logs"
    write_run(logs / "version_0", range(0, 5), base=10.0)
    write_run(logs / "version_1", range(0, 8))
    (logs / "version_1" / "checkpoints").mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 8}, logs / "version_1" / "checkpoints" / "last.ckpt")
    run = read_tensorboard(tmp_path)
    assert run.series("loss")["step"].tolist() == list(range(8))
    assert all(v < 10.0 for v in run.series("loss")["value"])
    assert [(c.step, c.path.name) for c in run.checkpoints] == [(8, "last.ckpt")]
    assert len(run.warnings) == 1 and "reading version_1 (newest), not version_0" in run.warnings[0]
