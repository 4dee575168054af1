"""Serve a local folder over real HTTP on loopback, for the demo and for tests."""
from __future__ import annotations

import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the pipeline's output readable
        pass


@contextlib.contextmanager
def serve_folder(folder: str | Path) -> Iterator[str]:
    """Serve folder on 127.0.0.1 at a free port; yields the base URL (no trailing slash).

    Files are sent as the standard library guesses their type: HTML as plain
    `text/html` with no charset, so pages must declare their encoding themselves.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"crawl.serve_dir {folder} is not a folder")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="forja-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
