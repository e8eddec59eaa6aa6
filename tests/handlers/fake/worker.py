"""A fake kameo worker: speaks (or mangles) the handshake by hand.

Run as the pool's ``python`` (tests write it to a temporary executable with a ``#!`` line); it
ignores its argv (``-m kameo._worker``) and does not import kameo. ``FAKE_MODE`` selects what it
sends on the socket inherited as ``KAMEO_FD``; ``FAKE_LOG`` (if set) gets one line per start, so
a test can prove the fake, not a real worker, ran. Afterwards it stays connected (the pool has to
decide from the bytes alone, not from an exit) until the parent refuses it (it prints the reason
to stderr and exits 2, like a real worker) or hangs up.
"""

import os
import select
import struct
import sys
import time

MAGIC = b"KAMEO\0"
HELLO, REJECT = 1, 3


def frame(kind: int, body: bytes, fid: int = 0, flags: int = 0) -> bytes:
    return struct.pack("<IBBQ", 10 + len(body), kind, flags, fid) + body


def hello_body(version: int, worker_id: int, pid: int, secret: bytes) -> bytes:
    return MAGIC + struct.pack("<HII", version, worker_id, pid) + bytes([len(secret)]) + secret


def _current_version() -> int:
    from kameo import PROTOCOL_VERSION  # only the constant: the fake speaks the wire itself

    return PROTOCOL_VERSION


def main() -> None:
    fd = int(os.environ["KAMEO_FD"])
    worker_id = int(os.environ["KAMEO_WORKER_ID"])
    secret_fd = int(os.environ["KAMEO_SECRET_FD"])
    secret = os.read(secret_fd, 256)
    os.close(secret_fd)
    mode = os.environ.get("FAKE_MODE", "")
    version = int(os.environ.get("FAKE_VERSION", "0")) or _current_version()
    log = os.environ.get("FAKE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {mode}\n")
    pid = os.getpid()

    if mode == "garbage_text":
        out = b"GET / HTTP/1.1\r\nHost: kameo\r\n\r\n"
    elif mode == "garbage_short":
        out = b"\x02\x00\x00\x00zz-not-a-frame"
    elif mode == "garbage_flags":
        out = frame(HELLO, hello_body(version, worker_id, pid, secret), flags=0x80)
    elif mode == "bad_magic":
        out = frame(HELLO, b"HTTP/1.1 200 OK\r\n\r\n")
    elif mode == "wrong_secret":
        out = frame(HELLO, hello_body(version, worker_id, pid, os.urandom(len(secret))))
    elif mode == "short_secret":
        out = frame(HELLO, hello_body(version, worker_id, pid, secret[:-1]))
    elif mode == "wrong_version":
        out = frame(HELLO, hello_body(99, worker_id, pid, secret))
    elif mode == "wrong_worker_id":
        out = frame(HELLO, hello_body(version, worker_id + 1000, pid, secret))
    elif mode == "wrong_pid":
        out = frame(HELLO, hello_body(version, worker_id, os.getppid(), secret))
    elif mode == "truncated_hello":
        out = frame(HELLO, hello_body(version, worker_id, pid, secret)[:12])
    elif mode == "good_hello_then_silence":
        out = frame(HELLO, hello_body(version, worker_id, pid, secret))
    elif mode == "silent":
        out = b""
    elif mode == "exit_early":
        print("fake worker: giving up before the handshake", file=sys.stderr, flush=True)
        os._exit(4)
    else:
        print(f"fake worker: unknown FAKE_MODE {mode!r}", file=sys.stderr, flush=True)
        os._exit(5)

    if out:
        os.write(fd, out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                os._exit(0)
            if len(data) >= 14 and data[4] == REJECT:
                # like a real worker: say why, then leave
                reason = data[14:].decode(errors="replace")
                print(f"fake worker: rejected: {reason}", file=sys.stderr, flush=True)
                os._exit(2)
            print(f"fake worker: got {len(data)} bytes", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
