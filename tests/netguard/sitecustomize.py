"""No test reaches the network: a connection to anything but this machine is refused.

conftest.py installs this in the test process and puts this folder on PYTHONPATH, so every
process a test starts (run.py, sweeps, DDP ranks) imports it as its sitecustomize too. Tests
that download serve the files themselves on 127.0.0.1 or read file:// URLs.
"""

import ipaddress
import socket

REFUSED = "tests may not reach the network"


def _local(family: int, address: object) -> bool:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True  # Unix sockets and the like never leave the machine
    host = str(address[0]) if isinstance(address, tuple) else str(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: connecting to it would need a lookup first
        return False


def install() -> None:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if not _local(self.family, address):
            raise ConnectionRefusedError(f"{REFUSED}: connection to {address!r}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if not _local(self.family, address):
            raise ConnectionRefusedError(f"{REFUSED}: connection to {address!r}")
        return real_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex


install()
