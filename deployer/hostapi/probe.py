"""A read-only look at a host, before or after `deployer setup`: run as
`python3 -c <this file> ROOT DIGEST LISTEN DIRS TRUST [ROLE]` (hostapi.calls.probe).

It needs no agent on the host and writes nothing: `deployer doctor` runs it
before setup ever ran, `deployer config --diff` to read master.toml whatever the
installed agent is. Standard library only, and no syntax newer than Python 3.6,
so an old host Python is named by its version, not by a SyntaxError. Each part
of the answer is learnt on its own: one that fails is {"error": ...}, the others
still come. The answer is one result line (hostapi.answers.Probe).

ROOT: deploy_to. DIGEST: the sha256 of the controller's zipapp. LISTEN: the
master's listen ("HOST:PORT", "unix:/path" or ""). DIRS: a JSON list of the
layout's directories. TRUST: the source of hostapi/trust.py (the agent's checks
of the layout). ROLE: the role whose master's files are read (master-ROLE.toml,
run/master-ROLE.pid); none or "": master.toml, run/master.pid.
"""

import hashlib
import json
import os
import socket
import sys
import time

RESULT_MARK = "@@deployer-result"  # hostapi.answers.RESULT_MARK
MAX_TOML = 1 << 20
BLOCK = 1 << 16


def nearest_existing(path):
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def user():
    import pwd

    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"name": name, "uid": uid}


def disk(root):
    path = nearest_existing(root)
    st = os.statvfs(path)
    return {"path": path, "free": st.f_bavail * st.f_frsize, "total": st.f_blocks * st.f_frsize}


def load_trust(trust_source):
    """hostapi/trust.py, the agent's checks, from its source (no agent here yet)."""
    trust = {"__name__": "deployer_probe_trust"}
    exec(compile(trust_source, "trust.py", "exec"), trust)
    return trust


def layout(root, dirs, trust):
    """The agent's own checks (trust.secure_dirs, as every op runs them), and
    whether we can write where setup will."""
    from pathlib import Path

    if not os.path.lexists(root):
        parent = nearest_existing(root)
        try:
            trust["check_ancestors"](Path(root))
        except trust["UntrustedPath"] as e:
            return {"state": "untrusted", "why": str(e)}
        return {"state": "missing", "parent": parent, "writable": os.access(parent, os.W_OK)}
    try:
        trust["secure_dirs"](Path(root), [Path(d) for d in dirs], False)
    except trust["UntrustedPath"] as e:
        return {"state": "untrusted", "why": str(e)}
    present = [d for d in [root, *dirs] if os.path.isdir(d)]
    unwritable = [d for d in present if not os.access(d, os.W_OK)]
    if unwritable:
        return {"state": "not-writable", "dirs": unwritable}
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        return {"state": "incomplete", "missing": missing}
    return {"state": "ok"}


def agent(root, digest):
    path = os.path.join(root, ".deployer", "deployer.pyz")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(BLOCK), b""):
                h.update(chunk)
    except FileNotFoundError:
        return {"state": "missing", "path": path}
    return {"state": "same" if h.hexdigest() == digest else "differs", "path": path}


STEM = "master"  # master-ROLE with a ROLE argument


def master_toml(root, layout_fact, trust):
    """master.toml as the agent would read it (trust.read_file: no symlink, ours),
    and only from a layout the agent trusts."""
    path = os.path.join(root, STEM + ".toml")
    if layout_fact.get("state") == "untrusted":
        return {
            "exists": os.path.lexists(path),
            "path": path,
            "error": "not read: " + str(layout_fact.get("why")),
        }
    from pathlib import Path

    try:
        data = trust["read_file"](Path(path), MAX_TOML)
    except FileNotFoundError:
        return {"exists": False, "path": path}
    except trust["UntrustedPath"] as e:
        return {"exists": True, "path": path, "error": str(e)}
    return {"exists": True, "path": path, "text": data.decode("utf-8", "replace")}


def master_pid(root):
    try:
        with open(os.path.join(root, "run", STEM + ".pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def systemd():
    import shutil

    return {"running": os.path.isdir("/run/systemd/system"), "systemctl": shutil.which("systemctl")}


def _socket_inodes(pid):
    """The sockets a process holds (its /proc/PID/fd links `socket:[INODE]`)."""
    found = set()
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _unmapped(raw):
    """An IPv4-mapped IPv6 address as its 4 IPv4 bytes; others as they are."""
    return raw[12:] if len(raw) == 16 and raw[:12] == V4_MAPPED else raw


def _table_address(hex_address):
    """/proc/net/tcp's local address (32-bit words in host byte order) as bytes."""
    words = range(0, len(hex_address), 8)
    return _unmapped(
        b"".join(int(hex_address[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in words)
    )


def _wanted_address(host):
    """`host` of a listen spec as bytes; None for every address ("", 0.0.0.0, ::) or
    a name that does not resolve here (then every listener on the port counts)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            raw = _unmapped(socket.inet_pton(family, host))
            return raw if any(raw) else None
        except OSError:
            continue
    try:
        return socket.inet_aton(socket.gethostbyname(host)) if host else None
    except OSError:
        return None


def _listening_inodes(host, port):
    """Inodes of the TCP sockets listening on `port` where a bind of `host` clashes
    (the same address, or either is every address): on a machine with several
    addresses (hosts on 127.0.0.x), another address's listener is not in the way."""
    wanted = _wanted_address(host)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            address, _, port_hex = local.rpartition(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            listening = _table_address(address)
            if wanted is None or not any(listening) or listening == wanted:
                found.add(inode)
    return found


def _holder(inodes):
    """A process of ours holding one of these sockets: (pid, name), or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if _socket_inodes(int(entry)) & inodes:
                with open(f"/proc/{entry}/comm") as f:
                    return int(entry), f.read().strip()
        except OSError:
            continue
    return None


def listen(root, spec):
    """Can the master bind `spec`: free, held by our master already, or taken."""
    if not spec:
        return {"state": "unchecked"}
    pid = master_pid(root)
    if spec.startswith("unix:"):
        path = spec[5:]
        if not os.path.lexists(path):
            return {"state": "free"}
        if pid is not None:
            return {"state": "ours", "pid": pid}
        return {"state": "taken", "why": f"{path} exists and no master of this deploy_to runs"}
    host, _, port_text = spec.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return {"state": "free"}
    except OSError as e:
        if e.errno != 98:  # EADDRINUSE
            return {"state": "error", "why": e.strerror or str(e)}
    finally:
        s.close()
    inodes = _listening_inodes(host, port)
    if pid is not None and inodes & _socket_inodes(pid):
        return {"state": "ours", "pid": pid}
    held = _holder(inodes) if inodes else None
    if held is None:
        return {"state": "taken", "why": "in use by a process of another user"}
    return {"state": "taken", "why": f"in use by pid {held[0]} ({held[1]})", "pid": held[0]}


def main(argv):
    global STEM
    root, digest, spec, dirs, trust_source = argv[:5]
    if len(argv) > 5 and argv[5]:
        STEM = "master-" + argv[5]
    facts = {
        "ok": True,
        "python": ".".join(str(n) for n in sys.version_info[:3]),
        "executable": sys.executable,
        "time": time.time(),
    }
    loaded = {}

    def trust():  # in a part of its own: an old Python's SyntaxError fails only those parts
        if "trust" not in loaded:
            loaded["trust"] = load_trust(trust_source)
        return loaded["trust"]

    parts = [
        ("user", user, ()),
        ("disk", disk, (root,)),
        ("layout", lambda: layout(root, json.loads(dirs), trust()), ()),
        ("agent", agent, (root, digest)),
        ("master_toml", lambda: master_toml(root, facts.get("layout") or {}, trust()), ()),
        ("master", lambda: {"pid": master_pid(root)}, ()),
        ("systemd", systemd, ()),
        ("listen", listen, (root, spec)),
    ]
    for name, fn, args in parts:
        try:
            facts[name] = fn(*args)
        except Exception as e:  # one part failing says so; the others still come
            facts[name] = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(RESULT_MARK + " " + json.dumps(facts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
