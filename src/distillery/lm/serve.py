"""Serve a local causal LM as an OpenAI-compatible ``/v1/completions`` endpoint.

``distillery lm serve runs/lm/teacher --port 8000`` lets any data-level method (or any other
tool) use a local teacher through ``teacher: {endpoint: {url: http://127.0.0.1:8000/v1, model: teacher}}``,
the same way it would use vLLM or a hosted API.  The tests use it as the stub server the
:class:`~distillery.lm.textgen.EndpointGenerator` is checked against.  It binds 127.0.0.1 unless
told otherwise; requests are served one at a time (one model, one lock).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from distillery.lm.textgen import HFGenerator


def make_server(generator: HFGenerator, *, model_name: str = "teacher", host: str = "127.0.0.1",
                port: int = 0, max_tokens_limit: int = 1024) -> ThreadingHTTPServer:
    """A server (not yet serving; call ``serve_forever``); ``port=0`` picks a free port
    (read it from ``server.server_address[1]``)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the caller has its own progress
            pass

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._error(404, f"unknown path {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/completions":
                return self._error(404, f"unknown path {self.path}: this server implements /v1/completions")
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except json.JSONDecodeError:
                return self._error(400, "the request body is not JSON")
            prompt = request.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                return self._error(400, "`prompt` must be a string or a non-empty list of strings")
            if request.get("model") not in (None, model_name):
                return self._error(404, f"model {request.get('model')!r} is not served here (this is {model_name!r})")
            max_tokens = request.get("max_tokens", 16)
            n = request.get("n", 1)
            temperature = request.get("temperature", 1.0)
            if not (isinstance(max_tokens, int) and 0 < max_tokens <= max_tokens_limit and isinstance(n, int) and n > 0
                    and isinstance(temperature, (int, float)) and temperature >= 0):
                return self._error(400, f"max_tokens must be in 1..{max_tokens_limit}, n >= 1, temperature >= 0")
            stop = request.get("stop")
            stop = [stop] if isinstance(stop, str) else stop
            try:
                with lock:
                    texts = generator.complete(prompts, max_new_tokens=max_tokens, temperature=float(temperature),
                                               top_p=float(request.get("top_p", 1.0)), n=n, stop=stop,
                                               seed=request.get("seed"))
            except Exception as err:  # noqa: BLE001 -- reported to the client, the server keeps serving
                return self._error(400, str(err))
            choices = [{"index": i * n + j, "text": t, "finish_reason": "length"}
                       for i, row in enumerate(texts) for j, t in enumerate(row)]
            self._send(200, {"object": "text_completion", "model": model_name, "choices": choices})

    return ThreadingHTTPServer((host, port), Handler)


class running_server:
    """``with running_server(generator) as url:`` -- a server on a free local port, in a thread."""

    def __init__(self, generator: HFGenerator, model_name: str = "teacher"):
        self.server = make_server(generator, model_name=model_name)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
