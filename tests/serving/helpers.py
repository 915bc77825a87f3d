"""What the server tests share: a free port, the app served by uvicorn in a thread, a plain HTTP client.

The client is the standard library's (urllib), with the multipart body written out here, so the
tests check the server against an HTTP client that shares no code with it.
"""
from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as url:``: the app served by uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        # log_config=None: uvicorn leaves logging alone; its dictConfig would close handlers that
        # libraries (torch.fx, via an OpenVINO import) bound to pytest's captured stderr
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def get(url: str) -> Answer:
    return send(urllib.request.Request(url))


def post_file(url: str, data: bytes, filename: str = "photo.png", field: str = "image",
              content_type: str = "application/octet-stream") -> Answer:
    """POSTs one file as multipart/form-data, as a browser's form or ``curl -F`` sends it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return send(request)


def send(request: urllib.request.Request) -> Answer:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(seed: int = 0, size: tuple[int, int] = (64, 96)) -> np.ndarray:
    """A random RGB photo (H, W, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
