"""serve() in this process: idempotence, the loopback-only TCP policy, the private runtime directory."""

from __future__ import annotations

import os
import stat

import pytest

pytest.importorskip("grpc")

from glake.stats import paths, server  # noqa: E402
from glake.stats.client import StatsClient  # noqa: E402


@pytest.fixture(autouse=True)
def no_server_left():
    server.stop()
    yield
    server.stop()
    assert server.current() is None


def test_serve_is_idempotent_and_stop_removes_the_socket():
    s1 = server.serve()
    s2 = server.serve()
    assert s1 is s2 and s1.addresses == ["unix:" + paths.socket_path(os.getpid())]
    assert stat.S_IMODE(os.lstat(s1.socket_path).st_mode) == 0o600
    with StatsClient(os.getpid()) as c:
        assert c.get_stats(["vmm"])["process"]["pid"] == os.getpid()
    server.stop()
    assert not os.path.exists(s1.socket_path)
    s3 = server.serve()  # a new one can start after stop()
    assert s3 is not s1 and os.path.exists(s3.socket_path)


def test_loopback_tcp_and_a_second_address_is_refused_while_serving():
    s = server.serve("127.0.0.1:0")
    assert s.tcp_address.startswith("127.0.0.1:") and s.socket_path
    with StatsClient(s.tcp_address) as c:
        assert c.get_stats(["vmm"])["process"]["listen_addresses"] == s.addresses
    assert server.serve("127.0.0.1:0") is s  # port 0: whatever port it has
    with pytest.raises(RuntimeError, match="already serving"):
        server.serve("127.0.0.2:0")


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.1:0", "example.com:50051", "10.1.2.3:0"])
def test_non_loopback_tcp_is_refused_unless_allowed(address, monkeypatch):
    monkeypatch.delenv("GLAKE_STATS_ALLOW_REMOTE", raising=False)
    with pytest.raises(server.RemoteAddressRefused, match="not a loopback address"):
        server.serve(address)
    assert server.current() is None and not os.path.exists(paths.socket_path(os.getpid()))
    monkeypatch.setenv("GLAKE_STATS_ADDR", address)
    with pytest.raises(server.RemoteAddressRefused):
        server.serve()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_allowing_remote_passes_the_policy(how, monkeypatch):
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: once the policy lets it through,
    # binding fails locally. Nothing ever listens beyond loopback.
    if how == "environment":
        monkeypatch.setenv("GLAKE_STATS_ALLOW_REMOTE", "1")
        kwargs = {}
    else:
        kwargs = {"allow_remote": True}
    with pytest.raises(RuntimeError, match="cannot listen on 192.0.2.1:0"):
        server.serve("192.0.2.1:0", **kwargs)
    assert server.current() is None and not os.path.exists(paths.socket_path(os.getpid()))


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:http", "127.0.0.1:70000", ":50051"])
def test_bad_addresses(address):
    with pytest.raises(ValueError):
        server.serve(address)


def test_is_loopback():
    assert all(map(server.is_loopback, ["localhost", "127.0.0.1", "127.8.9.10", "::1"]))
    assert not any(map(server.is_loopback, ["0.0.0.0", "::", "192.168.1.1", "localhost.example.com", "host"]))


def test_runtime_dir_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = paths.ensure_runtime_dir()
    assert d == str(tmp_path / "glake") and stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    os.chmod(d, 0o755)
    paths.ensure_runtime_dir()
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700  # tightened


def test_runtime_dir_not_ours_or_a_link_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "glake")
    with pytest.raises(PermissionError, match="not a directory"):
        paths.ensure_runtime_dir()
    with pytest.raises(PermissionError):
        server.serve()
    os.unlink(tmp_path / "glake")
    if os.getuid() != 0:
        return  # giving a directory to another user needs root
    (tmp_path / "glake").mkdir(mode=0o700)
    os.chown(tmp_path / "glake", 12345, 12345)
    with pytest.raises(PermissionError, match="belongs to uid 12345"):
        paths.ensure_runtime_dir()


def test_default_runtime_dir_without_xdg(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert paths.runtime_dir() == f"/tmp/glake-{os.getuid()}"
    assert paths.socket_path(42) == f"/tmp/glake-{os.getuid()}/42.sock"
