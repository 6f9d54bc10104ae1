"""Start a real `ouzel serve` subprocess on a free loopback port and wait until it answers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ouzel", "serve", "--port", str(self.port), "--threads", "2", *args]
        self.log = open(log_path or os.devnull, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in 120 s")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {k: float(v) for k, v in (ln.split() for ln in text.splitlines() if ln and not ln.startswith("#"))}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def openai_client(s, timeout: float = 120):
    """The official client on server s (no retries: a test sees every failure)."""
    import openai  # noqa: PLC0415
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=timeout)


def stream_mid_reply(s, model: str, prompt, ready) -> list:
    """Start a greedy streamed completion that will not end soon (EOS ignored), read its first 3
    chunks, then wait up to 5 s for ready() (what a background thread writes); returns the chunks.
    The request is still generating when this returns (checked)."""
    stream = openai_client(s).completions.create(model=model, prompt=prompt, max_tokens=400, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
    chunks = [c for _, c in zip(range(3), stream)]
    assert all(c.choices[0].finish_reason is None for c in chunks)
    for _ in range(100):
        if ready():
            break
        time.sleep(0.05)
    assert s.metrics()["ouzel_requests_running"] == 1  # still generating
    return chunks
