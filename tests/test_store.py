"""The client store (#15): memory and disk backends give bitwise identical runs; the disk store's incremental,
versioned checkpoints survive a crash between the shard files and the main file."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from fedlit.federation import checkpoint as checkpoint_module
from fedlit.federation.checkpoint import (
    CHECKPOINT_NAME,
    Identity,
    disk_store_of,
    load_checkpoint,
    restore,
)
from fedlit.federation.experiment import run_experiment
from fedlit.federation.store import (
    DiskStore,
    MemoryStore,
    RecordTable,
    choose_backend,
    estimated_bytes,
    pack_tree,
    read_tree,
    shard_file,
    write_tree,
)
from fedlit.state import ClientState, StoreEntry
from tests.helpers import fast_config, only_run_dir, read_results

PFEDMOAP = ["algorithm=pfedmoap", "optim.persistent_state=true", "fed.frac=0.5", "fed.rounds=4"]


def entry(value: float, last_round: int) -> StoreEntry:
    """A store entry with one 2x3 prompt of ``value`` and list/int extras (as pFedMoAP keeps)."""
    return StoreEntry(ClientState({"prompt_learner.ctx": torch.full((2, 3), value)}),
                      {"experts": torch.ones(1, 2, 3) * value, "expert_keys": [[1, last_round]]}, last_round)


def test_disk_store_writes_only_the_changed_shards_as_new_versions(tmp_path):
    store = DiskStore(tmp_path, shard_size=2)
    for cid in (0, 1, 4):
        store.put(cid, entry(float(cid), 1))
    manifest = store.commit(1)
    assert manifest == {0: shard_file(0, 1), 2: shard_file(2, 1)}
    store.put(1, entry(10.0, 2))
    assert store.commit(2) == {0: shard_file(0, 2), 2: shard_file(2, 1)}  # shard 2 untouched: not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([shard_file(0, 1), shard_file(0, 2), shard_file(2, 1)])
    assert [p.name for p in store.remove_unlisted()] == [shard_file(0, 1)]
    assert store.ids() == [0, 1, 4] and len(store) == 3
    assert store.get(1).state.params["prompt_learner.ctx"][0, 0].item() == 10.0
    assert store.get(0).extras["expert_keys"] == [[1, 1]] and store.get(3) is None
    got = store.get_many([4, 3, 0])
    assert got[3] is None and got[4].last_round == 1 and got[0].state.params["prompt_learner.ctx"].sum() == 0
    assert [(c, e.last_round) for c, e in store.items()] == [(0, 1), (1, 2), (4, 1)]
    listed = store.manifest_tensors()  # what a checkpoint's main file keeps
    assert [t.tolist() for t in listed.values()] == [[0, 2], [2, 1], [0, 1, 4]]
    reopened = DiskStore(tmp_path, shard_size=2)
    reopened.load_manifest(listed)
    assert reopened.manifest == store.manifest and reopened.index == store.index
    assert reopened.listed_files() == [shard_file(0, 2), shard_file(2, 1)]


def test_shard_files_keep_trees_exactly(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tree = {0: {"state": {"a": base, "view": base[1], "bf16": torch.ones(2, dtype=torch.bfloat16) / 3,
                          "empty": torch.zeros(0, 5), "ints": torch.tensor([7, -1])},
                "extras": {"expert_keys": [[1, 2], [3, 4]], "pair": (1.5, "x"), "nan": float("nan"), "none": None},
                "last_round": 3},
            17: {"same_object_twice": [base, base], "flag": True}}
    write_tree(tmp_path / "t.safetensors", tree)
    got = read_tree(tmp_path / "t.safetensors")
    assert_same_tree(tree, got)
    assert list(got) == [0, 17] and isinstance(got[0]["extras"]["pair"], tuple)
    with pytest.raises(TypeError, match="object"):
        pack_tree({"x": object()})
    with pytest.raises(TypeError, match="key of type float"):
        pack_tree({1.5: 1})
    (tmp_path / "foreign.safetensors").write_bytes(safetensors.torch.save({"w": torch.ones(1)}))
    with pytest.raises(ValueError, match="not a fedlit shard file"):
        read_tree(tmp_path / "foreign.safetensors")


def test_record_table_writes_only_the_records_that_changed(tmp_path):
    table = RecordTable(tmp_path, shard_size=1)
    records = {c: {"ctx": torch.full((2,), float(c)), "round": 1} for c in range(3)}
    assert table.put_changed(records) == [0, 1, 2]
    table.commit(1)
    records = {**records, 1: {"ctx": torch.zeros(2), "round": 2}, 5: {"ctx": torch.ones(2), "round": 2}}
    assert table.put_changed(records) == [1, 5]  # replaced or new objects only
    assert table.commit(2) == {0: shard_file(0, 1, "record"), 1: shard_file(1, 2, "record"),
                               2: shard_file(2, 1, "record"), 5: shard_file(5, 2, "record")}
    assert table.put_changed(dict(records)) == []
    reopened = RecordTable(tmp_path, 1, table.manifest, table.index)
    assert_same_tree(records, reopened.load_all())
    assert reopened.put_changed(reopened.known) == []
    with pytest.raises(RuntimeError, match="never removed"):
        reopened.put_changed({0: records[0]})
    assert [p.name for p in table.remove_unlisted()] == [shard_file(1, 1, "record")]


def test_remove_unlisted_leaves_foreign_files_alone(tmp_path):
    store = DiskStore(tmp_path, shard_size=4)
    store.put(0, entry(1.0, 1))
    store.commit(1)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / shard_file(0, 7)).write_bytes(b"a version of a checkpoint that never completed")
    temporary = f".{shard_file(1, 7)}.x1y2.tmp"
    (tmp_path / temporary).write_bytes(b"half")
    assert sorted(p.name for p in store.remove_unlisted()) == sorted([shard_file(0, 7), temporary])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", shard_file(0, 1)]


def test_auto_backend_follows_the_memory_budget():
    flat = {"a": torch.zeros(256, 256)}  # 256 KiB per client
    assert estimated_bytes(flat, 1000, persistent_state=True) == 2 * 256 * 1024 * 1000
    assert choose_backend("auto", estimated_bytes(flat, 1000, False), 300.0) == "memory"  # 250 MiB
    assert choose_backend("auto", estimated_bytes(flat, 1000, True), 300.0) == "disk"  # 500 MiB
    assert choose_backend("memory", 10**15, 1.0) == "memory"


def assert_same_tree(expected, got) -> None:
    """Two trees of dicts, lists, tuples, numbers and tensors are equal, tensors bitwise (dtype included); dict
    order aside."""
    assert type(expected) is type(got)
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == got.dtype and torch.equal(expected, got)
    elif isinstance(expected, dict):
        assert sorted(expected, key=str) == sorted(got, key=str)
        for key in expected:
            assert_same_tree(expected[key], got[key])
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            assert_same_tree(a, b)
    else:
        assert expected == got or (expected != expected and got != got)  # NaN equals NaN here


def restored_store(run_dir, shard_size: int) -> DiskStore:
    """The disk store a finished run's checkpoint lists."""
    payload = load_checkpoint(run_dir / CHECKPOINT_NAME)
    identity = Identity(payload["algorithm"], payload["config_digest"], payload["partition_digest"])
    return restore(run_dir / CHECKPOINT_NAME, identity, run_dir / "store").store


def assert_same_store(memory: MemoryStore | dict, disk: DiskStore) -> None:
    """Every entry of both stores is bitwise equal (tensors, extras, last round)."""
    memory = {int(c): StoreEntry.from_dict(e) for c, e in memory.items()}
    assert sorted(memory) == disk.ids()
    for cid, expected in memory.items():
        got = disk.get(cid)
        assert got.last_round == expected.last_round
        for name, value in expected.state.flat().items():
            assert torch.equal(value, got.state.flat()[name]), (cid, name)
        assert expected.extras.keys() == got.extras.keys()
        if "experts" in expected.extras:
            assert torch.equal(expected.extras["experts"], got.extras["experts"])
            assert expected.extras["expert_keys"] == got.extras["expert_keys"]


def test_disk_and_memory_stores_give_bitwise_identical_runs(tmp_path):
    [mem] = run_experiment(fast_config(tmp_path / "mem", *PFEDMOAP))
    [disk] = run_experiment(fast_config(tmp_path / "disk", *PFEDMOAP, "store.backend=disk", "store.shard_size=2"))
    assert mem["rounds"] == disk["rounds"] and mem["memory_per_client_bytes"] == disk["memory_per_client_bytes"]
    assert len(mem["rounds"]) == 4 and mem["memory_per_client_bytes"]["extras_bytes"] > 0
    mem_dir, disk_dir = only_run_dir(tmp_path / "mem"), only_run_dir(tmp_path / "disk")
    mem_ckpt, disk_ckpt = load_checkpoint(mem_dir / CHECKPOINT_NAME), load_checkpoint(disk_dir / CHECKPOINT_NAME)
    assert "store" not in disk_ckpt and disk_ckpt["shards"]["shards"].tolist() == [0, 1]  # 4 clients, shards of 2
    assert disk_ckpt["shards"]["clients"].tolist() == [0, 1, 2, 3]
    assert torch.equal(mem_ckpt["server"]["global_state"]["ctx"], disk_ckpt["server"]["global_state"]["ctx"])
    assert_same_store(mem_ckpt["store"], restored_store(disk_dir, 2))
    # the server's pool is in its own record shards, not in the main file, and equals the memory run's
    assert "client_records" not in disk_ckpt["server"] and set(mem_ckpt["server"]["client_records"]) == {0, 1, 2, 3}
    records = restore(disk_dir / CHECKPOINT_NAME, Identity(disk_ckpt["algorithm"], disk_ckpt["config_digest"],
                                                           disk_ckpt["partition_digest"]), disk_dir / "store")
    assert_same_tree(mem_ckpt["server"]["client_records"], records.server.client_records)
    # compacted: exactly the listed version of each shard is left
    listed = [name for table in disk_store_of(disk_ckpt, disk_dir / "store") for name in table.listed_files()]
    assert sorted(p.name for p in (disk_dir / "store").iterdir()) == sorted(listed)


def test_a_crash_between_the_shards_and_the_main_file_resumes_identically(tmp_path, monkeypatch):
    disk = ["store.backend=disk", "store.shard_size=2"]
    [straight] = run_experiment(fast_config(tmp_path / "straight", *PFEDMOAP, *disk))
    original = checkpoint_module.save_checkpoint

    def crash_in_round_3(path, state, identity):
        if state.server.round == 3:  # round 3's shard files are written, its main file is not
            raise KeyboardInterrupt("simulated crash")
        original(path, state, identity)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(fast_config(tmp_path / "cut", *PFEDMOAP, *disk))
    run_dir = only_run_dir(tmp_path / "cut")
    files = sorted(p.name for p in (run_dir / "store").iterdir())
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["server"]["round"] == 2
    assert any(".r000003." in name for name in files)  # unlisted versions of the unfinished round
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", original)
    [resumed] = run_experiment(fast_config(tmp_path / "cut", *PFEDMOAP, *disk, "run.resume=auto"))
    assert resumed["rounds"] == straight["rounds"]
    assert read_results(run_dir)["rounds"] == read_results(only_run_dir(tmp_path / "straight"))["rounds"]
    final = load_checkpoint(run_dir / CHECKPOINT_NAME)
    listed = [name for table in disk_store_of(final, run_dir / "store") for name in table.listed_files()]
    assert sorted(p.name for p in (run_dir / "store").iterdir()) == sorted(listed)


@pytest.mark.parametrize("first, then", [("memory", "disk"), ("disk", "memory")])
def test_a_run_resumes_on_the_other_backend_with_the_same_numbers(tmp_path, first, then):
    [straight] = run_experiment(fast_config(tmp_path / "straight", *PFEDMOAP))
    short = [*PFEDMOAP, "fed.rounds=2", f"store.backend={first}", "store.shard_size=3"]
    run_experiment(fast_config(tmp_path / "cut", *short))
    [resumed] = run_experiment(fast_config(tmp_path / "cut", *PFEDMOAP, f"store.backend={then}", "store.shard_size=2",
                                           "run.resume=auto"))
    assert resumed["rounds"] == straight["rounds"] and len(resumed["rounds"]) == 4
    final = load_checkpoint(only_run_dir(tmp_path / "cut") / CHECKPOINT_NAME)
    assert ("shards" in final) == (then == "disk")
    if then == "disk":  # moved on resume: every client and record written once, shards of the configured size
        assert final["shard_size"] == 2 and final["shards"]["clients"].tolist() == [0, 1, 2, 3]
        assert final["records"]["clients"].tolist() == [0, 1, 2, 3]
