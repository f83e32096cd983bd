"""A server over the demo model in a thread of the test process (uvicorn on a free port)."""

import socket
import threading
import time

import pytest

import edge_moe
from edge_moe.api import DEMO_MODEL


class Running:
    """A uvicorn server in a thread; `url` is its /v1 base."""

    def __init__(self, model, **app_kwargs):
        import uvicorn

        from edge_moe.server import build_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.url = model, f"http://127.0.0.1:{self.port}/v1"
        self.app = build_app(model, "demo", **app_kwargs)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    if not DEMO_MODEL.is_file():
        pytest.skip("demo model not built into the package")
    model = edge_moe.load(max_batch=4, max_queue=4)
    running = Running(model)
    yield running
    running.stop()
    model.close()
