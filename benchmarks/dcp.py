"""A GPT-2-small-shaped ``torch.distributed.checkpoint`` folder (written by ``dcp.save``, no
process group): `audit` and `spectral` as whole processes, their peak RSS against the largest
tensor, time as ratios to T0 and to reading the bytes. Then `audit` on the same weights saved as
FSDP ranks save them: every tensor split by rows over 8 ranks, one stored item per rank's rows.

    python benchmarks/dcp.py [--dir /tmp/ta-bench] [--ranks 8]

Target: peak RSS under 2x the largest tensor (wte, 50257 x 768 float32 = 154 MB) on top of what
the same process holds before it reads any tensor (the imports: torch, the analysis,
torch.distributed.checkpoint), measured as a baseline process importing the same modules.
Prints figures; not a test.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import files_of, read_seconds, row, run, t0, trainaudit  # noqa: E402

IMPORTS = ("import torch, torch.distributed.checkpoint, analyze.cli.checkpoint, analyze.pipeline.audit, "
           "loaders.dcp, loaders.tensor_reader, analyze.metrics.spectral")


def write_dcp(folder: Path) -> tuple[Path, int]:
    """GPT-2-small weights (``_gpt2_weights``, float32) saved with torch.distributed.checkpoint."""
    import torch
    import torch.distributed.checkpoint as dcp

    from _gpt2_weights import GPT2_SMALL, _tensor

    out = folder / "gpt2-dcp"
    largest = max(4 * math.prod(s) for _, s in GPT2_SMALL.shapes())
    if not (out / ".metadata").is_file():
        g = torch.Generator().manual_seed(0)
        sd = {name: _tensor(name, shape, GPT2_SMALL, "trained", g).contiguous() for name, shape in GPT2_SMALL.shapes()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(out))
    return out, largest


class _RowShards:
    """A tensor saved as `ranks` row blocks, each its own storage item (FSDP's dim-0 shards)."""

    def __init__(self, full: object, ranks: int) -> None:
        import torch

        assert isinstance(full, torch.Tensor)
        self.full = full
        n = full.shape[0] if full.dim() else 1
        step = -(-n // ranks)
        self.rows = [(a, min(a + step, n)) for a in range(0, n, step)] if full.dim() else [(0, 1)]

    def __create_write_items__(self, fqn: str, obj: object) -> list:
        import torch
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        props, rest = TensorProperties.create_from_tensor(self.full), tuple(self.full.shape[1:])
        items = []
        for a, b in self.rows:
            off = torch.Size((a,) + (0,) * len(rest)) if self.full.dim() else torch.Size()
            size = torch.Size((b - a,) + rest) if self.full.dim() else torch.Size()
            items.append(WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(off, size),
                                                               properties=props, size=self.full.size())))
        return items

    def block(self, offsets: object) -> object:
        if not self.full.dim():
            return self.full
        a = offsets[0]  # type: ignore[index]
        b = next(e for s, e in self.rows if s == a)
        return self.full[a:b].clone()


def write_dcp_sharded(folder: Path, ranks: int) -> Path:
    """The same weights with every tensor stored as `ranks` row blocks, one file per writer
    thread (torch's planner asks each tensor for its blocks, no process group)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from _gpt2_weights import GPT2_SMALL, _tensor

    class Planner(DefaultSavePlanner):
        def lookup_object(self, index):  # type: ignore[no-untyped-def]
            obj = self.state_dict[index.fqn]
            return obj.block(index.offset) if isinstance(obj, _RowShards) else super().lookup_object(index)

    out = folder / f"gpt2-dcp-{ranks}ranks"
    if not (out / ".metadata").is_file():
        g = torch.Generator().manual_seed(0)
        sd = {name: _RowShards(_tensor(name, shape, GPT2_SMALL, "trained", g).contiguous(), ranks)
              for name, shape in GPT2_SMALL.shapes()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, storage_writer=FileSystemWriter(str(out), thread_count=2), planner=Planner())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ta-bench")
    ap.add_argument("--ranks", type=int, default=8, help="row blocks per tensor in the FSDP-style folder")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    folder, largest = write_dcp(args.dir)
    sharded = write_dcp_sharded(args.dir, args.ranks)
    files = files_of(folder)
    read = read_seconds(files)
    base = t0()
    imports = run([sys.executable, "-c", IMPORTS])
    print(f"T0 = python -c 'import torch': {base.wall:.2f} s wall, {base.cpu:.2f} s cpu")
    print(f"DCP folder {folder}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB, "
          f"largest tensor {largest / 2**20:.0f} MiB; reading the bytes {read:.2f} s")
    print(f"baseline: a process importing what audit imports peaks at {imports.peak_mb:.0f} MiB")
    for label, r in (("audit DIR --json", trainaudit("audit", str(folder), "--json")),
                     ("spectral DIR --json", trainaudit("spectral", str(folder), "--json")),
                     (f"audit DIR --json ({args.ranks} row chunks)", trainaudit("audit", str(sharded), "--json"))):
        print(row(label, r, base, read))
        extra = r.peak_mb - imports.peak_mb
        print(f"    peak above the import baseline: {extra:.0f} MiB = {extra * 2**20 / largest:.2f} x "
              f"the largest tensor (target < 2)")


if __name__ == "__main__":
    main()
