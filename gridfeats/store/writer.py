"""FeatureWriter: crash-safe, resumable writing of a feature store.

Design (the commit protocol)
----------------------------
The output ``OUT.h5`` is never appended to. While a run is going, its committed work lives in a
sidecar folder ``OUT.h5.parts/``:

* ``meta.json``: the run metadata (mode, dims, config, weights digest, dtype, attr_topk);
* ``lock``: held with ``flock`` by the one writer process working on this output;
* ``part-<seq>-<token>.h5``: immutable part files. Each is a complete store file (same layout as
  the output) holding a chunk of images and errors. It is written to a temporary name, fsynced and
  ``os.replace``-d into place, so a part either exists whole or not at all.

``add``/``add_error`` only buffer in memory; every ``commit_every`` images, ``commit_bytes`` bytes
or ``commit_seconds`` seconds the buffer becomes a new part. ``close()`` commits the rest and
*consolidates*: it writes all parts into a temporary file, fsyncs it and ``os.replace``-s it over
``OUT.h5``; then the parts folder is renamed away (atomically) and deleted.

Why this meets the guarantees of ``docs/feature-store.md``:

* **Always readable**: ``OUT.h5`` and every part only ever appear by atomic rename of a fsynced,
  closed file. A kill at any instant leaves the previous ``OUT.h5`` (or none) plus whole parts and
  at most some ``*.tmp-*`` leftovers, which the next writer deletes.
* **Resumable**: opening a writer on an output whose parts folder exists reads the ids of every
  part; ``done_ids()`` tells the job what to skip. If only a finished ``OUT.h5`` exists, it is
  hard-linked (or copied) into a new parts folder as the first part before the folder appears, so
  the invariant "the parts hold everything ``OUT.h5`` holds" is true whenever the folder exists.
  Hence a kill between replacing ``OUT.h5`` and deleting the folder is harmless: the next run
  consolidates the same parts again.
* **No silent loss**: every image handed to ``add`` or ``add_error`` ends in ``index/`` or in
  ``errors/`` once committed; errors are skipped on resume unless ``retry_errors=True``.
* **Deterministic**: a record's values are stored as given (converted to the storage dtype), so
  the rows of an image do not depend on batching, workers or shards; consolidation keeps commit
  order.

Running writes off the compute path: use :class:`gridfeats.store.AsyncFeatureWriter`, which feeds
this writer from a bounded queue in a background thread.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import numpy as np

from gridfeats.store import _crashpoints
from gridfeats.store.build import ArrayRowSource, ImageEntry, fsync_dir, write_store
from gridfeats.store.collect import collect
from gridfeats.store.errors import StoreBusyError, StoreFormatError, StoreMismatchError
from gridfeats.store.layout import (
    COMPRESSIONS,
    StoreMetadata,
    hw_fields,
    open_store_file,
    read_errors,
    read_index,
    row_fields,
)
from gridfeats.store.records import Record, normalize_record, record_nbytes

try:  # POSIX only; elsewhere the single-writer rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_PART_RE = re.compile(r"^part-(\d+)-([0-9a-z]+)\.h5$")
_BASE_PART = "part-000000-base.h5"


def parts_dir_for(path: str) -> str:
    """The sidecar folder of an output file."""
    return os.path.abspath(path) + ".parts"


class FeatureWriter:
    """Write a feature store that survives kills and resumes (see the module docstring).

    Args:
        path: the output file, e.g. ``features.h5``.
        meta: the run metadata; resuming into an output made with different metadata is refused.
        compression: ``gzip`` (with shuffle), ``lzf`` or ``none`` for the consolidated output.
        commit_every / commit_bytes / commit_seconds: when buffered work becomes a part file; this
            bounds both memory and the work a kill can lose.
        retry_errors: when resuming, do not skip images that previously failed.
        overwrite: delete an existing output and its parts first instead of resuming.
    """

    def __init__(
        self,
        path: str,
        meta: StoreMetadata,
        *,
        compression: str = "gzip",
        commit_every: int = 256,
        commit_bytes: int = 64 << 20,
        commit_seconds: float = 60.0,
        retry_errors: bool = False,
        overwrite: bool = False,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if commit_every < 1:
            raise ValueError("commit_every must be at least 1")
        self.path = os.path.abspath(path)
        self.parts_dir = parts_dir_for(path)
        self.meta = meta
        self.compression = compression
        self.commit_every = int(commit_every)
        self.commit_bytes = int(commit_bytes)
        self.commit_seconds = float(commit_seconds)
        self.retry_errors = bool(retry_errors)
        # Parts: cheap lzf unless compression is off; the output gets the requested codec.
        self._part_compression = "none" if compression == "none" else "lzf"

        self._committed: set = set()  # ids with features in some part
        self._old_errors: Dict[str, str] = {}  # errors recorded in parts
        self._pending: List[Tuple[str, Record]] = []
        self._pending_ids: set = set()
        self._pending_errors: Dict[str, str] = {}
        self._pending_bytes = 0
        self._last_commit = time.monotonic()
        self._next_seq = 1
        self._new_parts = 0  # parts other than the base copy of a finished output
        self._lock_fd: Optional[int] = None
        self._closed = False

        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        if overwrite:
            self._discard_existing()
        self._lock_fd = self._open_parts_dir()
        try:
            self._remove_leftovers()
            self._scan_parts()
        except BaseException:
            self._release_lock()
            raise

    # --- public API ---------------------------------------------------------------------------
    def done_ids(self) -> FrozenSet[str]:
        """Ids a resumed job must skip: committed or buffered images and recorded errors.

        With ``retry_errors=True`` errors recorded by earlier runs are not included, so the job
        processes those images again (a success then replaces the error).
        """
        done = set(self._committed) | self._pending_ids | set(self._pending_errors)
        if not self.retry_errors:
            done |= set(self._old_errors)
        return frozenset(done)

    def add(self, image_id: Any, record: Mapping[str, Any]) -> None:
        """Buffer one image's record (see :mod:`gridfeats.store.records` for its fields)."""
        self._check_open()
        image_id = _check_image_id(image_id)
        if image_id in self._committed or image_id in self._pending_ids:
            raise ValueError(f"image {image_id!r} was already added to {self.path}")
        normalized = normalize_record(image_id, record, self.meta)
        self._pending.append((image_id, normalized))
        self._pending_ids.add(image_id)
        self._pending_errors.pop(image_id, None)
        self._pending_bytes += record_nbytes(normalized)
        self._maybe_commit()

    def add_error(self, image_id: Any, reason: str) -> None:
        """Record that an input could not be processed, with a short specific reason."""
        self._check_open()
        image_id = _check_image_id(image_id)
        if image_id in self._committed or image_id in self._pending_ids:
            raise ValueError(
                f"image {image_id!r} already has features in {self.path}; cannot record an error"
            )
        reason = " ".join(str(reason).split()) or "unknown error"
        self._pending_errors[image_id] = reason
        self._maybe_commit()

    def commit(self) -> None:
        """Turn everything buffered into a new immutable part file (no-op when nothing is)."""
        self._check_open()
        if not self._pending and not self._pending_errors:
            return
        entries = self._pending_entries()
        name = f"part-{self._next_seq:06d}-{uuid.uuid4().hex[:8]}.h5"
        errors = list(self._pending_errors.items())
        write_store(
            os.path.join(self.parts_dir, name),
            self.meta,
            entries,
            errors,
            compression=self._part_compression,
            crash_label="part",
        )
        self._next_seq += 1
        self._new_parts += 1
        self._committed |= self._pending_ids
        self._old_errors.update(self._pending_errors)
        for image_id in self._pending_ids:
            self._old_errors.pop(image_id, None)
        self._pending, self._pending_ids, self._pending_errors = [], set(), {}
        self._pending_bytes = 0
        self._last_commit = time.monotonic()

    def consolidate(self) -> None:
        """Rebuild ``OUT.h5`` from all committed parts (atomically); the run stays open."""
        self._check_open()
        paths = self._part_paths()
        with collect(paths, expected=self.meta) as plan:
            write_store(
                self.path,
                self.meta,
                plan.entries,
                plan.errors,
                self.compression,
                crash_label="final",
            )

    def close(self) -> None:
        """Commit, consolidate into ``OUT.h5`` and remove the parts folder."""
        if self._closed:
            return
        self.commit()
        if self._new_parts or not os.path.exists(self.path):
            self.consolidate()
        self._retire_parts_dir()
        self._release_lock()
        self._closed = True

    def abort(self) -> None:
        """Commit what is buffered and stop without consolidating: a later run resumes."""
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._release_lock()
            self._closed = True

    @property
    def num_committed(self) -> int:
        return len(self._committed)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __del__(self) -> None:
        # A writer dropped without close/abort must not keep the output locked for the rest of
        # the process; its buffered (uncommitted) images are simply not committed.
        self._release_lock()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.abort()
            except Exception:  # keep the original exception visible
                pass

    # --- buffering ----------------------------------------------------------------------------
    def _maybe_commit(self) -> None:
        buffered = len(self._pending) + len(self._pending_errors)
        if (
            buffered >= self.commit_every
            or self._pending_bytes >= self.commit_bytes
            or time.monotonic() - self._last_commit >= self.commit_seconds
        ):
            self.commit()

    def _pending_entries(self) -> List[ImageEntry]:
        fields = row_fields(self.meta.mode)
        arrays = (
            {f: np.concatenate([rec[f] for _, rec in self._pending]) for f in fields}
            if self._pending
            else {}
        )
        source = ArrayRowSource(arrays)
        entries, start = [], 0
        for image_id, rec in self._pending:
            count = int(rec["features"].shape[0])
            hw = {name: rec[name] for name in hw_fields(self.meta.mode)}
            entries.append(ImageEntry(image_id, count, hw, source, start))
            start += count
        return entries

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is closed")

    # --- the parts folder -----------------------------------------------------------------------
    def _open_parts_dir(self) -> Optional[int]:
        """Create (or find) the parts folder, lock it and check its metadata."""
        for _attempt in range(5):
            if not os.path.isdir(self.parts_dir):
                self._create_parts_dir()
                continue
            fd = self._try_lock()
            if fd is None or self._lock_is_current(fd):
                try:
                    self._check_run_metadata()
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    raise
                return fd
            os.close(fd)  # the folder was retired by a finishing writer meanwhile; retry
        raise StoreBusyError(
            f"{self.parts_dir} keeps changing; is another writer finishing this output?"
        )

    def _try_lock(self) -> Optional[int]:
        if fcntl is None:  # pragma: no cover
            return None
        lock_path = os.path.join(self.parts_dir, "lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusyError(
                f"another process is writing {self.path} (it holds {lock_path}); wait for it or "
                "stop it"
            ) from None
        return fd

    def _lock_is_current(self, fd: int) -> bool:
        try:
            return os.stat(os.path.join(self.parts_dir, "lock")).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _release_lock(self) -> None:
        fd = getattr(self, "_lock_fd", None)  # may run from __del__ of a half-built writer
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def _create_parts_dir(self) -> None:
        """Build the folder under a temporary name, then rename it into place atomically."""
        tmp_dir = f"{self.parts_dir}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.mkdir(tmp_dir)
        try:
            _write_text_durably(os.path.join(tmp_dir, "meta.json"), self.meta.to_json())
            if os.path.exists(self.path):
                self._check_existing_output()
                _link_or_copy(self.path, os.path.join(tmp_dir, _BASE_PART))
            fsync_dir(tmp_dir)
            _crashpoints.hit("writer:before-parts-dir")
            try:
                os.rename(tmp_dir, self.parts_dir)
            except OSError:
                if not os.path.isdir(self.parts_dir):
                    raise
                shutil.rmtree(tmp_dir, ignore_errors=True)  # another writer created it first
                return
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        fsync_dir(os.path.dirname(self.path))

    def _check_existing_output(self) -> None:
        with open_store_file(self.path) as f:
            existing = StoreMetadata.from_file(f)
        problems = self.meta.mismatches(existing)
        if problems:
            raise StoreMismatchError(
                f"{self.path} already exists with different metadata, refusing to resume into it: "
                + "; ".join(problems)
                + ". Use a new output path or overwrite it."
            )

    def _check_run_metadata(self) -> None:
        meta_path = os.path.join(self.parts_dir, "meta.json")
        try:
            with open(meta_path, encoding="utf-8") as fh:
                existing = StoreMetadata.from_json(fh.read())
        except (OSError, ValueError, TypeError) as exc:
            raise StoreFormatError(
                f"{meta_path} is unreadable ({exc}); delete {self.parts_dir} to start over"
            ) from None
        problems = self.meta.mismatches(existing)
        if problems:
            raise StoreMismatchError(
                f"an unfinished run into {self.path} used different metadata, refusing to resume: "
                + "; ".join(problems)
                + f". Re-run with the original settings, or overwrite (deletes {self.parts_dir})."
            )

    def _part_paths(self) -> List[str]:
        names = []
        for name in os.listdir(self.parts_dir):
            match = _PART_RE.match(name)
            if match:
                names.append((int(match.group(1)), name))
        return [os.path.join(self.parts_dir, name) for _, name in sorted(names)]

    def _scan_parts(self) -> None:
        for path in self._part_paths():
            with open_store_file(path) as f:
                problems = self.meta.mismatches(StoreMetadata.from_file(f))
                if problems:
                    raise StoreMismatchError(
                        f"part {path} does not match this run: " + "; ".join(problems)
                    )
                ids = read_index(f, self.meta.mode).image_ids
                errors = read_errors(f)
            self._committed.update(ids)
            for image_id, reason in errors:
                self._old_errors[image_id] = reason
            seq = int(_PART_RE.match(os.path.basename(path)).group(1))  # type: ignore[union-attr]
            self._next_seq = max(self._next_seq, seq + 1)
            if os.path.basename(path) != _BASE_PART:
                self._new_parts += 1
        for image_id in self._committed:
            self._old_errors.pop(image_id, None)

    def _remove_leftovers(self) -> None:
        """Delete what killed writers left: temp files and half-built or retired folders."""
        parent, base = os.path.split(self.path)
        for name in os.listdir(parent):
            if (
                name.startswith(f".{base}.tmp-")
                or name.startswith(f"{base}.parts.old-")
                or name.startswith(f"{base}.parts.new-")
            ):
                _remove_path(os.path.join(parent, name))
        for name in os.listdir(self.parts_dir):
            if ".tmp-" in name:
                _remove_path(os.path.join(self.parts_dir, name))

    def _retire_parts_dir(self) -> None:
        retired = f"{self.parts_dir}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(self.parts_dir, retired)
        fsync_dir(os.path.dirname(self.path))
        _crashpoints.hit("writer:before-rmtree")
        shutil.rmtree(retired, ignore_errors=True)

    def _discard_existing(self) -> None:
        if os.path.isdir(self.parts_dir):
            fd = self._try_lock()  # refuse to delete the work of a live writer
            retired = f"{self.parts_dir}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.parts_dir, retired)
            if fd is not None:
                os.close(fd)
            shutil.rmtree(retired, ignore_errors=True)
        if os.path.exists(self.path):
            os.unlink(self.path)


def _check_image_id(image_id: Any) -> str:
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        image_id = str(int(image_id))
    if not isinstance(image_id, str) or not image_id or "\x00" in image_id:
        raise ValueError(f"image id must be a non-empty string (or an int), got {image_id!r}")
    return image_id


def _write_text_durably(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def load_run_metadata(path: str) -> Optional[StoreMetadata]:
    """Metadata of an unfinished run into ``path`` (None when there is none)."""
    meta_path = os.path.join(parts_dir_for(path), "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as fh:
        return StoreMetadata.from_json(fh.read())


__all__ = ["FeatureWriter", "parts_dir_for", "load_run_metadata"]
