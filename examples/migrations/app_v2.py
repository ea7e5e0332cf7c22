"""App v2: reads and writes the single `name` column.

It runs after the expand migrations (the column exists) and before the
contract (the old columns may still hold the only copy of a name that app v1
wrote during the rollout), so it reads `name` and falls back to fname/lname.
After the contract the fallback is dead code, to be removed in v3.
"""


def create(conn, full_name: str) -> int:
    row = conn.execute(
        "INSERT INTO people (name) VALUES (%s) RETURNING id", (full_name,)
    ).fetchone()
    return row[0]


def get(conn, person_id: int) -> dict:
    cur = conn.execute("SELECT * FROM people WHERE id = %s", (person_id,))
    row = dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))
    name = row["name"] or f"{row.get('fname')} {row.get('lname')}"
    return {"id": person_id, "name": name}


def rename(conn, person_id: int, full_name: str) -> None:
    conn.execute("UPDATE people SET name = %s WHERE id = %s", (full_name, person_id))
