"""Hub upload, tested up to the HTTP boundary: a local fake Hub answers what huggingface_hub asks."""

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sslcore.hub import push_to_hub, redact, write_model_card

TOKEN = "hf_SECRETsecretSECRETsecret0123456789"


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for create_repo + upload_folder of small (non-LFS) files."""

    requests: list = []
    committed: dict = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        FakeHub.requests.append(("POST", self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            name = json.loads(body)
            host = f"http://{self.headers['Host']}"
            return self._reply(200, {"url": f"{host}/{name.get('organization') or 'me'}/{name['name']}"})
        if self.path == "/api/validate-yaml":  # the Hub checks model-card metadata before a commit
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    FakeHub.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            host = f"http://{self.headers['Host']}"
            return self._reply(200, {"commitUrl": f"{host}/me/tiny-bert/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply(404, {"error": f"fake hub does not know {self.path}"})

    def do_GET(self):
        FakeHub.requests.append(("GET", self.path, self.headers.get("Authorization")))
        return self._reply(404, {"error": f"fake hub does not know {self.path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.requests, FakeHub.committed = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield endpoint
    server.shutdown()


def _exported(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    write_model_card(folder, model_name="tiny", summary="A test model.",
                     config={"hub": {"token": TOKEN}, "train": {"max_steps": 3}}, training_data="bundled text",
                     metrics={"final_loss": 1.5}, pipeline_tag="fill-mask",
                     eval_results=[{"task_type": "text-classification", "task_name": "sentiment",
                                    "dataset_type": "movie-sentiment", "dataset_name": "movie-sentiment",
                                    "metric_type": "accuracy", "metric_value": 0.8}])
    return folder


def test_push_uploads_the_exported_folder_and_never_logs_the_token(fake_hub, tmp_path, caplog):
    folder = _exported(tmp_path)
    with caplog.at_level(logging.DEBUG):
        url = push_to_hub(folder, "me/tiny-bert", token=TOKEN, private=True)
    assert "commit" in url
    assert set(FakeHub.committed) == {"README.md", "config.json", "model.safetensors"}
    assert FakeHub.committed["model.safetensors"] == b"\x00" * 64
    methods = [(m, p.split("?")[0]) for m, p, _ in FakeHub.requests]
    assert ("POST", "/api/repos/create") in methods
    assert all(auth == f"Bearer {TOKEN}" for m, p, auth in FakeHub.requests if m == "POST")
    assert TOKEN not in caplog.text
    card = FakeHub.committed["README.md"].decode()
    assert TOKEN not in card and "***" in card  # the config in the card is redacted
    assert "model-index" in card and "accuracy" in card


def test_push_refuses_a_folder_without_a_model_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="model card"):
        push_to_hub(tmp_path, "me/x")


def test_redact_blanks_secrets_at_any_depth():
    assert redact({"hub": {"token": "x", "repo_id": "a"}, "list": [{"api_key": "k"}]}) == {
        "hub": {"token": "***", "repo_id": "a"}, "list": [{"api_key": "***"}]}
    assert redact({"hub": {"token": None}}) == {"hub": {"token": None}}
