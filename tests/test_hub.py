"""Hub upload, tested up to the HTTP boundary: a local fake Hub answers what huggingface_hub asks."""

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sslcore.hub import HubError, check_push_access, is_secret_key, push_to_hub, redact, write_model_card

TOKEN = "hf_SECRETsecretSECRETsecret0123456789"


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for create_repo + upload_folder of small (non-LFS) files."""

    requests: list = []
    committed: dict = {}
    whoami: tuple = (200, {"name": "me", "orgs": [{"name": "my-lab"}], "auth": {"accessToken": {"role": "write"}}})

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
        if self.path.startswith("/api/whoami-v2"):
            return self._reply(*FakeHub.whoami)
        return self._reply(404, {"error": f"fake hub does not know {self.path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.requests, FakeHub.committed = [], {}
    FakeHub.whoami = (200, {"name": "me", "orgs": [{"name": "my-lab"}], "auth": {"accessToken": {"role": "write"}}})
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


def test_push_of_a_missing_folder_says_no_such_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        push_to_hub(tmp_path / "runs" / "typo" / "model", "me/x")


def test_redact_blanks_secrets_at_any_depth():
    assert redact({"hub": {"token": "x", "repo_id": "a"}, "list": [{"api_key": "k"}]}) == {
        "hub": {"token": "***", "repo_id": "a"}, "list": [{"api_key": "***"}]}
    assert redact({"hub": {"token": None}}) == {"hub": {"token": None}}


def test_redact_blanks_secrets_only_and_keeps_settings_about_tokens():
    config = {
        "hub": {"token": TOKEN, "repo_id": "me/x"}, "hf_token": "a", "access_token": "b", "hub.token": "c",
        "api_key": "d", "wandb_api_key": "e", "password": "f", "client_secret": "g", "HF_TOKEN": "h", "apiKey": "i",
        "tokenizer": {"kind": "wordpiece", "vocab_size": 8192}, "max_new_tokens": 40, "tokens_per_batch": 4096,
        "pad_token": "[PAD]", "mask_token": "[MASK]", "bos_token_id": 0, "num_tokens": 7, "secretary": "kept",
        "note": f"pushed with {TOKEN} by mistake",
    }
    out = redact(config)
    secret = ["hf_token", "access_token", "hub.token", "api_key", "wandb_api_key", "password", "client_secret",
              "HF_TOKEN", "apiKey"]
    assert out["hub"] == {"token": "***", "repo_id": "me/x"}
    assert all(out[key] == "***" for key in secret), {k: out[k] for k in secret}
    kept = ["tokenizer", "max_new_tokens", "tokens_per_batch", "pad_token", "mask_token", "bos_token_id", "num_tokens",
            "secretary"]
    assert {k: out[k] for k in kept} == {k: config[k] for k in kept}
    assert out["note"] == "pushed with *** by mistake"  # a Hub token is redacted wherever it appears
    assert not is_secret_key("tokenizer") and is_secret_key("token")


def test_model_card_keeps_the_tokenizer_settings(tmp_path):
    write_model_card(tmp_path, model_name="m", summary="s", training_data="d", metrics={},
                     config={"tokenizer": {"kind": "wordpiece"}, "generation": {"max_new_tokens": 40},
                             "hub": {"token": TOKEN}})
    card = (tmp_path / "README.md").read_text()
    assert '"kind": "wordpiece"' in card and '"max_new_tokens": 40' in card and TOKEN not in card


def test_push_checks_run_before_training(fake_hub, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants

    assert check_push_access("me/tiny-bert", token=TOKEN) == "me"
    assert check_push_access("my-lab/tiny-bert", token=TOKEN) == "me"
    assert any(p.startswith("/api/whoami-v2") and auth == f"Bearer {TOKEN}" for m, p, auth in FakeHub.requests)
    for bad in ("tiny-bert", "me/tiny/bert", "me/tiny bert", "me/.x"):
        with pytest.raises(HubError, match="repo"):
            check_push_access(bad, token=TOKEN)
    with pytest.raises(HubError, match="belongs to 'me'.*me/tiny-bert"):
        check_push_access("someone-else/tiny-bert", token=TOKEN)
    FakeHub.whoami = (200, {"name": "me", "auth": {"accessToken": {"role": "read"}}})
    with pytest.raises(HubError, match="read-only"):
        check_push_access("me/tiny-bert", token=TOKEN)
    FakeHub.whoami = (401, {"error": "Invalid credentials"})
    with pytest.raises(HubError, match="rejected the token"):
        check_push_access("me/tiny-bert", token=TOKEN)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="no Hugging Face token.*hf auth login"):
        check_push_access("me/tiny-bert")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match="cannot reach the Hub"):
        check_push_access("me/tiny-bert", token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        check_push_access("me/tiny-bert", token=TOKEN)
