"""SFTP backend (paramiko).

Each worker thread gets its own SFTP channel so threads do not wait on each other's round trips;
channels are spread over as many SSH connections as the server's MaxSessions requires. Writes go to a hidden temp name in the target directory and
are renamed into place with posix-rename@openssh.com. Keys are checked like local keys, and every
directory we write into must resolve (server-side realpath) inside the root.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import getpass
import hashlib
import io
import logging
import os
import posixpath
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Hashable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_STATUS,
    int64,
)
from paramiko.sftp_file import SFTPFile

from ossimport.errors import NotFound, StorageError, UnsafeKey, transport_code
from ossimport.storage.base import (
    Abilities,
    Entry,
    Storage,
    StorageOptions,
    Writer,
    check_key,
    check_relative,
    check_utf8,
)
from ossimport.storage.local import (
    FileFields,
    Node,
    fields_entry,
    is_temp_name,
    read_exact,
    sorted_walk,
    stale_temps,
    temp_name,
)

if TYPE_CHECKING:
    from ossimport.address import Location

log = logging.getLogger(__name__)

CHANNELS_PER_CONNECTION = 8  # below OpenSSH's default MaxSessions of 10
REQUEST = 32768  # the read/write request every SFTP server takes (paramiko's default)
_CONNECTION_ERRORS = (socket.timeout, TimeoutError, ConnectionError, EOFError, paramiko.SSHException)


class _UnknownHost(paramiko.SSHException):
    """The server's host key is in no known_hosts file we read."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"unknown host {hostname}")
        self.hostname, self.key = hostname, key


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """A host not in known_hosts is refused, as ssh does with StrictHostKeyChecking=yes; with
    --trust-new-hosts its key is recorded in `path` first (StrictHostKeyChecking=accept-new). A
    *changed* known key is refused by paramiko either way."""

    def __init__(self, path: str, trust_new: bool) -> None:
        self.path, self.trust_new = path, trust_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust_new:
            raise _UnknownHost(hostname, key)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())  # one append: processes recording at once do not mix lines
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot record the host key of {hostname} in {self.path}: {e.strerror or e}",
                               code="UnknownHostKey") from None
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("SFTP host %s was not known: recorded its %s key %s in %s", hostname, key.get_name(),
                    fingerprint(key), self.path)


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as ssh and ssh-keygen -l show it: SHA256:<base64>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _Conn:
    """One SSH connection and how many SFTP channels are open on it."""

    def __init__(self, ssh: paramiko.SSHClient) -> None:
        self.ssh = ssh
        self.channels = 0
        self.limit = CHANNELS_PER_CONNECTION
        self.request_size: int | None = None  # bytes per SFTP read/write request (see _request_size)

    def alive(self) -> bool:
        transport = self.ssh.get_transport()
        return transport is not None and transport.is_active()


def _transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A Transport that prefers AES-GCM: it needs no separate HMAC pass over every packet, which
    paramiko computes in Python (measured: 128 MiB uploaded with ~0.25 s of client CPU instead of
    ~0.55 s with aes128-ctr + hmac-sha2-256)."""
    t = paramiko.Transport(sock, **kwargs)
    options = t.get_security_options()
    options.ciphers = tuple(sorted(options.ciphers, key=lambda c: 0 if c.endswith("-gcm@openssh.com") else 1))
    return t


def _request_size(client: paramiko.SFTPClient) -> int:
    """Bytes per read/write request: 32 KiB is what every server must take; a server that states
    its limits (OpenSSH 8.6+: limits@openssh.com, 255 KiB) gets 128 KiB, a quarter of the
    requests (measured: a 128 MiB upload at ~2x the rate)."""
    try:
        kind, msg = client._request(CMD_EXTENDED, "limits@openssh.com")
        if kind == CMD_EXTENDED_REPLY:
            msg.get_int64()  # max packet length
            max_read, max_write = msg.get_int64(), msg.get_int64()
            return max(SFTPFile.MAX_REQUEST_SIZE, min(max_read or 1 << 17, max_write or 1 << 17, 1 << 17))
    except (OSError, EOFError, paramiko.SSHException):
        pass  # not supported: stay with what the protocol guarantees
    return SFTPFile.MAX_REQUEST_SIZE


class SFTPStorage(Storage):
    scheme = "sftp"
    abilities = Abilities(random_write=True, set_mtime=True, posix_mode=True, ranged_read=True,
                          mutable_files=True)

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        self.host = location.host
        self.port = location.port or 22
        self.user = location.user or getpass.getuser()
        self._password = location.password
        # read now: connecting is lazy and the environment may differ by then
        self._key_path = os.environ.get("SSH_PRIVATE_KEY_PATH") or None
        self._known_hosts = os.environ.get("SSH_KNOWN_HOSTS") or os.path.expanduser("~/.ssh/known_hosts")
        path = location.path
        if path == "~" or path.startswith("~/"):  # servers resolve relative paths from the home dir
            path = path[2:]
        self.root = posixpath.normpath(path or ".")
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._clients: dict[paramiko.SFTPClient, _Conn] = {}  # every open channel, by connection
        self._owners: dict[paramiko.SFTPClient, threading.Thread | None] = {}  # None: a writer's
        self._local = threading.local()
        self._root_real: str | None = None
        self._dirs_ok: set[str] = set()  # directories known to exist inside the root
        self._posix_rename = True

    # ---- connection -------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def can_reopen(self) -> bool:
        # a second login could stop at a password prompt of its own
        return bool(self._password or self._key_path or not sys.stdin.isatty())

    def _ssh_client(self) -> paramiko.SSHClient:
        ssh = paramiko.SSHClient()
        for known in ("/etc/ssh/ssh_known_hosts", self._known_hosts):
            with contextlib.suppress(OSError, paramiko.SSHException):
                ssh.load_system_host_keys(known)
        ssh.set_missing_host_key_policy(_KnownHostsPolicy(self._known_hosts, self.options.trust_new_hosts))
        return ssh

    def _connect(self) -> paramiko.SSHClient:
        ssh = self._ssh_client()
        t = self.options.connect_timeout
        common: dict[str, Any] = dict(
            hostname=self.host, port=self.port, username=self.user,
            timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t, transport_factory=_transport,
        )
        if self._password:
            how = "the password from the address"
            kwargs: dict[str, Any] = dict(password=self._password, allow_agent=False, look_for_keys=False)
        elif self._key_path:
            how = f"the key SSH_PRIVATE_KEY_PATH={self._key_path}"
            kwargs = dict(pkey=self._load_key(self._key_path), allow_agent=False, look_for_keys=False)
        else:
            how = "the SSH agent and ~/.ssh keys"
            kwargs = dict(allow_agent=True, look_for_keys=True)
        try:
            try:
                ssh.connect(**common, **kwargs)
            except paramiko.SSHException as e:
                if not _is_auth_failure(e) or self._password or self._key_path or not sys.stdin.isatty():
                    raise
                ssh.close()
                ssh = self._ssh_client()
                how = "the password typed"
                password = getpass.getpass(f"Password for {self._where()}: ")
                ssh.connect(**common, password=password, allow_agent=False, look_for_keys=False)
        except _UnknownHost as e:
            ssh.close()
            where = e.hostname if self.port == 22 else f"-p {self.port} {self.host}"
            raise StorageError(
                f"SFTP host {e.hostname} is not in {self._known_hosts}: its {e.key.get_name()} key is "
                f"{fingerprint(e.key)}. If that is the server's key (ask its admin, or run ssh-keygen -lf on "
                f"its host key), record it with --trust-new-hosts, or with: ssh-keyscan {where} >> {self._known_hosts}",
                code="UnknownHostKey",
            ) from None
        except paramiko.BadHostKeyException:
            ssh.close()
            raise StorageError(
                f"the host key of {self.host} differs from the one in known_hosts: refusing to connect. "
                f"If the server was reinstalled, remove the old key with: ssh-keygen -R {self.host}",
                code="HostKeyMismatch",
            ) from None
        except paramiko.SSHException as e:
            ssh.close()
            if _is_auth_failure(e):
                raise StorageError(
                    f"SFTP login as {self._where()} failed using {how}. Give a private key authorised on "
                    "the server with SSH_PRIVATE_KEY_PATH=/path/to/key, or a password in the address "
                    "as user:password@host:/path",
                    code="AccessDenied",
                ) from None
            raise StorageError(f"SSH connection to {self._where()} failed: {e}", code="ConnectionError",
                               retryable=True) from None
        except socket.gaierror as e:
            ssh.close()
            raise StorageError(f"cannot resolve SFTP host {self.host!r}: {e.strerror}",
                               code="UnknownHost", retryable=True) from None
        except (OSError, EOFError) as e:
            ssh.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            code = transport_code(e)
            raise StorageError(f"cannot connect to SFTP server {self.host}:{self.port}: {reason}",
                               code="ConnectTimeout" if code == "ReadTimeout" else code, retryable=True) from None
        transport = ssh.get_transport()
        if transport is not None:
            transport.set_keepalive(30)  # long single-file copies must not look idle to NAT boxes
        return ssh

    def _load_key(self, path: str) -> paramiko.PKey:
        def load(password: str | None) -> paramiko.PKey:
            if hasattr(paramiko.PKey, "from_path"):  # paramiko >= 3.2: any key type
                return paramiko.PKey.from_path(path, password)
            last: Exception = paramiko.SSHException("unknown key type")
            for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
                try:
                    return cls.from_private_key_file(path, password)
                except paramiko.PasswordRequiredException:
                    raise
                except (paramiko.SSHException, ValueError) as e:
                    last = e
            raise last

        try:
            try:
                return load(None)
            except paramiko.PasswordRequiredException:
                if not sys.stdin.isatty():
                    raise StorageError(
                        f"the SSH key {path} is protected by a passphrase and there is no terminal to ask "
                        "for it; use an unencrypted key or run interactively",
                        code="AccessDenied",
                    ) from None
                return load(getpass.getpass(f"Passphrase for {path}: "))
        except OSError as e:
            raise StorageError(f"cannot read SSH_PRIVATE_KEY_PATH={path}: {e.strerror or e}",
                               code="InvalidArgument") from None
        except (paramiko.SSHException, ValueError) as e:
            raise StorageError(f"SSH_PRIVATE_KEY_PATH={path} is not a private key paramiko can use: {e}",
                               code="InvalidArgument") from None

    def _sftp(self) -> paramiko.SFTPClient:
        """This thread's SFTP channel, (re)connecting when needed."""
        client: paramiko.SFTPClient | None = getattr(self._local, "client", None)
        if client is not None:
            conn = self._clients.get(client)
            if conn is not None and conn.alive():
                return client
            self._release_client(client)
        client = self._new_client()
        self._local.client = client
        return client

    def _new_client(self, owned: bool = True) -> paramiko.SFTPClient:
        """A new SFTP channel on a connection with room for it. OpenSSH allows MaxSessions
        (default 10) channels per connection, so more threads means more connections."""
        for _ in range(3):
            self._reap_finished_threads()
            with self._lock:  # one connect at a time: servers also limit unauthenticated ones
                for dead in [c for c in self._conns if not c.alive()]:
                    log.info("SFTP connection to %s was lost; reconnecting", self._where())
                    self._conns.remove(dead)
                    dead.ssh.close()
                conn = next((c for c in self._conns if c.channels < c.limit), None)
                if conn is None:
                    conn = _Conn(self._connect())
                    self._conns.append(conn)
                conn.channels += 1
            try:
                client = conn.ssh.open_sftp()
            except paramiko.ChannelException:
                with self._lock:  # the server allows fewer channels than we assumed
                    conn.channels -= 1
                    conn.limit = max(1, conn.channels)
                continue
            except _CONNECTION_ERRORS as e:
                with self._lock:
                    conn.channels -= 1
                raise StorageError(f"cannot open an SFTP channel to {self._where()}: {e}",
                                   code="ConnectionError", retryable=True) from None
            client.get_channel().settimeout(self.options.read_timeout)
            if conn.request_size is None:
                conn.request_size = _request_size(client)
            with self._lock:
                self._clients[client] = conn
                self._owners[client] = threading.current_thread() if owned else None
            return client
        raise StorageError(f"{self._where()} refuses to open SFTP channels (check MaxSessions and the "
                           "sftp Subsystem in its sshd_config)", code="ConnectionError", retryable=True)

    def _file(self, client: paramiko.SFTPClient, path: str, mode: str) -> SFTPFile:
        f = client.open(path, mode)
        conn = self._clients.get(client)
        if conn is not None and conn.request_size:
            f.MAX_REQUEST_SIZE = conn.request_size  # type: ignore[misc]
        return f

    def _release_client(self, client: paramiko.SFTPClient) -> None:
        with self._lock:
            conn = self._clients.pop(client, None)
            self._owners.pop(client, None)
            if conn is not None:
                conn.channels -= 1
        with contextlib.suppress(Exception):
            client.close()

    def _reap_finished_threads(self) -> None:
        """Close the channels of threads that have ended (a thread-local is never told)."""
        with self._lock:
            orphans = [c for c, t in self._owners.items() if t is not None and not t.is_alive()]
        for client in orphans:
            self._release_client(client)

    def _drop_thread_client(self) -> None:
        """After a timeout the channel may still owe us replies: never reuse it."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            self._release_client(client)

    @contextlib.contextmanager
    def _errors(self, action: str, path: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except _CONNECTION_ERRORS as e:
            self._drop_thread_client()
            raise StorageError(f"SFTP {action} {path} on {self.host}: {type(e).__name__}: {e}",
                               code="ConnectionError", retryable=True) from None
        except OSError as e:
            raise _io_error(e, f"SFTP {action} {path} on {self.host}") from None

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients), {}
            self._owners.clear()
            conns, self._conns = self._conns, []
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
        for conn in conns:
            conn.ssh.close()

    # ---- paths ------------------------------------------------------------------------------
    def _path(self, key: str, new: bool = True) -> str:
        """The server path of `key`: the path rules of a name to be created, or of one that exists
        (a name the server listed, which may hold a backslash)."""
        return posixpath.join(self.root, check_key(key) if new else check_relative(key))

    def check_name(self, key: str) -> None:
        check_utf8(check_key(key))  # paramiko sends names as UTF-8

    def _ensure_root(self, sftp: paramiko.SFTPClient) -> str:
        if self._root_real is None:
            with self._errors("create", self.root):
                parts = self.root.split("/")
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d in ("", ".", ".."):
                        continue
                    try:
                        sftp.stat(d)
                    except OSError as e:
                        if e.errno != errno.ENOENT:
                            raise
                        with contextlib.suppress(OSError):  # another thread may win the race
                            sftp.mkdir(d)
                self._root_real = sftp.normalize(self.root)
        return self._root_real

    def _inside(self, real: str) -> bool:
        root = cast(str, self._root_real)
        return real == root or real.startswith(root.rstrip("/") + "/")

    def _ensure_dir(self, sftp: paramiko.SFTPClient, d: str, key: str, create: bool = True) -> bool:
        """Make sure directory `d` exists inside the root (mkdir -p). False when it is missing
        and `create` is false. Refuses directories that resolve outside the root."""
        if d in self._dirs_ok:
            return True
        root_real = self._ensure_root(sftp) if create else self._root_real_or_none(sftp)
        if root_real is None:
            return False
        if d == self.root:
            self._dirs_ok.add(d)
            return True
        with self._errors("create directory", d):
            try:
                st = sftp.stat(d)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                if not create or not self._ensure_dir(sftp, posixpath.dirname(d), key, create):
                    return False
                try:
                    sftp.mkdir(d)
                except OSError as mkdir_error:
                    try:
                        st = sftp.stat(d)  # made by another thread, or a real conflict
                    except OSError:
                        raise mkdir_error from None
                    if not stat.S_ISDIR(st.st_mode or 0):
                        raise self._conflict(d, key) from None
                else:
                    # a new directory inside a verified one is inside the root
                    self._remember_dir(d)
                    return True
            if not stat.S_ISDIR(st.st_mode or 0):
                raise self._conflict(d, key)
            real = sftp.normalize(d)
        if not self._inside(real):
            raise UnsafeKey(
                f"key {key!r}: directory {d} resolves to {real} on {self.host}, outside the root "
                f"{self._root_real} (a symlinked directory in the destination?)"
            )
        self._remember_dir(d)
        return True

    def _root_real_or_none(self, sftp: paramiko.SFTPClient) -> str | None:
        if self._root_real is None:
            with self._errors("resolve", self.root):
                try:
                    self._root_real = sftp.normalize(self.root)
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        return None
                    raise
        return self._root_real

    def _remember_dir(self, d: str) -> None:
        if len(self._dirs_ok) > 100_000:  # bounded: a cache, not a listing
            self._dirs_ok.clear()
        self._dirs_ok.add(d)

    def _forget_dir(self, d: str) -> None:
        self._dirs_ok.discard(d)

    def _conflict(self, d: str, key: str) -> StorageError:
        return StorageError(f"cannot write {key}: {d} is a file on {self.host}, but a directory is needed there",
                            code="PathConflict")

    # ---- listing ----------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        sftp = self._sftp()
        with self._errors("list", self.root):
            try:
                root_real = sftp.normalize(self.root)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            if not stat.S_ISDIR(sftp.stat(root_real).st_mode or 0):
                raise StorageError(f"{self.root} on {self.host} is not a directory", code="PathConflict")
        yield from sorted_walk(
            self._scan, self._entry, prefix=prefix, start_after=start_after,
            root_ident=root_real, on_skip=self._skipped, plain=_fields,
        )

    def _scan(self, dir_key: str, ident: Hashable | None) -> Iterator[Node]:
        """One directory's nodes, read one READDIR reply at a time (a directory of millions is never
        held whole here: `sorted_walk` sorts it in bounded memory)."""
        # idents are server-side real paths: unique per directory, and what we list
        path = cast(str, ident)
        sftp = self._sftp()
        batches = _read_dir(sftp, path)
        try:
            while True:
                with self._errors("list", path):
                    try:
                        attrs = next(batches, None)
                    except OSError as e:
                        if e.errno == errno.ENOENT:
                            return
                        if not dir_key or isinstance(e, _CONNECTION_ERRORS):
                            raise
                        self._list_error(f"{self.host}:{path}: {e.strerror or e}")
                        return
                if attrs is None:
                    return
                for a in attrs:
                    node = self._node(sftp, a, path, dir_key)
                    if node is not None:
                        yield node
        finally:
            batches.close()  # the directory handle, when the walk stops early

    def _node(self, sftp: paramiko.SFTPClient, a: paramiko.SFTPAttributes, path: str, dir_key: str) -> Node | None:
        name = a.filename
        if is_temp_name(name):
            self._old_temp(dir_key + name, float(a.st_mtime or 0))
            return None
        mode = a.st_mode or 0
        child = f"{path.rstrip('/')}/{name}"
        if stat.S_ISLNK(mode):
            if not self.options.follow_symlinks:
                return Node(name, "skip", ref="symlink not followed")
            with self._errors("stat", child):
                try:
                    target = sftp.stat(child)
                except OSError as e:
                    if isinstance(e, _CONNECTION_ERRORS):
                        raise
                    return Node(name, "skip", ref=f"broken symlink ({e.strerror or e})")
                tmode = target.st_mode or 0
                if stat.S_ISDIR(tmode):
                    return Node(name, "dir", sftp.normalize(child))
                if stat.S_ISREG(tmode):
                    return Node(name, "file", ref=target)
        elif stat.S_ISDIR(mode):
            return Node(name, "dir", child)
        elif stat.S_ISREG(mode):
            return Node(name, "file", ref=a)
        return None

    def _entry(self, key: str, node: Node) -> Entry:
        ref = node.ref  # the attributes, or `_fields` of them from a directory sorted on disk
        return fields_entry(key, ref if isinstance(ref, tuple) else _fields(ref))

    # ---- single objects ---------------------------------------------------------------------
    def head(self, key: str) -> Entry:
        path = self._path(key, new=False)
        sftp = self._sftp()
        with self._errors("stat", path):
            a = sftp.stat(path)
        if not stat.S_ISREG(a.st_mode or 0):
            raise NotFound(f"{path} on {self.host} is not a regular file")
        return _to_entry(key, a)

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        path = self._path(key, new=False)
        sftp = self._sftp()
        with self._errors("open", path):
            f = self._file(sftp, path, "rb")
            try:
                if end is None:
                    a = f.stat()
                    if not stat.S_ISREG(a.st_mode or 0):
                        raise NotFound(f"{path} on {self.host} is not a regular file")
                    end = a.st_size or 0
            except BaseException:
                f.close()
                raise
        return cast(BinaryIO, _Reader(self, f, path, start, max(start, end)))

    def put(
        self, key: str, data: BinaryIO, size: int, *, mtime: float | None = None, mode: int | None = None,
        content_md5: str | None = None,
    ) -> Entry:
        path = self._path(key)
        sftp = self._sftp()
        parent, name = posixpath.split(path)
        tmp = posixpath.join(parent, temp_name(name))
        keep_mode = mode is not None and self.options.keep_perms
        for attempt in range(2):
            self._ensure_dir(sftp, parent, key)
            try:
                with self._errors("create", tmp):
                    f = self._file(sftp, tmp, "wbx")
                break
            except NotFound:
                # a concurrent delete() removed the (cached) parent: make it again, once
                self._forget_dir(parent)
                if attempt:
                    raise
        try:
            with self._errors("write", tmp):
                with f:
                    f.set_pipelined(True)
                    read_exact(data, size, f.write, key)
                    f.flush()
                    _wait_for_writes(f)
                    if keep_mode:
                        f.chmod(cast(int, mode) & 0o7777)
                    if mtime is not None:
                        f.utime((mtime, mtime))
                self._rename(sftp, tmp, path, key)
        except BaseException:
            self._remove_quietly(sftp, tmp)
            raise
        return Entry(key, size, float(mtime) if mtime is not None else time.time(),
                     mode=cast(int, mode) & 0o7777 if keep_mode else None)

    def _rename(self, sftp: paramiko.SFTPClient, tmp: str, path: str, key: str) -> None:
        if self._posix_rename:
            try:
                sftp.posix_rename(tmp, path)
                return
            except OSError as e:
                if e.errno is not None:
                    raise
                # SSH_FX_FAILURE / OP_UNSUPPORTED: a directory in the way, or no extension
                if self._is_dir(sftp, path):
                    raise self._dir_in_the_way(path, key) from None
                if "unsupported" in str(e).lower():
                    self._posix_rename = False
                else:
                    raise
        # plain SFTP rename refuses to replace: not atomic, but the best the server offers
        if self._is_dir(sftp, path):
            raise self._dir_in_the_way(path, key)
        with contextlib.suppress(FileNotFoundError):
            sftp.remove(path)
        sftp.rename(tmp, path)

    def _is_dir(self, sftp: paramiko.SFTPClient, path: str) -> bool:
        try:
            return stat.S_ISDIR(sftp.lstat(path).st_mode or 0)
        except OSError:
            return False

    def _dir_in_the_way(self, path: str, key: str) -> StorageError:
        return StorageError(f"cannot write {key}: {path} is a directory on {self.host}", code="PathConflict")

    def _remove_quietly(self, sftp: paramiko.SFTPClient, path: str) -> None:
        with contextlib.suppress(Exception):
            sftp.remove(path)

    def list_dirs(self, prefix: str = "") -> list[str]:
        sftp = self._sftp()
        path = posixpath.join(self.root, prefix)
        with self._errors("list", path):
            try:  # read as it comes: only the subdirectories are kept, however many files there are
                names = [a.filename for a in _listdir(sftp, path)
                         if a.st_mode is not None and stat.S_ISDIR(a.st_mode) and not is_temp_name(a.filename)]
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return []
                raise
        return sorted((f"{prefix}{n}/" for n in names), key=lambda k: k.encode("utf-8", "surrogateescape"))

    def remove_stale_temps(self, keys: list[str], older_than: float | None = None) -> int:
        sftp = self._sftp()

        def listdir(d: str) -> list[tuple[str, float]]:
            try:
                return [(a.filename, float(a.st_mtime or 0)) for a in _listdir(sftp, posixpath.join(self.root, d))
                        if is_temp_name(a.filename)]  # only temps: a flat directory may hold millions
            except OSError:
                return []

        removed = 0
        for rel in stale_temps(keys, listdir, older_than):
            with contextlib.suppress(OSError):
                sftp.remove(posixpath.join(self.root, rel))
                removed += 1
        return removed

    def delete(self, key: str) -> None:
        path = self._path(key, new=False)
        sftp = self._sftp()
        parent = posixpath.dirname(path)
        if not self._ensure_dir(sftp, parent, key, create=False):
            return  # its directory does not exist: nothing to delete
        with self._errors("delete", path):
            try:
                sftp.remove(path)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                if e.errno is None and self._is_dir(sftp, path):
                    raise StorageError(f"cannot delete {path} on {self.host}: it is a directory",
                                       code="PathConflict") from None
                raise
        # remove directories the deletion left empty, as an object store would show them
        while parent != self.root and parent.startswith(self.root.rstrip("/") + "/"):
            try:
                sftp.rmdir(parent)
            except OSError:
                break
            except _CONNECTION_ERRORS:
                self._drop_thread_client()
                break
            self._forget_dir(parent)
            parent = posixpath.dirname(parent)

    def open_writer(self, key: str, size: int) -> Writer:
        path = self._path(key)
        sftp = self._sftp()
        parent, name = posixpath.split(path)
        self._ensure_dir(sftp, parent, key)
        tmp = posixpath.join(parent, temp_name(name))
        # the writer's own channel: write_at comes from any thread, so it needs one it can lock
        client = self._new_client(owned=False)
        try:
            with self._errors("create", tmp):
                f = self._file(client, tmp, "wbx")
                f.truncate(size)
                f.set_pipelined(True)
        except BaseException:
            self._release_client(client)
            raise
        return _SFTPWriter(self, client, f, key, path, tmp, size)


class _SFTPWriter(Writer):
    """Ranged writes into one remote temp file over a private channel; renamed on commit."""

    def __init__(self, storage: SFTPStorage, client: paramiko.SFTPClient, f: paramiko.SFTPFile,
                 key: str, path: str, tmp: str, size: int) -> None:
        self._st, self._client, self._f = storage, client, f
        self._key, self._path, self._tmp, self._size = key, path, tmp, size
        self._lock = threading.Lock()
        self._done = False

    def write_at(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self._size:
            raise StorageError(f"{self._key}: write of {len(data)} bytes at {offset} exceeds the size {self._size}",
                               code="InvalidRange")
        with self._lock:
            if self._done:
                raise StorageError(f"{self._key}: write after commit or abort", code="InvalidState")
            with self._st._errors("write", self._tmp):
                self._f.seek(offset)
                self._f.write(data)

    def commit(self, mtime: float | None = None, mode: int | None = None) -> None:
        with self._lock:
            if self._done:
                raise StorageError(f"{self._key}: commit after commit or abort", code="InvalidState")
            self._done = True
            try:
                with self._st._errors("write", self._tmp):
                    self._f.flush()
                    _wait_for_writes(self._f)
                    if mode is not None and self._st.options.keep_perms:
                        self._f.chmod(mode & 0o7777)
                    if mtime is not None:
                        self._f.utime((mtime, mtime))
                    self._f.close()
                    self._st._rename(self._client, self._tmp, self._path, self._key)
            except BaseException:
                self._st._remove_quietly(self._client, self._tmp)
                raise
            finally:
                self._st._release_client(self._client)

    def abort(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            with contextlib.suppress(Exception):
                self._f.close()
            self._st._remove_quietly(self._client, self._tmp)
            self._st._release_client(self._client)


def _wait_for_writes(f: paramiko.SFTPFile) -> None:
    """Collect the replies of pipelined writes. paramiko drops replies that another request reads
    first, so a failed write (disk full, quota) would go unnoticed once we send fsetstat/close."""
    reqs = getattr(f, "_reqs", None)
    expecting = getattr(f.sftp, "_expecting", {})
    while reqs:
        req = reqs.popleft()
        if req in expecting:  # else another reader on this channel already took (and dropped) it
            f.sftp._read_response(req)


class _Reader(io.RawIOBase):
    """Bytes [start, end) of a remote file with up to DEPTH read requests in flight.

    paramiko's prefetch() buffers without bound and leaves its request thread spinning when a
    reader is closed early, so this keeps its own small pipeline: it registers itself as the
    receiver of its requests' replies (paramiko's `_async_request` protocol, the one SFTPFile
    uses) and reads them in order. No extra thread; memory is at most DEPTH * 32 KiB (2 MiB)."""

    DEPTH = 64

    def __init__(self, st: SFTPStorage, f: paramiko.SFTPFile, path: str, start: int, end: int) -> None:
        super().__init__()
        self._st, self._f, self._path = st, f, path
        self._sftp = f.sftp
        self._next, self._end = start, end
        self._size = f.MAX_REQUEST_SIZE  # 32 KiB, or more where the server said it takes more
        self._depth = max(16, self.DEPTH * REQUEST // self._size)  # the same bytes in flight
        self._pending: deque[tuple[int, int, int]] = deque()  # (request number, offset, length)
        self._replies: dict[int, tuple[int, paramiko.Message]] = {}
        self._buf = memoryview(b"")
        self._eof = start >= end

    def readable(self) -> bool:
        return True

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        # called by paramiko (in this thread) for each reply to one of our requests
        self._replies[num] = (t, msg)

    def _send(self, offset: int, length: int) -> None:
        num = self._sftp._async_request(self, CMD_READ, self._f.handle, int64(offset), int(length))
        self._pending.append((num, offset, length))

    def _fill(self) -> bool:
        """Load the next block into the buffer; False at the end."""
        with self._st._errors("read", self._path):
            while not self._eof:
                while len(self._pending) < self._depth and self._next < self._end:
                    n = min(self._size, self._end - self._next)
                    self._send(self._next, n)
                    self._next += n
                if not self._pending:
                    break
                num, offset, length = self._pending[0]
                while num not in self._replies:
                    self._sftp._read_response()
                self._pending.popleft()
                t, msg = self._replies.pop(num)
                if t == CMD_STATUS:
                    try:
                        self._sftp._convert_status(msg)
                    except EOFError:
                        break  # read past the end: the file shrank, the caller checks sizes
                    raise paramiko.SFTPError("expected data in reply to a read")
                if t != CMD_DATA:
                    raise paramiko.SFTPError("expected data in reply to a read")
                data = msg.get_string()
                if not data:
                    break
                if len(data) < length:
                    # servers may answer short: ask for the rest next, keeping the order
                    self._resend_gap(offset + len(data), length - len(data))
                self._buf = memoryview(data)
                return True
        self._eof = True
        return False

    def _resend_gap(self, offset: int, length: int) -> None:
        num = self._sftp._async_request(self, CMD_READ, self._f.handle, int64(offset), int(length))
        self._pending.appendleft((num, offset, length))

    def read(self, n: int | None = -1) -> bytes:
        want = sys.maxsize if n is None or n < 0 else n
        out: list[bytes] = []
        while want > 0 and (self._buf or self._fill()):
            take = self._buf[:want]
            out.append(bytes(take))
            self._buf = self._buf[len(take):]
            want -= len(take)
        return b"".join(out)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            # closing the handle reads (and drops) the replies still on their way
            with contextlib.suppress(Exception):
                self._f.close()
            self._pending.clear()
            self._replies.clear()
        super().close()


def _fields(a: paramiko.SFTPAttributes) -> FileFields:
    """What a listing keeps of a file's attributes: plain data, so a directory can be sorted on disk
    without a stat round trip per file afterwards."""
    mode = a.st_mode
    return (a.st_size or 0, float(a.st_mtime or 0), stat.S_IMODE(mode) if mode is not None else None)


def _to_entry(key: str, a: paramiko.SFTPAttributes) -> Entry:
    return fields_entry(key, _fields(a))


def _listdir(sftp: paramiko.SFTPClient, path: str) -> Iterator[paramiko.SFTPAttributes]:
    """`_read_dir`'s entries one at a time."""
    with contextlib.closing(_read_dir(sftp, path)) as batches:
        for attrs in batches:
            yield from attrs


def _read_dir(sftp: paramiko.SFTPClient, path: str) -> Generator[list[paramiko.SFTPAttributes], None, None]:
    """The entries of the directory `path` but "." and "..", one READDIR reply (up to ~100 names)
    at a time: what paramiko's listdir_attr does, without collecting them all (its listdir_iter
    leaves read-ahead replies unread when stopped early). The handle is closed when done, stopped,
    or failed."""
    t, msg = sftp._request(CMD_OPENDIR, sftp._adjust_cwd(path))
    if t != CMD_HANDLE:
        raise paramiko.SFTPError("expected a handle in reply to opendir")
    handle = msg.get_binary()
    try:
        while True:
            try:
                t, msg = sftp._request(CMD_READDIR, handle)
            except EOFError:  # the end of the directory
                return
            if t != CMD_NAME:
                raise paramiko.SFTPError("expected names in reply to readdir")
            attrs = [paramiko.SFTPAttributes._from_msg(msg, msg.get_text(), msg.get_text())
                     for _ in range(msg.get_int())]
            yield [a for a in attrs if a.filename not in (".", "..")]
    finally:
        with contextlib.suppress(Exception):  # a broken connection has no handle left to close
            sftp._request(CMD_CLOSE, handle)


def _is_auth_failure(e: Exception) -> bool:
    if isinstance(e, paramiko.AuthenticationException):
        return True
    # raised when no key and no password could even be tried
    return "authentication" in str(e).lower()


def _io_error(e: OSError, what: str) -> StorageError:
    reason = e.strerror or str(e) or type(e).__name__
    msg = f"{what}: {reason}"
    if e.errno == errno.ENOENT:
        return NotFound(msg)
    if e.errno == errno.EACCES:
        return StorageError(msg, code="AccessDenied")
    return StorageError(msg, code="SFTPFailure")
