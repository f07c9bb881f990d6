"""Checkpoint bookkeeping on real folders: what counts as complete, what is kept."""

from trainer.checkpoint import marker_content, prune, write_marker
from trainer.layout import complete_checkpoints, latest_complete, tag


def make(run_dir, step, *, complete=True):
    folder = run_dir / "checkpoints" / tag(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (run_dir / "exports" / tag(step)).mkdir(parents=True)
    if complete:
        write_marker(folder, marker_content(step, "digest", world_size=1, files={}))
    return folder


def test_only_complete_checkpoints_exist(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)  # a save that was killed
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [10, 20]
    assert latest_complete(tmp_path)[0] == 20
    assert latest_complete(tmp_path / "elsewhere") is None


def test_keep_the_last_k_and_every_mth_forever(tmp_path):
    for step in range(10, 101, 10):
        make(tmp_path, step)
    make(tmp_path, 5, complete=False)  # interrupted long ago: stale
    make(tmp_path, 110, complete=False)  # being written right now: untouched
    prune(tmp_path, keep_last=2, keep_every=40, current=100)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [40, 80, 90, 100]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [tag(s) for s in (40, 80, 90, 100, 110)]
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [tag(s) for s in (40, 80, 90, 100, 110)]
