"""A small OpenAI-compatible chat server over our sampler (`alm serve`): POST /v1/chat/completions, GET /v1/models.

    server = ChatServer(ResponseGenerator("models/smollm2", batch_size=8), host="127.0.0.1", port=8000)
    server.start(); ...; server.stop()

Requests that arrive together are answered in one batch (up to the generator's `batch_size`; a worker
thread drains the queue), so concurrent clients share the compiled decode. A request's `max_tokens`,
`temperature`, `top_p`, `seed` and `stop` are honoured; requests are batched only with requests of the
same temperature / top_p / stop. `seed` is the sampler's row id, so a (seed, prompt) pair gets the same
answer whatever it is batched with. Responses follow the OpenAI chat-completion layout (`choices[0].message.content`,
`finish_reason` "stop" | "length", `usage`); `max_tokens` is a per-row limit inside the batch. It listens on loopback by default: it has no authentication.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from alm_jax.errors import AlmError, ConfigError


@dataclasses.dataclass(frozen=True)
class _Settings:
    temperature: float
    top_p: float
    stop: tuple[str, ...]


class ChatServer:
    """Serves `generator` (an `engine.ResponseGenerator`) on `host:port` (port 0 = any free port)."""

    def __init__(self, generator, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None):
        self.generator = generator
        self.model_name = model_name or generator.name
        self._queue: queue.Queue = queue.Queue()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    return self._reply(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                self._reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    self._reply(200, server.complete(body))
                except (ValueError, KeyError, TypeError, AlmError) as e:
                    self._reply(400, {"error": {"message": str(e), "type": "invalid_request_error"}})

        self._http = ThreadingHTTPServer((host, port), Handler)
        self.host, self.port = self._http.server_address[:2]
        self._threads: list[threading.Thread] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ChatServer":
        self.generator.load()
        for target in (self._http.serve_forever, self._work):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._queue.put(None)

    # ---- requests

    def complete(self, body: dict) -> dict:
        """One chat-completion request -> the OpenAI response dict (blocks until its batch is done)."""
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError("messages must be a non-empty list of {role, content}")
        stop = body.get("stop") or ()
        settings = _Settings(temperature=float(body.get("temperature", 0.0) or 0.0),
                             top_p=float(body.get("top_p", 1.0) or 1.0),
                             stop=(stop,) if isinstance(stop, str) else tuple(stop))
        max_tokens = int(body.get("max_tokens") or self.generator.max_new_tokens)
        if not 1 <= max_tokens <= self.generator.max_new_tokens:
            raise ConfigError(f"max_tokens={max_tokens} must be in [1, {self.generator.max_new_tokens}] (this "
                              "server's limit: alm serve --max-new-tokens)")
        ids = self.generator.prompt_ids(messages)
        if len(ids) > self.generator.max_prompt_tokens:
            raise ConfigError(f"the prompt has {len(ids)} tokens, over this server's max_prompt_tokens "
                              f"{self.generator.max_prompt_tokens}")
        done: Future = Future()
        seed = int(body.get("seed", 0) or 0)   # the row id of the sampler: same seed + prompt -> same answer
        self._queue.put((settings, ids, max_tokens, seed, done))
        response = done.result()
        finish = "stop" if response.finished else "length"
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": response.text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": response.n_tokens,
                          "total_tokens": len(ids) + response.n_tokens}}

    def _work(self) -> None:
        """Drain the queue: every request waiting now (up to batch_size, same settings) in one batch."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, rest = [first], []
            while len(batch) < self.generator.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    rest.append(nxt)
                    break
                (batch if nxt[0] == first[0] else rest).append(nxt)
            for item in rest:
                self._queue.put(item)
            s = first[0]
            try:
                self.generator.sampling = dataclasses.replace(self.generator.sampling, temperature=s.temperature,
                                                              top_p=s.top_p)
                self.generator.stop_strings = s.stop
                responses = self.generator.generate([b[1] for b in batch], max_new=[b[2] for b in batch],
                                                    row_ids=[b[3] for b in batch])
                for (*_, fut), r in zip(batch, responses):
                    fut.set_result(r)
            except Exception as e:  # noqa: BLE001 - the error goes back to the waiting request
                for *_, fut in batch:
                    fut.set_exception(e)
