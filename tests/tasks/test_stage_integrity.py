"""The stage contract under faults (issue 12, item 2 and the disk-full part of the fault suite):
a finished folder is trusted only while it matches its manifest; a moved work directory keeps
its folders; a full disk is a clear error that leaves no temp folder; kill -9 at each step of
a stage's commit leaves nothing a rerun would trust."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks import stage

pytestmark = pytest.mark.fault
BUILDS: list[str] = []


def build_ok(out: Path, key: str) -> dict:
    BUILDS.append(key)
    (out / "data.txt").write_text("hello world")
    (out / "sub").mkdir()
    (out / "sub" / "more.bin").write_bytes(b"x" * 100)
    return {"rows": 2}


def run(workdir: Path) -> stage.Manifest:
    return stage.run_stage("alpha", {"n": 1}, [], workdir, build_ok, ["tasks.stage"])


def test_every_kind_of_damage_is_detected_and_rebuilt(tmp_path):
    first = run(tmp_path)
    folder = Path(first.folder)
    damages = {
        "deleted folder": lambda: shutil.rmtree(folder),
        "truncated data": lambda: os.truncate(folder / "sub" / "more.bin", 10),
        "empty manifest": lambda: (folder / "manifest.json").write_text(""),
        "corrupt manifest": lambda: (folder / "manifest.json").write_text("{not json"),
        "edited data, same size": lambda: edit_later(folder / "data.txt"),
    }
    for how, harm in damages.items():
        BUILDS.clear()
        harm()
        assert stage.run_stage("alpha", {"n": 1}, [], tmp_path, build_ok, ["tasks.stage"]).key == first.key, how
        assert BUILDS == [first.key], how  # rebuilt, not trusted
        assert stage.verify(folder) == [], how
    aside = sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".damaged-"))
    assert len(aside) == len(damages) - 1  # the damaged folders were moved aside (the deleted one is gone)
    BUILDS.clear()
    run(tmp_path)
    assert BUILDS == []  # an intact folder is a hit


def edit_later(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.upper())
    later = os.stat(path.parent / "manifest.json").st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))


def test_full_verification_catches_what_the_cheap_check_cannot(tmp_path):
    m = run(tmp_path)
    data = Path(m.folder) / "data.txt"
    stamp = os.stat(data)
    data.write_bytes(data.read_bytes().upper())  # same size, mtime put back: only the sha256 can tell
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert stage.damage(m) == []
    assert stage.verify(m.folder) == ["data.txt does not match its sha256"]


def test_a_moved_work_directory_is_all_hits_pointing_at_the_new_place(tmp_path):
    first = run(tmp_path / "old")
    os.rename(tmp_path / "old", tmp_path / "new")
    BUILDS.clear()
    moved = run(tmp_path / "new")
    assert BUILDS == [] and moved.key == first.key
    assert Path(moved.folder) == (tmp_path / "new" / "artifacts" / "alpha" / first.key).resolve()
    assert moved.path("data.txt").read_text() == "hello world"


def test_a_full_disk_is_a_clear_error_that_leaves_no_temp_folder(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        def big(out: Path, key: str) -> dict:
            with open(out / "big.bin", "wb") as f:
                for _ in range(64):
                    f.write(b"\0" * 4096)
            return {}

        with pytest.raises(stage.StageDiskFull) as e:
            stage.run_stage("tokenize", {}, [], disk, big, ["tasks.stage"])
        msg = str(e.value)
        assert "tokenize" in msg and "disk is full" in msg and str(disk / "artifacts" / "tokenize") in msg
        assert "Free space" in msg
        assert [p.name for p in (disk / "artifacts" / "tokenize").iterdir()] == []
        m = stage.run_stage("tokenize", {}, [], disk, build_ok, ["tasks.stage"])  # with space: completes
        assert stage.verify(m.folder) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("point", ["start", "built", "manifest", "renamed"])
def test_kill_at_each_step_of_a_commit_leaves_nothing_a_rerun_would_trust(tmp_path, point):
    pid = os.fork()
    if pid == 0:
        os.environ["FORJA_FAULT"] = f"stage:alpha:{point}"
        try:
            run(tmp_path)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    BUILDS.clear()
    m = run(tmp_path)
    assert BUILDS == ([] if point == "renamed" else [m.key])
    assert stage.verify(m.folder) == []
    assert [p.name for p in Path(m.folder).parent.iterdir()] == [m.key]  # no temp folder left behind
