"""An HTTP listener on a free local port that records every request it gets and answers each with
a JSON Schema: a test points a schema's reference at it to prove that nothing ever asks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What a retrieval would bring back: if this text shows up in a verdict, the schema reached out.
LEAKED = "leaked-from-the-listener"


@dataclass
class Listener:
    url: str
    requests: list[str] = field(default_factory=list)


@contextmanager
def listening() -> Iterator[Listener]:
    listener = Listener(url="")

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            listener.requests.append(f"GET {self.path}")
            body = json.dumps({"type": "object", "required": [LEAKED], "$anchor": "meta",
                               "$dynamicAnchor": "meta"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/schema+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    listener.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, name="listener", daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
