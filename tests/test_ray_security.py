"""A sweep's Ray is private: it listens on loopback only and answers only clients holding its own token.

Real Ray, started by the same ``local_ray`` the sweep driver uses; sockets read from ``/proc/net/tcp*``.
"""

import ipaddress
import os
import socket
import stat
import struct
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")


def listening(family_file):
    """{inode: address} of the listening TCP sockets in one of /proc/net/tcp, /proc/net/tcp6."""
    out = {}
    with open(family_file) as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A":  # TCP_LISTEN
                continue
            hex_ip = local.split(":")[0]
            raw = b"".join(struct.pack("<I", int(hex_ip[i:i + 8], 16)) for i in range(0, len(hex_ip), 8))
            ip = ipaddress.ip_address(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))
            out[inode] = ip.ipv4_mapped or ip if ip.version == 6 else ip
    return out


def descendants(root):
    """``root`` and every process below it (Ray's gcs_server, raylet, agents, workers)."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # exited meanwhile
            pass
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def sockets_of(pids):
    """{(pid, process name): [addresses]} of the listening sockets these processes hold."""
    addresses = {**listening("/proc/net/tcp"), **listening("/proc/net/tcp6")}
    held = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            name = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        mine = [addresses[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in addresses]
        if mine:
            held[(pid, name)] = mine
    return held


def client(gcs, extra_env):
    """A separate process asking the GCS for its keys; the last line of what it says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(extra_env)
    code = f"from ray._raylet import GcsClient; GcsClient(address={gcs!r}).internal_kv_keys(b'', None, timeout=30); print('answered')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1]


def test_sweep_ray_listens_on_loopback_only_and_refuses_clients_without_its_token(tmp_path, monkeypatch):
    from pruneflow.sweep.pool import local_ray

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray's shared default token lives in ~/.ray
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)  # a token already in the environment must not be the one used
    with local_ray(1, 0):
        import ray

        assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()  # a worker is up and holds its port too
        held = sockets_of(descendants(os.getpid()))
        names = {name for _, name in held}
        assert {"gcs_server", "raylet"} <= names, held  # the scan sees Ray's servers at all
        exposed = {k: v for k, v in held.items() if not all(ip.is_loopback for ip in v)}
        assert not exposed, f"listening beyond loopback: {exposed}"
        programs = {name: open(f"/proc/{pid}/cmdline").read().split("\0")[:2] for pid, name in held}
        serving = {k: v for k, v in programs.items() if any(w in " ".join(v).lower() for w in ("dashboard", "client"))}
        assert not serving, serving  # no web UI or dashboard agent port, no Ray client server

        token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
        assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(token_path)).st_mode) == 0o700
        assert len(open(token_path).read()) == 64
        assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ

        gcs = ray.get_runtime_context().gcs_address
        assert ipaddress.ip_address(gcs.rsplit(":", 1)[0]).is_loopback
        home = {"HOME": str(tmp_path)}
        for env in (home, {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                    {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}):
            rc, last = client(gcs, env)
            assert rc != 0 and "InvalidAuthToken" in last, (env, last)
        rc, last = client(gcs, {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path})
        assert (rc, last) == (0, "answered")  # the control: the sweep's own token is let in
    assert not os.path.exists(os.path.dirname(token_path))  # token and Ray's files gone with the sweep
    assert not (tmp_path / ".ray").exists()  # nothing written to the shared default place
    assert os.environ["RAY_AUTH_TOKEN"] == "f" * 64 and "RAY_AUTH_TOKEN_PATH" not in os.environ


def test_each_ray_of_a_process_gets_a_fresh_token_and_works():
    # benchmarks/packing.py starts Ray once per K in one process: Ray caches the token it read first
    import signal

    from pruneflow.sweep.pool import local_ray

    on_term, tokens = signal.getsignal(signal.SIGTERM), []
    for _ in range(2):
        with local_ray(1, 0):
            import ray

            tokens.append(open(os.environ["RAY_AUTH_TOKEN_PATH"]).read())
            assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
    assert tokens[0] != tokens[1]
    assert signal.getsignal(signal.SIGTERM) is on_term  # the caller's handler is back once Ray has gone


def test_a_ray_without_token_auth_or_loopback_binding_is_refused(monkeypatch):
    import ray

    from pruneflow.errors import UserError
    from pruneflow.sweep.pool import local_ray

    monkeypatch.setattr(ray, "__version__", "2.51.0")
    before = set(os.listdir("/tmp"))
    with pytest.raises(UserError, match=r"Ray 2\.51\.0 is too old.*ray>=2\.60"):
        with local_ray(1, 0):
            pass
    assert not ray.is_initialized() and {p for p in set(os.listdir("/tmp")) - before if p.startswith("pf-ray-")} == set()
