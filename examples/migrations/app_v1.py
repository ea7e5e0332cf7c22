"""App v1: stores a person's name as fname + lname (the schema before the split).

Data access only, over a DB-API connection to PostgreSQL (psycopg). v1 and
v2 have the same interface, so both can serve side by side during a rollout.
"""


def create(conn, full_name: str) -> int:
    fname, _, lname = full_name.partition(" ")
    row = conn.execute(
        "INSERT INTO people (fname, lname) VALUES (%s, %s) RETURNING id", (fname, lname)
    ).fetchone()
    return row[0]


def get(conn, person_id: int) -> dict:
    fname, lname = conn.execute(
        "SELECT fname, lname FROM people WHERE id = %s", (person_id,)
    ).fetchone()
    return {"id": person_id, "name": f"{fname} {lname}"}


def rename(conn, person_id: int, full_name: str) -> None:
    fname, _, lname = full_name.partition(" ")
    conn.execute(
        "UPDATE people SET fname = %s, lname = %s WHERE id = %s", (fname, lname, person_id)
    )
