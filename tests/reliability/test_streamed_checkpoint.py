"""Memory shards and row-sparse optimizer state stream through the checkpoint in row blocks
(smft_dist/checkpoint/layout.py): a streamed file holds what `safetensors.save_file` writes,
saving and loading allocate at most a block of host memory where the whole-shard code allocated a
shard, a rank resharding reads only the rows it owns, and the manifest's hashes, taken while the
bytes went out, are those of the files.

The tables are several blocks large with a small block (BLOCK), so every path crosses block
boundaries, including a last partial block."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from smft_dist.checkpoint import layout
from smft_dist.memory.values import ValueTable
from smft_dist.optim import RowSparseAdamW

ROWS, DIM = 3000, 64  # fp32: 256 bytes a row, 750 KiB a table
BLOCK = 64 << 10  # 256 rows a block: 11.7 blocks a table, the last one partial


def _table(row_start=0, row_end=ROWS, dtype=torch.float32, seed=0) -> ValueTable:
    t = ValueTable(ROWS, DIM, row_start, row_end, dtype=dtype)
    full = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)
    t.weight.data.copy_(full[row_start:row_end])
    return t


def _row_state(ids_S: torch.Tensor) -> dict:
    """An AdamW-shaped row state ({"lr", "tables": [{"ids", exp_avg, exp_avg_sq, step}]}), ids in
    the order given (a RowState's slot order, not sorted)."""
    g = torch.Generator().manual_seed(1)
    S = ids_S.numel()
    return {"lr": 0.25, "tables": [{"ids": ids_S, "exp_avg": torch.randn(S, DIM, generator=g),
                                    "exp_avg_sq": torch.rand(S, DIM, generator=g),
                                    "step": torch.randint(1, 9, (S,), generator=g)}]}


def _split(n_parts: int) -> list[tuple[int, int]]:
    """Row-wise block sharding of ROWS over `n_parts` ranks (ceil block, remainder on the last)."""
    block = math.ceil(ROWS / n_parts)
    return [(r * block, min((r + 1) * block, ROWS)) for r in range(n_parts)]


def _rows_file(step_dir, a, b):
    return step_dir / "memory" / f"layer0.rows_{a}_{b}.safetensors"


# ----- (a) the format -----
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_shard_holds_what_save_file_writes(dtype, tmp_path):
    t = _table(100, 2900, dtype)
    (tmp_path / "old").mkdir()
    save_file({"rows": t.weight.detach().cpu().contiguous()}, str(tmp_path / "old" / "shard.safetensors"),
              metadata={"num_rows": str(ROWS), "dim": str(DIM)})  # the unstreamed writer
    layout.save_memory([t], ["layer0"], tmp_path, block_bytes=BLOCK)
    streamed = _rows_file(tmp_path, 100, 2900)
    old = load_file(str(tmp_path / "old" / "shard.safetensors"))
    new = load_file(str(streamed))  # plain safetensors loads it
    assert new.keys() == {"rows"} and new["rows"].dtype == dtype and torch.equal(new["rows"], old["rows"])
    assert torch.equal(new["rows"], t.weight)
    # same size: same header but for its key order (safetensors orders the metadata by a hash map)
    assert streamed.stat().st_size == (tmp_path / "old" / "shard.safetensors").stat().st_size
    with safe_open(str(streamed), framework="pt") as fh:
        assert fh.metadata() == {"num_rows": str(ROWS), "dim": str(DIM)}


def test_streamed_row_state_loads_with_safetensors_sorted_by_id(tmp_path):
    ids = torch.randperm(ROWS, generator=torch.Generator().manual_seed(2))[:2500]
    state = _row_state(ids)
    layout.save_row_state(state, tmp_path / "rows.safetensors", block_bytes=BLOCK)
    order = torch.argsort(ids)
    loaded = load_file(str(tmp_path / "rows.safetensors"))
    assert loaded.keys() == {f"0.{k}" for k in state["tables"][0]}
    for k, v in state["tables"][0].items():
        assert torch.equal(loaded[f"0.{k}"], v[order])
    back = layout.read_row_state(tmp_path / "rows.safetensors", 0, ROWS, block_bytes=BLOCK)
    assert back["lr"] == 0.25 and all(torch.equal(back["tables"][0][k], v[order]) for k, v in state["tables"][0].items())


# ----- (b) host memory bounded by a block -----
def _storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def _in_a_mapped_file(address: int) -> bool:
    """Whether `address` lies in a file-backed mapping of this process (/proc/self/maps): a
    safetensors slice is a view of the file's mmap, whose pages are the page cache's (read as
    touched, dropped under pressure), not an allocation."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return len(rest) >= 5 and rest[4].startswith("/")
    return False


class HostAllocations(TorchDispatchMode):
    """The host (CPU) storages torch ops create while active, as (address, bytes): what an op
    returns on a storage that no `exempt` tensor (the table saved from or loaded into) has and
    that is not a file's mmap. Sees every host allocation of the paths measured: torch ops, and
    safetensors' slices (a storage set into a fresh tensor, aten.set_). The streamed code holds at
    most two of them at once (the write buffer and a block's gather; a read block and its dtype
    conversion), so its extra host memory is at most twice `largest()`."""

    def __init__(self, *exempt: torch.Tensor):
        super().__init__()
        self.seen = {_storage(t) for t in exempt}
        self.created: set[tuple[int, int]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and _storage(o) not in self.seen:
                self.seen.add(_storage(o))
                if not _in_a_mapped_file(_storage(o)[0]):
                    self.created.add(_storage(o))
        return out

    def largest(self, results=()) -> int:
        """The largest storage created, other than those of `results` (what the call returned)."""
        return max((nbytes for _, nbytes in self.created - {_storage(t) for t in results}), default=0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_save_and_load_allocate_a_block_of_host_memory_where_the_whole_shard_code_allocated_a_shard(device, tmp_path):
    t = _table()
    t.weight.data = t.weight.data.to(device)
    ids = torch.randperm(ROWS, generator=torch.Generator().manual_seed(3))
    state = _row_state(ids)
    state["tables"][0] = {k: v.to(device) for k, v in state["tables"][0].items()}
    tensors = list(state["tables"][0].values())
    # the argsort order (8 bytes a row, as the ids themselves) is the one shard-long tensor a
    # row-state save makes: it lives where the state does (the device on CUDA; 24 KiB < BLOCK here)
    with HostAllocations(t.weight) as save:
        layout.save_memory([t], ["layer0"], tmp_path, block_bytes=BLOCK)
    with HostAllocations(*tensors) as save_state:
        layout.save_row_state(state, tmp_path / "rows.safetensors", block_bytes=BLOCK)
    loaded = _table(dtype=torch.bfloat16, seed=9)  # an fp32 checkpoint into a bf16 table: rows are converted
    loaded.weight.data = loaded.weight.data.to(device)
    with HostAllocations(loaded.weight) as load:
        layout.load_memory([loaded], ["layer0"], tmp_path, block_bytes=BLOCK)
    with HostAllocations() as read_state:  # its result is the rank's rows: the destination, like a weight
        back = layout.read_row_state(tmp_path / "rows.safetensors", 0, ROWS, device, block_bytes=BLOCK)
    assert torch.equal(loaded.weight, t.weight.bfloat16())
    order = torch.argsort(ids)
    assert all(torch.equal(back["tables"][0][k], v[order.to(device)]) for k, v in state["tables"][0].items())
    # the write buffer is the largest allocation of a save: one block (256 rows of 256 bytes); a
    # load converts a block at a time (256 rows of 128 bf16 bytes); a read in the file's dtype
    # copies from the file's mmap into the result, allocating nothing on the host
    assert save.largest() == BLOCK and save_state.largest() == BLOCK and load.largest() == BLOCK // 2
    assert read_state.largest(back["tables"][0].values()) == 0

    # the whole-shard code: the shard moved to the host at once (a copy from a device; on the
    # host, `.cpu()` is the table itself), the state gathered in id order at once, the
    # overlapping rows converted at once
    with HostAllocations(t.weight) as old_save:
        save_file({"rows": t.weight.detach().cpu().contiguous()}, str(tmp_path / "old.safetensors"))
    with HostAllocations(*tensors) as old_save_state:
        save_file({f"0.{k}": v[order.to(device)].cpu().contiguous() for k, v in state["tables"][0].items()},
                  str(tmp_path / "old_rows.safetensors"))
    with safe_open(str(_rows_file(tmp_path, 0, ROWS)), framework="pt") as fh, HostAllocations(loaded.weight) as old_load:
        loaded.weight[:] = fh.get_slice("rows")[0:ROWS].to(torch.bfloat16)
    shard_bytes = ROWS * DIM * 4
    assert old_save.largest() == (shard_bytes if device == "cuda" else 0)
    assert old_save_state.largest() == shard_bytes and old_load.largest() == shard_bytes // 2


# ----- (c) resharding reads only the overlapping rows -----
class CountingSafeOpen:
    """`safe_open` whose slices count the bytes each read returns, per file name."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.largest_read = 0

    def __call__(self, path, framework):
        counter, name, inner = self, path.rsplit("/", 1)[-1], safe_open(path, framework=framework)

        class Handle:
            def __enter__(self):
                inner.__enter__()
                return self

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

            def __getattr__(self, attr):  # metadata, keys: the real file's
                return getattr(inner, attr)

            def get_slice(self, key):
                sliced = inner.get_slice(key)

                class Slice:
                    def __getattr__(self, attr):  # get_shape, get_dtype: the real slice's
                        return getattr(sliced, attr)

                    def __getitem__(self, index):
                        out = sliced[index]
                        nbytes = out.numel() * out.element_size()
                        counter.bytes[name] = counter.bytes.get(name, 0) + nbytes
                        counter.largest_read = max(counter.largest_read, nbytes)
                        return out
                return Slice()
        return Handle()


@pytest.mark.parametrize("saved, loaded", [(2, 3), (3, 1)])
def test_resharding_reads_only_the_rows_each_rank_owns(saved, loaded, tmp_path, monkeypatch):
    ids = torch.randperm(ROWS, generator=torch.Generator().manual_seed(4))[:2000]
    state = _row_state(ids)
    (tmp_path / "memory_optim").mkdir()
    for a, b in _split(saved):
        layout.save_memory([_table(a, b)], ["layer0"], tmp_path, block_bytes=BLOCK)
        mine = (ids >= a) & (ids < b)
        part = {"lr": state["lr"], "tables": [{k: v[mine] for k, v in state["tables"][0].items()}]}
        layout.save_row_state(part, tmp_path / "memory_optim" / f"rows_{a}_{b}.safetensors", block_bytes=BLOCK)
    whole, order = _table(), torch.argsort(ids)
    for lo, hi in _split(loaded):
        counting = CountingSafeOpen()
        monkeypatch.setattr(layout, "safe_open", counting)
        shard = _table(lo, hi, seed=9)
        layout.load_memory([shard], ["layer0"], tmp_path, block_bytes=BLOCK)
        optimizer = RowSparseAdamW([shard], lr=1.0)
        layout.load_memory_optimizer(optimizer, [shard], tmp_path, block_bytes=BLOCK)
        monkeypatch.undo()
        assert 0 < counting.largest_read <= BLOCK  # ranged reads of a block at most
        assert torch.equal(shard.weight, whole.weight[lo:hi])
        got = optimizer.state_dict()["tables"][0]
        mine_sorted = order[(ids[order] >= lo) & (ids[order] < hi)]  # the files are read in id order
        for k, v in state["tables"][0].items():
            assert torch.equal(got[k], v[mine_sorted]), k
        for a, b in _split(saved):
            overlap = max(0, min(b, hi) - max(a, lo))
            memory_file, state_file = f"layer0.rows_{a}_{b}.safetensors", f"rows_{a}_{b}.safetensors"
            assert counting.bytes.get(memory_file, 0) == overlap * DIM * 4  # exactly the rows this rank owns
            file_ids = ids[(ids >= a) & (ids < b)]
            rows_in = int(((file_ids >= lo) & (file_ids < hi)).sum()) if overlap else 0
            # exp_avg, exp_avg_sq (DIM fp32), step and ids (int64) of those rows, plus one int64 id per
            # probe of the two binary searches over the file's ids
            probes = 2 * (math.ceil(math.log2(file_ids.numel() + 1)) + 1)
            state_bytes = counting.bytes.get(state_file, 0) - rows_in * (2 * DIM * 4 + 8 + 8)
            assert (0 <= state_bytes <= probes * 8) if overlap else counting.bytes.get(state_file, 0) == 0


# ----- (d) the manifest's hashes, taken while streaming -----
def test_manifest_hashes_taken_while_streaming_are_the_files_and_no_streamed_file_is_read_again(tmp_path,
                                                                                               monkeypatch):
    t = _table(0, 1700)
    (tmp_path / "memory_optim").mkdir()
    hashed = layout.save_memory([t], ["layer0"], tmp_path, block_bytes=BLOCK)
    hashed["memory_optim/rows_0_1700.safetensors"] = layout.save_row_state(
        _row_state(torch.arange(1699, -1, -7)), tmp_path / "memory_optim" / "rows_0_1700.safetensors",
        block_bytes=BLOCK)
    (tmp_path / "data.json").write_text("{}")  # a file written whole: hashed by reading it back
    reread = []
    sha256 = layout._sha256
    monkeypatch.setattr(layout, "_sha256", lambda p: reread.append(p.name) or sha256(p))
    layout.write_manifest(tmp_path, hashed)
    assert reread == ["data.json"]
    manifest = json.loads((tmp_path / layout.MANIFEST).read_text())
    assert manifest.keys() == {"data.json", "memory/layer0.rows_0_1700.safetensors",
                               "memory_optim/rows_0_1700.safetensors"}
    for name, entry in manifest.items():
        data = (tmp_path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert layout.verify_checkpoint(tmp_path) == []


def test_a_row_state_tensor_short_of_its_ids_is_named_as_damaged(tmp_path):
    """Reading fills a preallocated result block by block: a state tensor with fewer rows than its
    ids (a valid header over a damaged file) must fail, not leave rows of the result unwritten."""
    save_file({"0.ids": torch.arange(10), "0.exp_avg": torch.zeros(7, 4)}, str(tmp_path / "rows_0_10.safetensors"),
              metadata={"lr": "0.1", "tables": "1"})
    with pytest.raises(layout.CheckpointError, match=r"rows_0_10.safetensors is unreadable .*0.exp_avg has 7 rows"):
        layout.read_row_state(tmp_path / "rows_0_10.safetensors", 0, 10, block_bytes=BLOCK)


def test_a_memory_shard_short_of_the_rows_its_name_says_is_named_as_damaged(tmp_path):
    (tmp_path / "memory").mkdir()
    save_file({"rows": torch.zeros(90, DIM)}, str(_rows_file(tmp_path, 0, ROWS)),
              metadata={"num_rows": str(ROWS), "dim": str(DIM)})
    with pytest.raises(layout.CheckpointError, match=r"holds \[90, 64\] rows, its name says \[3000, 64\]"):
        layout.load_memory([_table(seed=9)], ["layer0"], tmp_path, block_bytes=BLOCK)
