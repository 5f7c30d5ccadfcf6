"""The test suite's network guard refuses connections that leave the machine."""

import socket
import subprocess
import sys

import pytest


@pytest.mark.parametrize("address", [("192.0.2.1", 443), ("huggingface.co", 443)])
def test_a_test_cannot_connect_beyond_this_machine(address):
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="may not reach"):
        sock.connect(address)
    with pytest.raises(ConnectionRefusedError, match="may not reach"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)


def test_loopback_stays_open():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_processes_a_test_starts_are_guarded_too():
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode != 0 and "may not reach the network" in out.stderr
