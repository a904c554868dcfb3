"""Who may talk to a producer: ZeroMQ's CURVE security, keyed by one shared secret.

Every peer proves that it holds the secret before the producer reads a byte of what it sends, and
the producer proves the same to the consumer, so that nobody learns an address, an engine's
metadata or a prefill without the key, and no stranger can pose as the producer and write into a
consumer's memory. Why CURVE rather than an HMAC handshake of our own: libzmq runs it before a
message reaches Python (a peer without the key never reaches the message decoder), it encrypts
what follows (the addresses and the NIXL metadata are secrets too), and it is libzmq's reviewed
code, not ours.

From the secret (the text of ``connector.extra.auth_key_file`` or of ``$KVCONF_AUTH_KEY``) each
side derives two Curve25519 key pairs, one for producers and one for consumers
(``sha256(label, secret)`` as the secret key): a consumer needs the producer's public key to
connect, and the producer's ZAP handler admits only the consumers' public key. A peer with a wrong
key fails the handshake; one with no key fails the mechanism check. Both are refused, counted and
logged by the producer; the consumer sees the failed handshake on its socket monitor and says that
authentication failed.

>>> k = AuthKey.from_text("correct horse battery staple", "test")
>>> k.public("producer") == AuthKey.from_text("correct horse battery staple", "x").public("producer")
True
>>> k.public("producer") == k.public("consumer")
False
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from kvconf.errors import ConfigError, Problem

__all__ = ["ENV", "MIN_KEY_CHARS", "AuthKey", "Handshake", "client_keys", "key_problems", "load_key",
           "read_secret", "release_server", "secret_file_problems", "secure_client", "secure_server",
           "write_key_file"]

log = logging.getLogger("kvconf.p2p")

ENV = "KVCONF_AUTH_KEY"
"""The environment variable that holds the shared secret where no ``auth_key_file`` is set."""
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 4096
FILE_FIX = "write a secret of at least 16 characters into it, e.g. python -c 'import secrets; " \
           "print(secrets.token_hex(32))' > FILE; chmod 600 FILE"
Side = Literal["producer", "consumer"]


@dataclass(frozen=True)
class AuthKey:
    """The shared secret and where it came from (said in messages, never the secret itself)."""

    secret: bytes
    source: str
    """``connector.extra.auth_key_file=PATH``, ``$KVCONF_AUTH_KEY`` or ``a key generated for this run``."""
    path: Optional[str] = None

    def __repr__(self) -> str:  # never print the secret
        return f"AuthKey(source={self.source!r})"

    @classmethod
    def from_text(cls, text: str, source: str, path: Optional[str] = None) -> AuthKey:
        return cls(text.strip().encode(), source, path)

    @classmethod
    def generate(cls) -> AuthKey:
        return cls.from_text(secrets.token_hex(32), "a key generated for this run")

    @property
    def text(self) -> str:
        return self.secret.decode()

    def _secret_z85(self, side: Side) -> bytes:
        from zmq.utils import z85

        return z85.encode(hashlib.sha256(b"kvconf-curve-" + side.encode() + b"\0" + self.secret).digest())

    def public(self, side: Side) -> bytes:
        import zmq

        return zmq.curve_public(self._secret_z85(side))

    def pair(self, side: Side) -> tuple[bytes, bytes]:
        """(public, secret) of ``side``, z85-encoded as libzmq takes them."""
        return self.public(side), self._secret_z85(side)


def _text_problems(text: str, path: str, value: Any, fix: str) -> list[Problem]:
    n = len(text.strip())
    if n < MIN_KEY_CHARS or n > MAX_KEY_CHARS:
        return [Problem(path, f"the key has {n} characters; it needs {MIN_KEY_CHARS} to {MAX_KEY_CHARS}",
                        value=value, fix=fix)]
    return []


def key_problems(auth_key_file: Optional[str]) -> list[Problem]:
    """What is wrong with the configured key (``action=check`` says it, exit 2); [] where it is
    usable or where none is set (a producer then makes one; a consumer is refused by producers)."""
    if auth_key_file is None:
        text = os.environ.get(ENV)
        if text is None:
            return []
        return _text_problems(text, ENV, "(set)", f"export {ENV}=\"$(python -c 'import secrets; "
                              "print(secrets.token_hex(32))')\" on every peer")
    return secret_file_problems("connector.extra.auth_key_file", auth_key_file)


def secret_file_problems(path: str, secret_file: str) -> list[Problem]:
    """What is wrong with the secret in ``secret_file`` (the setting at config ``path``): missing,
    not a regular file, readable by others or changeable by the group, too short or too long."""
    file = Path(secret_file).expanduser()
    try:
        st = os.stat(file)
    except OSError as exc:
        return [Problem(path, f"cannot read the key file: {exc.strerror}", value=secret_file,
                        fix=("give the file the producer printed beside 'serving on', or "
                             if path.endswith("auth_key_file") else "") + FILE_FIX)]
    if not stat.S_ISREG(st.st_mode):
        return [Problem(path, "the key file is not a regular file", value=secret_file, fix=FILE_FIX)]
    if st.st_mode & 0o026:
        return [Problem(path, f"the key file's mode is {stat.S_IMODE(st.st_mode):04o}: other users can read or "
                        "change the secret", value=secret_file,
                        fix=f"chmod 600 {file} (Kubernetes secret volumes: defaultMode: 0400)")]
    if st.st_size > MAX_KEY_CHARS + 64:
        return [Problem(path, f"the key file has {st.st_size} bytes; a key has at most {MAX_KEY_CHARS} characters",
                        value=secret_file, fix=FILE_FIX)]
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(path, f"cannot read the key file: {exc}", value=secret_file, fix=FILE_FIX)]
    return _text_problems(text, path, secret_file, FILE_FIX)


def load_key(auth_key_file: Optional[str]) -> Optional[AuthKey]:
    """The configured key (the file first, then ``$KVCONF_AUTH_KEY``), or None where none is set;
    a :class:`ConfigError` where the one set is unusable."""
    if auth_key_file is not None:
        file = Path(auth_key_file).expanduser()
        return AuthKey(read_secret("connector.extra.auth_key_file", auth_key_file),
                       f"connector.extra.auth_key_file={file}", str(file))
    problems = key_problems(None)
    if problems:
        raise ConfigError(*problems)
    text = os.environ.get(ENV)
    return None if text is None else AuthKey.from_text(text, f"${ENV}")


def read_secret(path: str, secret_file: str) -> bytes:
    """The secret in ``secret_file``, checked (:class:`ConfigError` at ``path`` where it is unusable)."""
    problems = secret_file_problems(path, secret_file)
    if problems:
        raise ConfigError(*problems)
    return Path(secret_file).expanduser().read_text(encoding="utf-8").strip().encode()


def keys_folder() -> Path:
    """Where ``action=serve`` writes a key it generated: ``$XDG_CACHE_HOME/kvconf/keys`` (or
    ``~/.cache/kvconf/keys``), mode 0700."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = root / "kvconf" / "keys"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def write_key_file(key: AuthKey, name: str) -> AuthKey:
    """Writes ``key`` into a new 0600 file ``name`` of :func:`keys_folder`; the key, with its path."""
    file = keys_folder() / name
    with contextlib.suppress(FileNotFoundError):
        file.unlink()  # a previous producer's, on the same port: it is gone
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.text + "\n")
    return AuthKey(key.secret, f"connector.extra.auth_key_file={file}", str(file))


# ---- the producer's side: CURVE server and the ZAP handler -----------------------------------------
class _Admit:
    """The ZAP handler's verdict: each producer's domain admits its consumers' public key only."""

    def __init__(self) -> None:
        self.allowed: dict[str, bytes] = {}
        self.refused = 0

    def callback(self, domain: str, client_key: bytes) -> bool:
        ok = self.allowed.get(domain) == client_key
        if not ok:
            self.refused += 1
            log.warning("refused a peer that knows the producer's public key but not the secret")
        return ok


_lock = threading.Lock()
_admit = _Admit()
_auth: Any = None
_users = 0


def secure_server(sock: Any, key: AuthKey) -> None:
    """Makes ``sock`` (before it binds) a CURVE server that admits holders of ``key`` only."""
    global _auth, _users
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = key.pair("producer")
    domain = "kvconf-" + public.decode()
    with _lock:
        if _auth is None:
            _auth = ThreadAuthenticator(sock.context, log=logging.getLogger("kvconf.p2p.zap"))
            _auth.start()
        _auth.configure_curve_callback(domain, credentials_provider=_admit)
        _admit.allowed[domain] = key.public("consumer")
        _users += 1
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.zap_domain = domain.encode()


def release_server() -> None:
    """A producer closed its socket: the ZAP handler stops with the last one."""
    global _auth, _users
    with _lock:
        _users -= 1
        if _users <= 0 and _auth is not None:
            _auth.stop()
            _auth, _users = None, 0
            _admit.allowed.clear()


# ---- the consumer's side ---------------------------------------------------------------------
class Handshake:
    """A consumer socket's CURVE keys and the monitor that tells a refused handshake from a
    producer that is merely slow to answer."""

    def __init__(self, sock: Any, key: Optional[AuthKey]) -> None:
        import zmq

        self.key = key
        if key is not None:
            client_keys(sock, key)
        failed = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.monitor: Any = sock.get_monitor_socket(failed)
        self._sock = sock

    def failure(self, address: str) -> Optional[str]:
        """Why the producer at ``address`` refused this socket, once its monitor says so; else None."""
        from zmq.utils.monitor import recv_monitor_message

        if self.monitor is None or not self.monitor.poll(0):
            return None
        recv_monitor_message(self.monitor)
        return refused(address, self.key)

    def wait(self, sock: Any, address: str, timeout: float) -> Optional[str]:
        """Waits up to ``timeout`` s for a message on ``sock``; why the handshake failed, if it did."""
        import zmq

        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if sock in ready:
                return None
            if (why := self.failure(address)) is not None:
                return why
        return None

    def close(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self._sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None


def client_keys(sock: Any, key: AuthKey) -> None:
    """Sets ``sock`` (before it connects) up to prove ``key`` to a producer, and to know it."""
    public, secret = key.pair("consumer")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = key.public("producer")


def secure_client(sock: Any, key: Optional[AuthKey]) -> Handshake:
    """Sets ``sock`` (before it connects) up to authenticate with ``key`` and watches its handshake."""
    return Handshake(sock, key)


def refused(address: str, key: Optional[AuthKey]) -> str:
    """The consumer's message for a producer that refused the handshake."""
    if key is None:
        return (f"authentication failed: the producer at {address} requires a key and this consumer has none; "
                f"fix: set connector.extra.auth_key_file to the file the producer printed beside "
                f"'serving on', or {ENV} to the producer's key")
    return (f"authentication failed: the producer at {address} refused the key from {key.source}; fix: use "
            f"the producer's key (the file it printed beside 'serving on', or its {ENV})")
