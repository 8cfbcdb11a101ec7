"""The run store: one SQLite database (WAL) per run directory, one transaction per state change.

The driver alone writes it. Candidates get their ids in insertion order, and every strategy proposes
its candidates deterministically from what is stored, so a resumed run inserts the same candidates
with the same ids as an uninterrupted one. A candidate is identified by its ``key`` (role, recipe and
parents' ids): inserting it twice is a no-op, so nothing is evaluated twice."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    generation INTEGER NOT NULL,
    role TEXT NOT NULL,
    parents TEXT NOT NULL,
    reference TEXT,
    recipe TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    path TEXT,
    scores TEXT NOT NULL DEFAULT '{}',
    objective_search REAL,
    objective_test REAL,
    error TEXT,
    merge_s REAL,
    eval_s REAL,
    created REAL NOT NULL,
    finished REAL,
    genes TEXT,
    unscored TEXT NOT NULL DEFAULT '{}',
    hops TEXT
);
CREATE TABLE IF NOT EXISTS kinship (
    a INTEGER NOT NULL, b INTEGER NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (a, b, metric)
);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY, top TEXT NOT NULL, note TEXT
);
CREATE TABLE IF NOT EXISTS faults (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, candidate INTEGER, split TEXT, message TEXT NOT NULL
);
"""
STORE_NAME = "run.sqlite"


@dataclass(frozen=True)
class Candidate:
    """One row of the store: a model of the population (pool member, merge, soup) or the base."""

    id: int
    key: str
    generation: int
    role: str
    parents: tuple[int, ...]
    reference: str | None
    recipe: Mapping[str, Any] | None
    status: str
    path: str | None
    scores: Mapping[str, Mapping[str, float]]
    objective_search: float | None
    objective_test: float | None
    error: str | None
    merge_s: float | None
    eval_s: float | None
    # The CMA-ES genotype this candidate was made from (None for other strategies).
    genes: tuple[float, ...] | None = None
    # Splits the evaluator cannot score, with the reason: absent from scores, never copied.
    unscored: Mapping[str, str] = field(default_factory=dict)
    # A DFS candidate's layer path: [{"model", "layer", "scale"}, ...] (None for other strategies).
    hops: tuple[Mapping[str, Any], ...] | None = None

    @property
    def label(self) -> str:
        """A short display name: the pool member's reference, else ``#id``."""
        if self.reference is not None:
            return Path(self.reference).name or self.reference
        return f"#{self.id}"


class Store:
    """The SQLite database of one run."""

    def __init__(self, run_dir: Path, *, readonly: bool = False) -> None:
        self.path = run_dir / STORE_NAME
        if readonly:
            # For readers where nothing can be written (a full disk, a read-only file system).
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=30)
            return
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the next step starts, so a crash loses at most the
        # state change in flight.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(candidates)")}
        if "unscored" not in columns:  # a store written before splits could be left unscored
            self.db.execute("ALTER TABLE candidates ADD COLUMN unscored TEXT NOT NULL DEFAULT '{}'")
        if "hops" not in columns:  # a store written before DFS
            self.db.execute("ALTER TABLE candidates ADD COLUMN hops TEXT")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, **values: str) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    # --- candidates --------------------------------------------------------------------------
    def add(
        self,
        key: str,
        generation: int,
        role: str,
        parents: Sequence[int] = (),
        reference: str | None = None,
        recipe: Mapping[str, Any] | None = None,
        path: str | None = None,
        genes: Sequence[float] | None = None,
        hops: Sequence[Mapping[str, Any]] | None = None,
    ) -> Candidate:
        """Inserts a candidate unless one with ``key`` exists; returns the stored one either way."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO candidates"
                " (key, generation, role, parents, reference, recipe, path, created, genes, hops)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    generation,
                    role,
                    json.dumps(list(parents)),
                    reference,
                    None if recipe is None else json.dumps(recipe, sort_keys=True),
                    path,
                    time.time(),
                    None if genes is None else json.dumps([float(g) for g in genes]),
                    None if hops is None else json.dumps([dict(h) for h in hops]),
                ),
            )
        found = self.by_key(key)
        assert found is not None
        return found

    def by_key(self, key: str) -> Candidate | None:
        row = self.db.execute("SELECT * FROM candidates WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._candidate(row)

    def get(self, id: int) -> Candidate:
        row = self.db.execute("SELECT * FROM candidates WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise KeyError(f"no candidate #{id} in {self.path}")
        return self._candidate(row)

    def candidates(self) -> list[Candidate]:
        return [self._candidate(r) for r in self.db.execute("SELECT * FROM candidates ORDER BY id")]

    def record_scores(self, id: int, split: str, scores: Mapping[str, float], objective: float, seconds: float) -> None:
        """Stores one split's scores; the candidate is done once its search split is scored."""
        current = self.get(id)
        merged = {**current.scores, split: dict(scores)}
        column = "objective_search" if split == "search" else "objective_test"
        status = "done" if split == "search" else current.status
        with self.transaction() as db:
            db.execute(
                f"UPDATE candidates SET scores = ?, {column} = ?, status = ?, eval_s = COALESCE(eval_s, 0) + ?,"
                " finished = ? WHERE id = ?",
                (json.dumps(merged, sort_keys=True), objective, status, seconds, time.time(), id),
            )

    def record_unscored(self, id: int, split: str, reason: str) -> None:
        """Records that the evaluator cannot score ``split`` of this candidate, and why: the split
        stays without a score (and is not asked for again on resume); the status is unchanged."""
        current = self.get(id)
        merged = {**current.unscored, split: reason}
        with self.transaction() as db:
            db.execute("UPDATE candidates SET unscored = ? WHERE id = ?", (json.dumps(merged, sort_keys=True), id))

    def record_merge(self, id: int, path: str, seconds: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE candidates SET path = ?, merge_s = ? WHERE id = ?", (path, seconds, id))

    def record_failure(self, id: int, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE candidates SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                (error, time.time(), id),
            )

    @staticmethod
    def _candidate(row: tuple[Any, ...]) -> Candidate:
        (id, key, gen, role, parents, ref, recipe, status, path, scores, obj_s, obj_t, error, merge_s, eval_s) = row[
            :15
        ]
        return Candidate(
            id=int(id),
            key=str(key),
            generation=int(gen),
            role=str(role),
            parents=tuple(json.loads(parents)),
            reference=ref,
            recipe=None if recipe is None else json.loads(recipe),
            status=str(status),
            path=path,
            scores=json.loads(scores),
            objective_search=obj_s,
            objective_test=obj_t,
            error=error,
            merge_s=merge_s,
            eval_s=eval_s,
            genes=None if row[17] is None else tuple(json.loads(row[17])),
            # Absent in a store of an older version opened read-only (not migrated).
            unscored=json.loads(row[18]) if len(row) > 18 and row[18] else {},
            hops=tuple(json.loads(row[19])) if len(row) > 19 and row[19] else None,
        )

    # --- kinship -----------------------------------------------------------------------------
    def kinship(self, a: int, b: int, metric: str) -> float | None:
        """The stored kinship of two candidates (symmetric); None when not measured; NaN stays NaN."""
        lo, hi = min(a, b), max(a, b)
        row = self.db.execute("SELECT value FROM kinship WHERE a = ? AND b = ? AND metric = ?", (lo, hi, metric))
        found = row.fetchone()
        if found is None:
            return None
        return math.nan if found[0] is None else float(found[0])

    def all_kinship(self) -> dict[tuple[int, int], dict[str, float]]:
        out: dict[tuple[int, int], dict[str, float]] = {}
        for a, b, metric, value in self.db.execute("SELECT a, b, metric, value FROM kinship"):
            out.setdefault((int(a), int(b)), {})[str(metric)] = math.nan if value is None else float(value)
        return out

    def record_kinship(self, values: Mapping[tuple[int, int, str], float]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO kinship VALUES (?, ?, ?, ?)",
                [(min(a, b), max(a, b), m, None if math.isnan(v) else v) for (a, b, m), v in values.items()],
            )

    # --- generations -------------------------------------------------------------------------
    def record_generation(self, generation: int, top: Sequence[int], note: str | None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO generations (generation, top, note) VALUES (?, ?, ?)",
                (generation, json.dumps(list(top)), note),
            )

    def generations(self) -> list[tuple[int, list[int], str | None]]:
        rows = self.db.execute("SELECT generation, top, note FROM generations ORDER BY generation")
        return [(int(g), list(json.loads(t)), n) for g, t, n in rows]

    def record_fault(self, candidate: int | None, split: str | None, message: str) -> None:
        """A fault of the machine met while working on ``candidate`` (which stays pending)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO faults (at, candidate, split, message) VALUES (?, ?, ?, ?)",
                (time.time(), candidate, split, message),
            )

    def faults(self) -> list[tuple[float, int | None, str | None, str]]:
        """Every machine fault the run met, oldest first: (time, candidate, split, message)."""
        try:
            rows = self.db.execute("SELECT at, candidate, split, message FROM faults ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # a store written before faults were recorded, read-only
            return []
        return [(float(at), cand, split, str(message)) for at, cand, split, message in rows]

    def add_kinship_time(self, seconds: float) -> None:
        """Accumulates the time spent in kinship passes (part of the engine's overhead)."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'kinship_s'").fetchone()
            total = (float(row[0]) if row else 0.0) + seconds
            db.execute("INSERT OR REPLACE INTO meta VALUES ('kinship_s', ?)", (repr(total),))
