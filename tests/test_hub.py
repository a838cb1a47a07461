"""The hub from a recipe, against a local HTTP server standing in for it (HF_ENDPOINT): no network fails in one line
within seconds; `output.push_to_hub` uploads the merged model (or the adapters) with its card."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sft_lora.config import RecipeError, load_recipe
from sft_lora.hub import check_push, push_outputs
from sft_lora.run import main


class FakeHub(BaseHTTPRequestHandler):
    """Just what `create_repo` and `upload_folder` call: repo creation, the card's metadata check, preupload (every
    file "regular", so no LFS), and the NDJSON commit, whose files it records."""

    uploads: dict[str, bytes] = {}
    tokens: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        FakeHub.tokens.append(self.headers.get("Authorization", ""))
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            answer = {"url": f"http://{self.headers['Host']}/{repo['organization']}/{repo['name']}"}
        elif self.path == "/api/validate-yaml":  # the card's metadata, checked before the commit
            answer = {"warnings": []}
        elif "/preupload/" in self.path:
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in json.loads(body)["files"]]}
        elif "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    FakeHub.uploads[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            answer = {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/abc123", "commitOid": "abc123"}
        else:
            self.send_error(404)
            return
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.uploads, FakeHub.tokens = {}, []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read when the tests imported it
    yield FakeHub
    server.shutdown()


@pytest.mark.parametrize("merge", [True, False])
def test_push_uploads_the_merged_model_or_the_adapters_with_their_card(make_recipe, hub, merge):
    recipe = load_recipe(make_recipe(output={"merge": merge, "push_to_hub": "team/tiny-sft"}))
    directory = recipe.merged_dir if merge else recipe.adapters_dir
    directory.mkdir(parents=True)
    files = {"README.md": b"---\nlibrary_name: transformers\n---\n# card\n", "config.json": b"{}",
             "model.safetensors" if merge else "adapter_model.safetensors": b"\x00" * 64}
    for name, content in files.items():
        (directory / name).write_bytes(content)
    url = push_outputs(recipe)
    assert url.endswith("/team/tiny-sft/commit/abc123")
    assert hub.uploads == files  # exactly the directory's files, the card among them
    assert set(hub.tokens) == {"Bearer hf_test_token"}  # the token from the environment, on every request


def test_push_needs_a_token_from_the_environment(make_recipe, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RecipeError, match="needs HF_TOKEN"):
        check_push(load_recipe(make_recipe(output={"push_to_hub": "team/x"})))


def test_a_push_that_cannot_succeed_is_refused_before_training(make_recipe, hub, monkeypatch):
    # a bad repo id or a hub out of reach failed only after training, and the printed --resume pushed nothing
    with pytest.raises(RecipeError, match="output.push_to_hub: 'my org/tiny model' is not a repo id"):
        check_push(load_recipe(make_recipe(output={"push_to_hub": "my org/tiny model"})))
    check_push(load_recipe(make_recipe(output={"push_to_hub": "team/x"})))  # the stand-in hub answers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{probe.getsockname()[1]}")
    with pytest.raises(RecipeError, match="output.push_to_hub: http://127.0.0.1:\\d+ cannot be reached"):
        check_push(load_recipe(make_recipe(output={"push_to_hub": "team/x"})))


def test_a_hub_id_without_network_is_one_line_within_seconds(make_recipe, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nobody listens on: connection refused, like a hub out of reach
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = make_recipe(model={"name_or_path": "someorg/somemodel"})
    start = time.monotonic()
    assert main([str(path)]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.name_or_path: 'someorg/somemodel' is a hub id but" in err[0]
    assert "set HF_HUB_OFFLINE=1" in err[0] and "local path" in err[0]
    assert not (Path(path).parent / "final_model").exists()
