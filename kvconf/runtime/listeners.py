"""What this process listens on: the TCP sockets in state LISTEN that it holds, read from
``/proc/net/tcp``, ``/proc/net/tcp6`` and its own descriptors (Linux; elsewhere an empty list). A
transfer engine opens listeners of its own that kvconf does not bind (Mooncake's RPC and data ports
on every interface; UCX's on every network device), so a report of them has to be read from the
kernel rather than taken from settings.

>>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0"), is_loopback("*")
(True, True, False, False)
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import Optional

__all__ = ["interface_of", "is_loopback", "listening"]

LISTEN = "0A"


def _addr(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four host-order 32-bit words
    text = socket.inet_ntop(socket.AF_INET6, words)
    return "*" if text == "::" else text


def listening(pid: str = "self") -> list[tuple[str, int]]:
    """(address, port) of every TCP socket of process ``pid`` in state LISTEN, sorted; ``0.0.0.0``
    and ``*`` (IPv6 any) mean every interface."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = set()
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != LISTEN or cols[9] not in inodes:
                continue
            host, port = cols[1].split(":")
            found.add((_addr(host, v6), int(port, 16)))
    return sorted(found)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback only."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def interface_of(host: str) -> Optional[str]:
    """The network interface that holds IPv4 address ``host`` (``lo`` for loopback), or None."""
    if is_loopback(host):
        return "lo"
    try:
        import fcntl
        import struct

        wanted = socket.inet_aton(socket.gethostbyname(host))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                with contextlib.suppress(OSError):
                    req = struct.pack("256s", name.encode()[:15])
                    if fcntl.ioctl(s.fileno(), 0x8915, req)[20:24] == wanted:  # SIOCGIFADDR
                        return name
    except (OSError, ImportError):
        return None
    return None
