"""`seer data pack` on a hostile source tree: every entry kept or counted by reason, file names of any bytes
packed and read back by the DALI loaders, worker processes that die with a killed packer."""
from __future__ import annotations

import ctypes
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dataloading.pack import JOURNAL, MANIFEST, display_path, pack
from engine.cli import build_parser
from test_pack import REPO, encode, noisy_folder, smooth_rgb

_PR_CAPBSET_DROP = 24  # from <linux/prctl.h>
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2  # from <linux/capability.h>


def without_file_permission_override() -> None:
    """preexec_fn: the child (root here) loses the capabilities that let root read files whatever their mode, so
    chmod 000 makes a file or folder unreadable to it as to any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def write(path: bytes, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)


def png(height: int, width: int) -> bytes:
    return encode(smooth_rgb(height, width), "PNG")


def fault_tree(root: Path) -> tuple[bytes, dict[bytes, bytes], dict[bytes, str]]:
    """A labelled source folder (class folders a, b, caf\\xe9 and d, a link to a folder elsewhere) with images under
    names that are not UTF-8 and one entry for each fault. Returns (the folder, the images pack must keep: name
    relative to it -> bytes, the other entries it can see (the locked folder is one) -> the reason it must give)."""
    src, elsewhere = os.fsencode(root / "src"), os.fsencode(root / "elsewhere")
    images = {b"caf\xe9/copy.png": png(30, 40), b"a/na\xefve-1.png": png(32, 40),
              b"caf\xe9/\xff\xfe.jpg": encode(smooth_rgb(34, 40), "JPEG"), b"caf\xe9/c.png": png(36, 40),
              b"b/0.png": png(38, 40), b"b/1.png": png(40, 40), **{b"a/%d.png" % i: png(24 + i, 30) for i in range(4)},
              b"a/edge.png": png(16, 40)}  # the shortest side kept by default
    for name, data in images.items():
        write(os.path.join(src, name), data)
    for i in range(2):  # class d: a link to a folder outside the source
        images[b"d/%d.png" % i] = png(42 + i, 40)
        write(os.path.join(elsewhere, b"%d.png" % i), images[b"d/%d.png" % i])
    os.symlink(elsewhere, os.path.join(src, b"d"))

    faults = {
        b"a/na\xefve-0.png": "duplicate", b"b/bad-\xe9.jpg": "not_an_image", b"a/tiny.png": "too_small",
        b"a/narrow.png": "too_small", b"a/broken.png": "broken_link", b"dangling": "broken_link",
        b"a/self": "link_loop", b"b/up": "link_loop", b"b/fifo": "special_file", b"b/sock": "special_file",
        b"a/locked": "unreadable", b"a/locked.png": "unreadable", b"stray.png": "outside_class_folder",
    }
    write(os.path.join(src, b"a/na\xefve-0.png"), images[b"caf\xe9/copy.png"])  # packed after it
    write(os.path.join(src, b"b/bad-\xe9.jpg"), b"not an image at all")
    write(os.path.join(src, b"a/tiny.png"), encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    write(os.path.join(src, b"a/narrow.png"), png(15, 40))
    os.symlink(b"missing.png", os.path.join(src, b"a/broken.png"))
    os.symlink(b"gone", os.path.join(src, b"dangling"))
    os.symlink(b"self", os.path.join(src, b"a/self"))  # resolves to itself
    os.symlink(b"..", os.path.join(src, b"b/up"))  # a folder it is inside
    os.mkfifo(os.path.join(src, b"b/fifo"))
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(src, b"b/sock"))
    server.close()
    for name in (b"a/locked/0.png", b"a/locked/1.png", b"a/locked.png"):
        write(os.path.join(src, name), png(44, 40))
    os.chmod(os.path.join(src, b"a/locked"), 0)
    os.chmod(os.path.join(src, b"a/locked.png"), 0)
    write(os.path.join(src, b"stray.png"), png(46, 40))
    return src, images, faults


PACK_TWICE = textwrap.dedent("""
    import json, os, sys
    from dataloading.pack import pack

    src, out, unlabelled = map(os.fsencode, sys.argv[1:])
    manifest = pack(src, out, shard_size=4, workers=1, progress=False)
    packed = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
    os.remove(os.path.join(out, b"shard-000001.tar"))  # resumed from the journal: the same shards again
    again = pack(src, out, shard_size=4, workers=1, progress=False)
    repacked = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
    flat = pack(src, unlabelled, labels_from_folders=False, workers=1, progress=False)
    print(json.dumps({"manifest": manifest, "resumed_same": again == manifest and repacked == packed,
                      "unlabelled": flat}))
""")

STREAM = textwrap.dedent("""
    import json, os, sys
    import torch
    from dataloading.config import CropGroup, DataConfig
    from dataloading.eval import build_eval_loader, image_file_batches
    from dataloading.multicrop import build_train_loader

    shards, unlabelled, *files = sys.argv[1:]
    crops = [CropGroup(size=32, count=2, scale=(0.3, 1.0)), CropGroup(size=16, count=2, scale=(0.1, 0.3))]
    labels = set()
    loader = build_train_loader(DataConfig(train_shards=shards, crops=crops), batch_size=8)
    for _ in range(2):
        batch = next(loader)
        assert all(torch.isfinite(crop).all() for crop in batch["crops"])
        labels |= set(batch["label"].tolist())
    stats = DataConfig(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    seen = []
    for batch in build_eval_loader(stats, shards, size=24, batch_size=8, with_index=True):
        assert torch.isfinite(batch["image"]).all()
        seen += batch["index"].tolist()
    no_labels = next(build_train_loader(DataConfig(train_shards=unlabelled, crops=crops), batch_size=8))["label"]
    predicted = [list(images.shape) for images in image_file_batches(files, stats, size=24, batch_size=8)]
    print(json.dumps({"labels": sorted(labels), "seen": seen, "no_labels": no_labels.tolist(),
                      "predicted": predicted}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="links, FIFOs, sockets and modes as Linux has them")
def test_every_entry_is_kept_or_counted_and_odd_names_load(tmp_path):
    src, images, faults = fault_tree(tmp_path)
    run = subprocess.run([sys.executable, "-c", PACK_TWICE, src, tmp_path / "out", tmp_path / "unlabelled"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    manifest = result["manifest"]
    assert manifest["kept"] + sum(manifest["skipped"].values()) == len(images) + len(faults)
    assert manifest["kept"] == len(images) and manifest["skipped"] == dict(Counter(faults.values()))
    shown = display_path(src)
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped_files"]}
    assert reasons == {f"{shown}/{display_path(name)}": reason for name, reason in faults.items()}
    (duplicate,) = [entry for entry in manifest["skipped_files"] if entry["reason"] == "duplicate"]
    assert duplicate["duplicate_of"] == f"{shown}/caf\\xe9/copy.png"
    assert manifest["classes"] == ["a", "b", "caf\\xe9", "d"]
    assert result["resumed_same"]
    # Names are stored as plain text: valid UTF-8 without lone surrogates, for any JSON reader.
    for name in (MANIFEST, JOURNAL):
        text = (tmp_path / "out" / name).read_bytes().decode("utf-8")
        assert "\\ud" not in text and "\\\\xe9" in text, name
    journal = (tmp_path / "out" / JOURNAL).read_text().splitlines()[1:]
    sources = [source for line in journal for source in json.loads(line)["sources"]]
    assert sorted(sources) == sorted(display_path(name) for name in images)
    assert result["unlabelled"]["kept"] == len(images) + 1  # stray.png too

    # Train and eval loaders read every sample; predict's reader opens the files with names that are not UTF-8.
    files = [os.path.join(src, name) for name in images if display_path(name) != os.fsdecode(name)]
    run = subprocess.run([sys.executable, "-c", STREAM, tmp_path / "out", tmp_path / "unlabelled", *files], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    streamed = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(streamed["labels"]) <= {0, 1, 2, 3} and sorted(streamed["seen"]) == list(range(len(images)))
    assert streamed["no_labels"] == [-1] * 8
    assert streamed["predicted"] == [[len(files), 3, 24, 24]]


def test_min_side_is_an_option_with_one_default(tmp_path):
    default = inspect.signature(pack).parameters["min_side"].default
    assert build_parser(["data", "pack"]).parse_args(["data", "pack", "SRC", "OUT"]).min_side == default == 16
    (tmp_path / "src").mkdir()
    for side in (8, 12, 28):
        (tmp_path / "src" / f"{side}.png").write_bytes(png(side, side))
    manifest = pack(tmp_path / "src", tmp_path / "out", min_side=10, workers=1, progress=False)
    assert manifest["kept"] == 2 and manifest["skipped"] == {"too_small": 1} and manifest["min_side"] == 10
    shrunk = pack(tmp_path / "src", tmp_path / "shrunk", max_side=20, min_side=16, workers=1, progress=False)
    assert shrunk["kept"] == 1  # 28 px shrunk to 20 passes, 8 and 12 px do not
    (tmp_path / "strip").mkdir()
    (tmp_path / "strip" / "strip.png").write_bytes(png(30, 600))  # shrunk to 64 x 3 px: too small as stored
    assert pack(tmp_path / "strip", tmp_path / "strip-out", max_side=64, workers=1,
                progress=False)["skipped"] == {"too_small": 1}
    with pytest.raises(ValueError, match=r"max_side \(--max-side\) 8 is under min_side \(--min-side\) 16"):
        pack(tmp_path / "src", tmp_path / "bad", max_side=8, min_side=16, progress=False)
    with pytest.raises(ValueError, match=r"min_side \(--min-side\) must be at least 1 px, got 0"):
        pack(tmp_path / "src", tmp_path / "bad", min_side=0, progress=False)


def _children(pid: int) -> list[int]:
    """Every descendant of a process, from /proc/PID/task/*/children (those that end meanwhile may be missed)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *_children(child)]
    except OSError:  # it ended
        pass
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, start time at 19); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _alive(pid: int, started: str) -> bool:
    """Whether the process that had start time `started` still runs (a zombie has ended; a reused pid is another)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_kill_9_of_pack_leaves_no_process_behind(tmp_path):
    noisy_folder(tmp_path / "src", 400)
    out = tmp_path / "out"
    script = f"from dataloading.pack import pack; pack({str(tmp_path / 'src')!r}, {str(out)!r}, shard_size=20, " \
             "workers=2, progress=False)"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    started, children, workers = {}, [], []  # started: pid -> start time of each process the packer started
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            # Both workers started and shards being written.
            children = _children(child.pid)
            workers = [pid for pid in children if b"spawn_main" in _command_line(pid)]
            if len(workers) == 2 and (out / JOURNAL).exists() and (out / JOURNAL).read_text().count("\n") >= 2:
                break
            time.sleep(0.01)
        started = {pid: fields[19] for pid in children if (fields := _stat(pid))}
        os.kill(child.pid, signal.SIGKILL)  # the packer alone, as the OOM killer or a scheduler would
        child.wait()
        assert not (out / MANIFEST).exists(), "the pack finished before it was killed: give it more work"
        assert len(workers) == 2, children
        deadline = time.monotonic() + 5
        while any(_alive(pid, start) for pid, start in started.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid, start in started.items() if _alive(pid, start)]
    finally:
        child.kill()
        for pid, start in started.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)  # after a failure: never leave workers running
