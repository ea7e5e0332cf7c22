"""Step 2: fill `name` for every existing row, 1000 rows per transaction.

Each chunk commits on its own (row locks are held for one chunk, never for
the whole table) and records its last id as progress, so a run that is killed
resumes after the last committed chunk. `name IS NULL` keeps it idempotent:
rows app v2 already wrote are left alone.
"""

phase = "expand"


def up(db):
    for lo, hi in db.batches("people", key="id", size=1000):
        db.execute(
            "UPDATE people SET name = fname || ' ' || lname"
            " WHERE id BETWEEN ? AND ? AND name IS NULL",
            (lo, hi),
        )
        yield hi


def down(db):
    pass  # nothing to undo: the expand migration before this one drops the column
