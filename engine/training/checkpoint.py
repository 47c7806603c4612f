"""Training checkpoints that survive a crash at any instant and resume at any world size.

Layout of `directory` (train.output_dir/checkpoints):

    step_00000500/            a complete checkpoint: DeepSpeed's files, each rank's trainer_rankNNNNN.pt (step, data
      complete.json           loader position, RNG) and the manifest, written last: world size, ZeRO stage, every
      ...                     file with its size, the config
    step_00001000.partial/    a save in progress, or one a crash cut short: never loaded, removed by the next save
    latest                    the tag to resume from (DeepSpeed's convention), replaced atomically

A save writes everything into `step_X.partial/`, waits for every rank, fsyncs the files, writes the manifest, renames
the folder to `step_X` (atomic) and only then moves `latest`. So a kill -9 at any point leaves either the previous
checkpoints untouched or a new complete one. (DeepSpeed 0.19.8 alone is not safe: rank 0 rewrites `latest` in place
right after its own files, with no barrier, while other ranks may still be writing theirs.) A checkpoint counts as
complete only if its manifest lists files that all exist with the listed sizes.

A checkpoint of another world size or ZeRO stage is resumed through engine.training.zero_state, which reads it by
parameter name and places it into the new engine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from engine.training.zero_state import apply_consolidated, consolidate, optimizer_param_names

MANIFEST = "complete.json"
LATEST = "latest"
PARTIAL = ".partial"
RESUME_MODES = ("auto", "never", "must")
_ENTRY = re.compile(r"step_(\d{8})(\.partial)?")


class CheckpointWarning(UserWarning):
    """A resume that is not bit-for-bit the interrupted run, or a checkpoint that was skipped."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def read_manifest(tag_dir: str | Path) -> dict | None:
    """The manifest of a complete checkpoint; None if it is incomplete (no manifest, a file missing or cut short)."""
    tag_dir = Path(tag_dir)
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        for name, size in manifest["files"].items():
            if (tag_dir / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def _is_complete(entry: Path) -> bool:
    """A step_X folder (not step_X.partial) whose manifest lists files that all exist with the listed sizes."""
    return not entry.name.endswith(PARTIAL) and read_manifest(entry) is not None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync(path.parent)


def _remove(tag_dir: Path) -> None:
    """Manifest first: a crash half-way through the removal leaves an incomplete folder, never a 'complete' one."""
    (tag_dir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


_RANK_FILE = re.compile(r"(?:trainer_rank|zero_pp_rank_)(\d+)")


def _writer(file_name: str) -> int:
    """The rank that writes a checkpoint file: trainer_rankNNNNN.pt and DeepSpeed's zero_pp_rank_N_* by rank N,
    the rest (mp_rank_00_model_states.pt) by rank 0."""
    match = _RANK_FILE.search(file_name)  # also DeepSpeed's bf16_zero_pp_rank_N_* files
    return int(match.group(1)) if match else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves into `directory/step_XXXXXXXX/`, keeps the newest `keep` complete checkpoints, finds what to resume from.

    Every rank calls save and load (they are collective). The directory must be shared by all ranks, as for
    DeepSpeed's own checkpoints.
    """

    def __init__(self, directory: str | Path, rank: int, world_size: int, keep: int = 2):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    # ------------------------------------------------------------------------------------------------ inspecting
    def _entries(self) -> list[tuple[int, Path]]:
        """(step, path) of every step_X and step_X.partial folder, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _ENTRY.fullmatch(p.name))]
        return sorted(found)

    def complete_steps(self) -> list[int]:
        return [step for step, path in self._entries() if _is_complete(path)]

    def _latest(self) -> str | None:
        try:
            return (self.directory / LATEST).read_text().strip()
        except OSError:
            return None

    def resume_tag(self, mode: str) -> str | None:
        """The checkpoint to resume from under train.resume=`mode` (auto | never | must); None: start at step 0.

        `latest` decides when it names a complete checkpoint; otherwise (a crash cut its save short, or it was
        edited) the newest complete one is used, with a warning. Incomplete folders are never used.
        """
        if mode not in RESUME_MODES:
            raise ValueError(f"train.resume must be one of {', '.join(RESUME_MODES)}, got {mode!r}")
        entries, latest = self._entries(), self._latest()
        if mode == "never":
            if entries or latest is not None:
                raise FileExistsError(
                    f"{self.directory} already holds checkpoints and train.resume=never: pass --resume (or set "
                    f"train.resume=auto) to continue that run, or set train.output_dir to a new folder")
            return None
        complete = [step for step, path in entries if _is_complete(path)]
        if not complete:
            if mode == "must":
                raise FileNotFoundError(f"train.resume=must but {self.directory} holds no complete checkpoint")
            torn = [path.name for _, path in entries] + ([LATEST] if latest is not None else [])
            if torn:
                self._warn(f"{self.directory} holds no complete checkpoint (ignored: {', '.join(torn)}); "
                           f"starting at step 0")
            return None
        if latest in {tag_of(step) for step in complete}:
            return latest
        newest = tag_of(complete[-1])
        problem = "is missing" if latest is None else f"names {latest!r}, which is not a complete checkpoint"
        self._warn(f"{self.directory / LATEST} {problem}; resuming from the newest complete one, {newest}")
        return newest

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            warnings.warn(message, CheckpointWarning, stacklevel=3)

    # ---------------------------------------------------------------------------------------------------- saving
    def save(self, engine, step: int, trainer_state: dict, info: dict | None = None) -> Path:
        """Write a complete checkpoint of `step` (collective); `info` goes into the manifest (e.g. the config)."""
        tag = tag_of(step)
        partial = self.directory / (tag + PARTIAL)
        if self.rank == 0:
            _remove(partial)  # left by a crash of an earlier attempt at this step
            partial.mkdir(parents=True)
        _barrier()
        torch.save({"step": step, **trainer_state}, partial / f"trainer_rank{self.rank:05d}.pt")
        engine.save_checkpoint(str(self.directory), tag=partial.name, save_latest=False)
        # Each rank makes the files it wrote durable and reports their sizes: on a shared file system (NFS) another
        # node's view of a file's size and of the folder can lag behind, and a manifest with a stale size would make
        # this checkpoint look incomplete later.
        sizes = {}
        for path in sorted(partial.rglob("*")):
            if path.is_file() and _writer(path.name) == self.rank:
                _fsync(path)
                sizes[str(path.relative_to(partial))] = path.stat().st_size
        every = [sizes]
        if dist.is_initialized():
            every = [None] * self.world_size
            dist.all_gather_object(every, sizes)  # also the barrier after every rank's writes
        if self.rank == 0:
            self._commit(engine, step, partial, dict(sorted(kv for ranks in every for kv in ranks.items())), info or {})
        _barrier()  # when save returns, the checkpoint is complete on every rank's view
        return self.directory / tag

    def _commit(self, engine, step: int, partial: Path, sizes: dict[str, int], info: dict) -> None:
        manifest = {
            "step": step,
            "world_size": self.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "files": sizes,
            **info,
        }
        if manifest["zero_stage"] == 0:  # DeepSpeed saves ZeRO-0 optimizer state by index only: keep the names
            manifest["optimizer_param_names"] = optimizer_param_names(engine)
        _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
        final = self.directory / tag_of(step)
        if final.exists():  # a checkpoint of an abandoned later timeline (resumed from an earlier step)
            _remove(final)
        os.rename(partial, final)
        _fsync(self.directory)
        _write_atomic(self.directory / LATEST, final.name)
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Drop incomplete folders and all but the newest `keep` complete checkpoints up to `step`.

        Complete checkpoints after `step` belong to a timeline abandoned by resuming from an earlier one; they are
        replaced when the run reaches their step again.
        """
        kept_before = []
        for other, path in self._entries():
            if not _is_complete(path):
                _remove(path)
            elif other < step:
                kept_before.append(path)
        for path in kept_before[:max(len(kept_before) - (self.keep - 1), 0)]:
            _remove(path)

    # --------------------------------------------------------------------------------------------------- loading
    def load(self, engine, tag: str, config: dict | None = None) -> dict:
        """Restore the engine from checkpoint `tag` and return the trainer state (collective).

        Same world size and ZeRO stage: DeepSpeed's own load, and this rank's trainer state (exact resume). Otherwise
        the checkpoint is consolidated and re-partitioned for this engine; the returned state is rank 0's with
        `resharded_from` = {"world_size", "zero_stage"} added, and its loader position and RNG do not apply.
        """
        tag_dir = self.directory / tag
        manifest = read_manifest(tag_dir)
        if manifest is None:
            raise FileNotFoundError(f"checkpoint {tag_dir} is incomplete or missing")
        if config is not None and "config" in manifest:
            changed = _changed_keys(manifest["config"], config)
            if changed:
                self._warn(f"resuming {tag_dir} with a changed config: {'; '.join(changed)}")
        saved = {"world_size": manifest["world_size"], "zero_stage": manifest["zero_stage"]}
        current = {"world_size": self.world_size, "zero_stage": engine.zero_optimization_stage()}
        if saved == current:
            loaded, _ = engine.load_checkpoint(str(self.directory), tag=tag)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
            return torch.load(tag_dir / f"trainer_rank{self.rank:05d}.pt", weights_only=False)
        self._warn(f"checkpoint {tag_dir} was written by {saved['world_size']} rank(s) at ZeRO stage "
                   f"{saved['zero_stage']}; resuming with {current['world_size']} at stage {current['zero_stage']}: "
                   f"weights, momentum, BatchNorm statistics and the step carry over exactly; the data loader starts "
                   f"a new pass over the data for the new rank layout, and the RNG restarts from train.seed")
        apply_consolidated(engine, consolidate(tag_dir, manifest))
        state = torch.load(tag_dir / "trainer_rank00000.pt", weights_only=False)
        return {**state, "resharded_from": saved}


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changed_keys(old, new, f"{prefix}{key}.")
        elif old != new and f"{prefix}{key}" != "train.resume":
            changes.append(f"{prefix}{key} {old!r} -> {new!r}")
    return changes
