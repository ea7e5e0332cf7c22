"""Hostile input on the controller (issue 15): corrupt files deployer reads back,
unbounded numbers, paths and globs where names belong, revisions git refuses,
health URLs naming other machines, control characters from a repo or a build.
Every case ends in exit 0, 1 or 2 with a message naming what was wrong, never a
traceback. The cases about hosts themselves are in test_bad_input_hosts.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rollout_helpers import make_repo

from deployer import githooks, inventory
from deployer.errors import InventoryError
from deployer.report import LiveReporter, Reporter

APP = '[app]\nname = "shop"\ndeploy_to = "{root}/{{host}}"\n'
LOCAL = '[hosts.web1]\ntransport = "local"\n'
# an ssh host nobody listens for: reaching it fails fast, with exit 1
UNREACHABLE = (
    '[hosts.web1]\naddress = "127.0.0.1"\nport = 9\nretry_deadline = 0.3\nconnect_timeout = 0.5\n'
)
ESC = "\x1b]0;owned\x07\x1b[2K\x1b[1Afake: rollout ok\x9b31m\r\x0c\x7f"


def write_inventory(tmp_path: Path, text: str = "", hosts: str = LOCAL) -> Path:
    path = tmp_path / "inventory.toml"
    path.write_text(APP.format(root=tmp_path / "hosts") + text + "\n" + hosts)
    return path


def deployer(tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(tmp_path / "inventory.toml"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or tmp_path,
        timeout=120,
    )


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def record(n: int, **fields: object) -> bytes:
    entry = {
        "id": f"rollout-{n}",
        "action": "rollout",
        "revision": f"{n % 10}" * 40,
        "release": f"20250101000000-{n % 10}" * 7,
        "user": "alice",
        "started": "2025-01-01T00:00:00+00:00",
        "hosts": ["web1"],
        "result": "ok",
        "duration_s": 1.5,
        **fields,
    }
    return json.dumps(entry).encode() + b"\n"


# --- 1. files read back: history and hook logs ------------------------------------------


HISTORY_HEADER = ["id", "action", "revision", "by", "started", "hosts", "result", "took"]


def test_history_skips_corrupt_records_and_warns_once_naming_file_and_lines(
    tmp_path: Path,
) -> None:
    write_inventory(tmp_path)
    history = tmp_path / "state" / "history.jsonl"
    history.parent.mkdir()
    lines = [
        record(1),  # 1 good
        b"\xff\xfe not utf-8\n",  # 2
        b"[1, 2, 3]\n",  # 3 JSON, not an object
        record(4, hosts=5),  # 4
        record(5, duration_s="x"),  # 5
        b'{"id": "x", "action": "rollout", "duration_s": NaN}\n',  # 6
        b"\n",  # blank: not a record, not an error
        record(8, user=["not", "a", "name"]),  # 8
        b"[" * 100_000 + b"\n",  # 9: nested beyond the parser's recursion
        record(10),  # 10 good
        b'{"id": "torn", "act',  # 11: a crash mid-write
    ]
    history.write_bytes(b"".join(lines))

    text = deployer(tmp_path, "history")
    as_json = deployer(tmp_path, "history", "--json")
    for proc in (text, as_json):
        no_traceback(proc)
        assert proc.returncode == 0, proc.stderr
        warning = proc.stderr.strip().splitlines()
        assert len(warning) == 1, proc.stderr
        assert str(history) in warning[0] and "2, 3, 4, 5, 6, 8, 9, 11" in warning[0]
    assert [e["id"] for e in json.loads(as_json.stdout)] == ["rollout-10", "rollout-1"]
    header, *rows = text.stdout.splitlines()
    assert header.split() == HISTORY_HEADER
    assert len(rows) == 2 and rows[1].split()[:2] == ["rollout-1", "rollout"]
    assert rows[1].split()[5:] == ["1", "ok", "1.5s"], rows  # hosts, result, took


def test_history_is_a_table_with_a_header_row(tmp_path: Path) -> None:
    """`deployer history` (issue 24.6c): a header names the columns; an unlock row and a
    rollout row line up under it, and what a record lacks shows as "-"."""
    write_inventory(tmp_path)
    history = tmp_path / "state" / "history.jsonl"
    history.parent.mkdir()
    unlock = {"id": "unlock-2", "action": "unlock", "user": "bob", "broke": ["web1"]}
    history.write_bytes(record(1, failed_step="health") + json.dumps(unlock).encode() + b"\n")
    proc = deployer(tmp_path, "history")
    assert proc.returncode == 0, proc.stderr
    header, unlocked, rolled = proc.stdout.splitlines()
    assert header.split() == HISTORY_HEADER
    assert unlocked.split() == ["unlock-2", "unlock", "-", "bob", "-", "-", "broke", "web1", "-"]
    assert rolled.split()[5:] == ["1", "ok", "at", "health", "1.5s"], rolled
    # the columns line up: each starts where the header's does
    for column in ("action", "started", "result"):
        at = header.index(column)
        assert unlocked[at - 1] == " " and unlocked[at] != " " and rolled[at] != " ", proc.stdout


def test_rollout_logs_unreadable_or_gone_are_reported_not_a_traceback(tmp_path: Path) -> None:
    write_inventory(tmp_path)
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "20250101000000-abcdef1-0001.log").write_bytes(b"ok \xff\xfe bytes\n" + ESC.encode())
    shown = deployer(tmp_path, "logs", "20250101000000-abcdef1-0001")
    no_traceback(shown)
    assert shown.returncode == 0 and "ok \ufffd\ufffd bytes" in shown.stdout
    assert "\x1b" not in shown.stdout and "\\x1b]0;owned\\x07" in shown.stdout

    # the log index holds symlinks into the bare repo; the repo's log may be gone
    (logs / "20250102000000-abcdef1-0002.log").symlink_to(tmp_path / "removed.log")
    gone = deployer(tmp_path, "logs")
    no_traceback(gone)
    assert gone.returncode == 1
    assert "cannot read rollout log" in gone.stderr and "20250102000000-abcdef1-0002" in gone.stderr


# --- 2. numbers are finite and bounded; strings have no NUL; nesting ------------------

BASE = '[app]\nname = "shop"\ndeploy_to = "/srv/{host}"\n'
HOST = '[hosts.web1]\naddress = "10.0.0.1"\n'
HEALTH = '[health]\nurl = "http://{address}:3000/"\n'

# (section text, the key named, a fragment of the allowed range)
BAD_NUMBERS = [
    (BASE.replace("[app]\n", "[app]\nkeep_releases = 1000000000000\n"), "[app] keep_releases",
     "<= 1000"),
    (BASE.replace("[app]\n", "[app]\nkeep_releases = nan\n"), "[app] keep_releases", "<= 1000"),
    (BASE + HEALTH + "expect_status = inf\n", "[health] expect_status", "<= 599"),
    (BASE + HEALTH + "timeout = nan\n", "[health] timeout", "<= 604800"),
    (BASE + HEALTH + "timeout = 1e12\n", "[health] timeout", "<= 604800"),
    (BASE + HEALTH + "passes = 1000000000000\n", "[health] passes", "<= 1000"),
    (BASE + HEALTH + "interval = inf\n", "[health] interval", "<= 604800"),
    (BASE + "[rollout]\ncanary = 1000000000000\n", "[rollout] canary", "<= 10000"),
    (BASE + "[rollout]\nparallel = 1000000000000\n", "[rollout] parallel", "<= 256"),
    (BASE + "[rollout]\nparallel = 257\n", "[rollout] parallel", "<= 256"),
    (BASE + "[rollout]\nbatch = 1000000000000\n", "[rollout] batch", "<= 10000"),
    (BASE + '[rollout]\nbatch = [1, "10%", 99999]\n', "[rollout] batch", "<= 10000"),
    (BASE + "[rollout]\nbatch = nan\n", "[rollout] batch", "<= 10000"),
    (BASE + "[rollout]\nmax_failed = 1000000000000\n", "[rollout] max_failed", "<= 10000"),
    (BASE + "[ssh]\nport = inf\n", "[ssh] port", "<= 65535"),
    (BASE + "[ssh]\nconnect_timeout = nan\n", "[ssh] connect_timeout", "<= 604800"),
    (BASE + "[ssh]\nretry_deadline = 1e300\n", "[ssh] retry_deadline", "<= 604800"),
    (BASE + '[master]\ncommand = "x"\nlisten = "{address}:1"\nworkers = 1000000000000\n',
     "[master] workers", "at most 1024"),
    (BASE + '[migrations]\ndir = "mig\\u0000rations"\n', "[migrations] dir", "string"),
    (BASE.replace('"shop"', '"sh\\u0000op"'), "[app] name", "string"),
    (BASE + '[ssh]\nuser = "de\\u0000ploy"\n', "[ssh] user", "string"),
]  # fmt: skip


def test_inventory_numbers_are_finite_and_bounded_and_strings_have_no_nul(
    tmp_path: Path,
) -> None:
    missed = []
    for text, key, allowed in BAD_NUMBERS:
        path = tmp_path / "inventory.toml"
        path.write_text(text + HOST)
        try:
            inventory.load(path)
        except InventoryError as e:
            if key not in str(e) or allowed not in str(e):
                missed.append(f"{key}: message does not say {allowed!r}: {e}")
            continue
        missed.append(f"{key}: accepted in\n{text}")
    assert not missed, "\n".join(missed)


def test_cli_numbers_are_finite_and_bounded(tmp_path: Path) -> None:
    write_inventory(tmp_path)
    make_repo(tmp_path / "app", {"a.txt": "1\n"})
    cases = {
        "--lock-wait": ["--lock-wait", "nan"],
        "--canary": ["--canary", "1000000000000"],
        "--batch": ["--batch", "9" * 5000],
    }
    for name, args in cases.items():
        proc = deployer(tmp_path, "rollout", "--dry-run", *args, cwd=tmp_path / "app")
        no_traceback(proc)
        assert proc.returncode == 2 and name in proc.stderr, (name, proc.stderr)


def test_deeply_nested_inventory_is_exit_2_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "inventory.toml"
    for nested in ("a = " + "[" * 10_000, "a = " + "{b = " * 10_000):
        path.write_text(nested + "\n")
        proc = deployer(tmp_path, "hosts")
        no_traceback(proc)
        assert proc.returncode == 2 and str(path) in proc.stderr and "nested" in proc.stderr


# --- 3. `deployer logs ID` takes ids of its own logs only -------------------------------


def test_logs_takes_only_rollout_ids(tmp_path: Path) -> None:
    write_inventory(tmp_path)
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "20250101000000-abcdef1-0001.log").write_text("first rollout\n")
    (logs / "20250102000000-abcdef2-0002.log").write_text("second rollout\n")
    (tmp_path / "state" / "x.log").write_text("outside the log directory\n")
    (logs / "notes.log").write_text("not a rollout's log\n")

    for bad in ("../x", "../../x", "/etc/passwd", "*", "2025*", "?", "[0-9]*", "", "notes"):
        proc = deployer(tmp_path, "logs", bad)
        no_traceback(proc)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert "ID must be a rollout id" in proc.stderr and repr(bad) in proc.stderr
        assert "rollout" not in proc.stdout and "outside" not in proc.stdout

    by_prefix = deployer(tmp_path, "logs", "20250101")
    assert by_prefix.returncode == 0 and by_prefix.stdout == "first rollout\n"
    newest = deployer(tmp_path, "logs")
    assert newest.returncode == 0 and newest.stdout == "second rollout\n"
    exact = deployer(tmp_path, "logs", "20250102000000-abcdef2-0002")
    assert exact.returncode == 0 and exact.stdout == "second rollout\n"


# --- 4. names: [app] name, rollback --to, [app] shared ---------------------------------


def test_app_name_is_a_name_not_a_path(tmp_path: Path) -> None:
    for bad in ("../../../escaped", "a/b", ".hidden", "-rf", "x" * 101, "tab\tname"):
        path = write_inventory(tmp_path).read_text().replace('"shop"', json.dumps(bad))
        (tmp_path / "inventory.toml").write_text(path)
        proc = deployer(tmp_path, "hosts")
        no_traceback(proc)
        assert proc.returncode == 2 and "[app] name" in proc.stderr, (bad, proc.stderr)
        assert "not starting with '.' or '-'" in proc.stderr
    assert not (tmp_path / "escaped").exists()
    (tmp_path / "inventory.toml").write_text(
        write_inventory(tmp_path).read_text().replace('"shop"', '"my_app-2.0"')
    )
    assert deployer(tmp_path, "hosts").returncode == 0


def test_rollback_to_must_be_a_release_name(tmp_path: Path) -> None:
    write_inventory(tmp_path, hosts=UNREACHABLE)
    for bad in ("", "previous", "../x", "20250101000000-ABCDEF1", "2025 -abcdef1"):
        proc = deployer(tmp_path, "rollback", "--to", bad)
        no_traceback(proc)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert "--to: expected a release name" in proc.stderr and repr(bad) in proc.stderr
    # a well-formed name gets as far as the hosts (here: unreachable, exit 1)
    proc = deployer(tmp_path, "rollback", "--to", "20250101000000-abcdef1")
    assert proc.returncode == 1 and "--to" not in proc.stderr


def test_shared_entries_are_relative_paths_inside_the_release(tmp_path: Path) -> None:
    for bad in ("../etc", "conf/../../x", "/etc/passwd", "", "   ", "a\u0000b", ".", "./", "a/./b"):
        text = f'[app]\nshared = ["uploads/", {json.dumps(bad)}]\n'
        path = tmp_path / "inventory.toml"
        path.write_text(BASE.replace("[app]\n", text) + HOST)
        with pytest.raises(InventoryError) as e:
            inventory.load(path)
        assert "[app] shared" in str(e.value) and f"entry {bad!r}" in str(e.value), bad
    path.write_text(BASE.replace("[app]\n", '[app]\nshared = ["conf/app.env", "up/"]\n') + HOST)
    assert inventory.load(path).app.shared == ("conf/app.env", "up/")


# --- 5. revisions git refuses ----------------------------------------------------------


def test_revisions_git_refuses_are_exit_2_naming_the_revision(tmp_path: Path) -> None:
    write_inventory(tmp_path)
    repo = make_repo(tmp_path / "app", {"a.txt": "1\n"})
    for bad in ("HEAD@{999}", "HEAD@{not-a-date}", "HEAD:a.txt", "HEAD^{tree}", "nope", "--all",
                "", "0" * 40):  # fmt: skip
        proc = deployer(tmp_path, "rollout", "--dry-run", "--", bad, cwd=repo)
        no_traceback(proc)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert f"revision {bad!r}" in proc.stderr
    good = deployer(tmp_path, "rollout", "HEAD", "--dry-run", cwd=repo)
    assert good.returncode == 0, good.stderr


# --- 6. a health URL names the host it is probed on -----------------------------------


def test_health_url_naming_another_machine_is_refused(tmp_path: Path) -> None:
    hosts = '[hosts.web1]\naddress = "10.0.0.1"\n[hosts.web2]\naddress = "10.0.0.2"\n'
    path = tmp_path / "inventory.toml"
    for bad in ("http://10.0.0.1:3000/health", "http://db.example.com/", "http://{host}.x:1/",
                "http://user@10.9.9.9:80/", "https://[2001:db8::1]/"):  # fmt: skip
        path.write_text(BASE + f'[health]\nurl = "{bad}"\n' + hosts)
        with pytest.raises(InventoryError) as e:
            inventory.load(path)
        message = str(e.value)
        assert "[hosts.web2] [health] url" in message, (bad, message)
        assert "the probe runs on web2 itself" in message
    for good in ("http://{address}:3000/", "http://{host}:3000/", "http://localhost/",
                 "http://127.0.0.5:80/", "http://[::1]:8080/x", "https://LOCALHOST/"):  # fmt: skip
        path.write_text(BASE + f'[health]\nurl = "{good}"\n' + hosts)
        assert inventory.load(path).hosts["web2"].health is not None, good


# --- 7. control characters from a repo or a build never reach a terminal raw ------------


def test_reporter_and_hook_output_show_control_characters_as_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = LiveReporter()  # the live table, as on a terminal (rich writes to stdout)
    live.say(f"build: {ESC}", host="web1")
    live.close()
    table = capsys.readouterr().out
    assert "\x1b]0;owned" not in table and table.count("\\x1b]0;owned\\x07") == 2  # line, row

    out = io.StringIO()
    Reporter(out).say(f"build: {ESC}\tend\r\n", host="web1")
    line = out.getvalue()
    assert line.count("\n") == 1 and line.endswith("\tend\n")  # tab kept, CR-LF one ending
    for raw in "\x1b\x07\x9b\r\x0c\x7f":
        assert raw not in line and f"\\x{ord(raw):02x}" in line, (raw, line)

    log = tmp_path / "rollout.log"
    log.write_text(f"one {ESC}\ntwo\n")
    pusher = io.StringIO()
    githooks.follow(log, lambda: False, pusher)
    assert "\x1b" not in pusher.getvalue() and "\x9b" not in pusher.getvalue()
    assert pusher.getvalue().startswith("one \\x1b]0;owned\\x07") and "\ntwo\n" in pusher.getvalue()
