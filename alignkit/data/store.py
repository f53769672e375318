"""Tokenised data on disk: flat token arrays, written once, memory-mapped for training, checked on every open.

A store holds rows of `group` sequences each (1 for SFT and KTO rows, 2 for DPO pairs: chosen then rejected):

| file | holds |
|---|---|
| `ids.bin` | every sequence's token ids, one after another (uint16 when the vocabulary fits, else uint32) |
| `trained.bin` | one byte per token: 1 where the token is trained (its label is its id), 0 where it is not |
| `offsets.bin` | int64, where each sequence starts in `ids.bin`, and the total at the end |
| `counts.bin` | int64, each sequence's trained labels after the shift (position t predicts token t+1) |
| `origins.txt` | each row's origin ("file.jsonl:12"), one JSON string per line |
| `origin_offsets.bin` | int64, where each row's line starts in `origins.txt` |
| `row_labels.bin` | KTO rows only: one byte per row, 1 where the completion is desirable |
| `meta.json` | sizes, the sha256 of every file above, the statistics of the run that built it, and its own hash |

The store is built in a temporary folder beside its final place and renamed into place whole, so a crash or a
full disk never leaves a half store where a later run looks. Opening a store checks every file's size and
hash: a truncated or altered store is reported and built again, never trusted.

`StoredRows` is what training sees: rows picked by index from one or more stores, turned into Python lists
one micro-batch at a time. Nothing holds the whole dataset as Python objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import numpy as np

from alignkit.data.tokenize import IGNORE, TokenizedRow

VERSION = 1
ARRAYS = {"ids": None, "trained": np.uint8, "offsets": np.int64, "counts": np.int64, "origin_offsets": np.int64}
HASH_BLOCK = 1 << 24


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _meta_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class StoreWriter:
    """Appends rows to a new store in a temporary folder; `publish` renames it into place."""

    def __init__(self, folder: Path, group: int, vocab_size: int, row_labels: bool = False):
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.folder, self.group = folder, group
        self.id_dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        self.tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building-"))
        names = ("ids", "trained", "counts", *(("row_labels",) if row_labels else ()))
        self.files = {name: (self.tmp / f"{name}.bin").open("wb") for name in names}
        self.origins = (self.tmp / "origins.txt").open("wb")
        self.offsets, self.origin_offsets = [0], [0]
        self.rows = 0

    def add(self, sequences: list[tuple[np.ndarray, np.ndarray]], origin: str, label: bool | None = None) -> None:
        """One row: its `group` sequences as (ids, trained) arrays, and its label in a store of labelled rows."""
        assert len(sequences) == self.group and (label is None) == ("row_labels" not in self.files)
        if label is not None:
            self.files["row_labels"].write(np.uint8(label).tobytes())
        for ids, trained in sequences:
            self.files["ids"].write(ids.astype(self.id_dtype).tobytes())
            self.files["trained"].write(trained.astype(np.uint8).tobytes())
            self.files["counts"].write(np.int64(trained[1:].sum()).tobytes())
            self.offsets.append(self.offsets[-1] + len(ids))
        line = (json.dumps(origin) + "\n").encode()
        self.origins.write(line)
        self.origin_offsets.append(self.origin_offsets[-1] + len(line))
        self.rows += 1

    def publish(self, stats: dict) -> TokenStore:
        """Write the index and meta files, then move the complete store into place."""
        for file in (*self.files.values(), self.origins):
            file.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.tmp / "offsets.bin")
        np.asarray(self.origin_offsets, dtype=np.int64).tofile(self.tmp / "origin_offsets.bin")
        labelled = "row_labels" in self.files
        names = [*(f"{name}.bin" for name in ARRAYS), *(["row_labels.bin"] if labelled else []), "origins.txt"]
        body = {"version": VERSION, "group": self.group, "id_dtype": np.dtype(self.id_dtype).name,
                "rows": self.rows, "tokens": self.offsets[-1], "stats": stats,
                **({"row_labels": True} if labelled else {}),
                "files": {name: {"bytes": (self.tmp / name).stat().st_size, "sha256": _sha256(self.tmp / name)}
                          for name in names}}
        (self.tmp / "meta.json").write_text(json.dumps({"body": body, "sha256": _meta_hash(body)}))
        if self.folder.exists():  # one that failed its check (builders take turns: `data.cache`)
            shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.tmp, self.folder)
        return TokenStore(self.folder, body)  # hashed just above: checking it again would read it all twice

    def discard(self) -> None:
        for file in (*self.files.values(), self.origins):
            with suppress(OSError):  # its buffer could not be flushed (a full disk): the folder goes anyway
                file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class TokenStore:
    """A published store, its arrays memory-mapped (read-only)."""

    def __init__(self, folder: Path, body: dict):
        self.folder, self.group, self.rows, self.stats = folder, body["group"], body["rows"], body["stats"]
        self.fingerprint = "".join(body["files"][f"{name}.bin"]["sha256"] for name in ("ids", "trained", "offsets"))
        dtypes = {**ARRAYS, "ids": np.dtype(body["id_dtype"])}
        self.arrays = {name: _map(folder / f"{name}.bin", dtype) for name, dtype in dtypes.items()}
        self.origin_text = _map(folder / "origins.txt", np.uint8)
        self.row_labels = _map(folder / "row_labels.bin", np.uint8) if body.get("row_labels") else None
        offsets = self.arrays["offsets"]
        self.lengths = (offsets[1:] - offsets[:-1]).reshape(-1, self.group)  # tokens, per row and sequence
        self.trained_counts = np.asarray(self.arrays["counts"]).reshape(-1, self.group)

    @classmethod
    def open(cls, folder: Path) -> TokenStore | None:
        """The store in `folder`, or None when there is none or it fails its check (the reason is logged)."""
        problem = _check(folder)
        if problem == "missing":
            return None
        if problem:
            from alignkit.log import log

            log(f"{folder}: tokenised-data cache {problem}; tokenising again")
            return None
        return cls(folder, json.loads((folder / "meta.json").read_text())["body"])

    def sequence(self, row: int, part: int = 0) -> tuple[np.ndarray, np.ndarray]:
        k = row * self.group + part
        start, end = self.arrays["offsets"][k], self.arrays["offsets"][k + 1]
        return self.arrays["ids"][start:end].astype(np.int64), self.arrays["trained"][start:end].astype(bool)

    def origin(self, row: int) -> str:
        start, end = self.arrays["origin_offsets"][row], self.arrays["origin_offsets"][row + 1]
        return json.loads(self.origin_text[start:end].tobytes())

    def tokenized(self, row: int, part: int = 0) -> TokenizedRow:
        ids, trained = self.sequence(row, part)
        return TokenizedRow(ids.tolist(), np.where(trained, ids, IGNORE).tolist(), self.origin(row))


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check(folder: Path) -> str:
    """'' when the store is whole, 'missing' when there is none, else what is wrong with it."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
        body = meta["body"]
        if meta["sha256"] != _meta_hash(body):
            return "has a damaged meta.json"
        if body["version"] != VERSION:
            return f"has format version {body['version']}, not {VERSION}"
        for name, expected in body["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != expected["bytes"]:
                return f"has a missing or truncated {name}"
            if _sha256(path) != expected["sha256"]:
                return f"has a damaged {name} (checksum mismatch)"
    except (OSError, ValueError, KeyError, TypeError):
        return "has an unreadable meta.json"
    return ""


class StoredRows(Sequence):
    """Rows picked from stores by (store, row) index; indexing an int gives one row as Python lists.

    A row of a one-sequence store is a `TokenizedRow`; of a pair store, a `PreferenceRow` that knows its
    position here."""

    def __init__(self, stores: list[TokenStore], index: np.ndarray):
        self.stores, self.index = stores, index

    @classmethod
    def of(cls, store: TokenStore) -> StoredRows:
        index = np.stack([np.zeros(store.rows, dtype=np.int64), np.arange(store.rows, dtype=np.int64)], axis=1)
        return cls([store], index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return StoredRows(self.stores, self.index[item])
        store_number, row = (int(v) for v in self.index[item])
        store = self.stores[store_number]
        if store.group == 1 and store.row_labels is None:
            return store.tokenized(row)
        from alignkit.data.prefs import PreferenceRow

        position = int(item) % len(self.index)
        if store.row_labels is not None:
            from alignkit.data.feedback import FeedbackRow

            return FeedbackRow(store.tokenized(row), bool(store.row_labels[row]), store.origin(row), position)
        return PreferenceRow(store.tokenized(row, 0), store.tokenized(row, 1), store.origin(row), position)

    def take(self, positions) -> StoredRows:
        positions = np.asarray(positions, dtype=np.int64)
        return StoredRows(self.stores, self.index[positions] if len(positions) else self.index[:0])

    def _per_row(self, name: str) -> np.ndarray:
        group = self.stores[0].group if self.stores else 1
        out = np.zeros((len(self.index), group), dtype=np.int64)
        for number, store in enumerate(self.stores):
            mine = self.index[:, 0] == number
            out[mine] = getattr(store, name)[self.index[mine, 1]]
        return out

    def lengths(self) -> np.ndarray:
        """Tokens of each row's sequences, shape [rows, group]."""
        return self._per_row("lengths")

    def trained_counts(self) -> np.ndarray:
        """Trained labels (after the shift) of each row's sequences, shape [rows, group]."""
        return self._per_row("trained_counts")

    def content_hash(self) -> str:
        """Identifies exactly these rows in this order: the stores' contents and the index."""
        digest = hashlib.sha256()
        for store in self.stores:
            digest.update(store.fingerprint.encode())
        digest.update(np.ascontiguousarray(self.index).tobytes())
        return digest.hexdigest()


def concat(parts: list[StoredRows]) -> StoredRows:
    """The rows of `parts`, one after another."""
    stores: list[TokenStore] = []
    indexes = []
    for part in parts:
        renumber = []
        for store in part.stores:
            if store not in stores:
                stores.append(store)
            renumber.append(stores.index(store))
        index = part.index.copy()
        if len(index):
            index[:, 0] = np.asarray(renumber, dtype=np.int64)[index[:, 0]]
        indexes.append(index)
    return StoredRows(stores, np.concatenate(indexes) if indexes else np.zeros((0, 2), dtype=np.int64))


def take(rows, positions) -> Sequence:
    """`rows[i] for i in positions`, without materialising stored rows."""
    return rows.take(positions) if isinstance(rows, StoredRows) else [rows[i] for i in positions]


def join(parts: list) -> Sequence:
    """Several row sequences as one, without materialising stored rows."""
    if parts and all(isinstance(p, StoredRows) for p in parts):
        return concat(parts)
    return [row for part in parts for row in part]


def lengths(rows) -> np.ndarray:
    """Tokens per sequence of each row, shape [rows, group], for stored rows and lists alike."""
    if isinstance(rows, StoredRows):
        return rows.lengths()
    return np.asarray([[len(r.input_ids)] if hasattr(r, "input_ids") else
                       [len(r.chosen.input_ids), len(r.rejected.input_ids)] for r in rows], dtype=np.int64)


def trained_counts(rows) -> np.ndarray:
    """Trained labels per sequence of each row (after the shift), shape [rows, group]."""
    if isinstance(rows, StoredRows):
        return rows.trained_counts()

    def count(r: TokenizedRow) -> int:
        return sum(1 for label in r.labels[1:] if label != IGNORE)

    return np.asarray([[count(r)] if hasattr(r, "input_ids") else [count(r.chosen), count(r.rejected)]
                       for r in rows], dtype=np.int64).reshape(len(rows), -1)
