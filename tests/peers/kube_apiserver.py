"""Protocol-level fake kube-apiserver for tests only: core/v1 Secrets over HTTPS.

Implements what `kubectl create secret` (and the kubernetes Python client) rely on:
bearer-token authentication (401 `Unauthorized` Status), `POST
/api/v1/namespaces/<ns>/secrets` with `dryRun=All` and `fieldManager` query parameters, `GET
…/secrets/<name>`, and the API's error objects (`kind: Status`, `reason` AlreadyExists /
NotFound / BadRequest / Invalid / Unauthorized, `code`). Created objects get `uid`,
`resourceVersion`, `creationTimestamp`, `managedFields` and default `type: Opaque`, as the real
server returns. Every request body is recorded verbatim so tests can inspect what was sent.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.peers.tls import ServedHttp, make_server_tls

_SECRETS = re.compile(r"^/api/v1/namespaces/([a-z0-9-]+)/secrets(?:/([^/]+))?$")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        out["details"] = details
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, code: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _auth(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._send(401, status(401, "Unauthorized", "Unauthorized"))
            return False
        return True

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        m = _SECRETS.match(url.path)
        if not self._auth():
            return
        if not m or not m.group(2):
            self._send(
                404, status(404, "NotFound", "the server could not find the requested resource")
            )
            return
        ns, name = m.group(1), m.group(2)
        obj = self.server.store.get((ns, name))
        if obj is None:
            self._send(
                404,
                status(
                    404,
                    "NotFound",
                    f'secrets "{name}" not found',
                    {"name": name, "kind": "secrets"},
                ),
            )
            return
        self._send(200, obj)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.server.requests.append(
            {
                "method": "POST",
                "path": url.path,
                "query": query,
                "body": body,
                "headers": dict(self.headers),
            }
        )
        if not self._auth():
            return
        m = _SECRETS.match(url.path)
        if not m or m.group(2):
            self._send(
                405, status(405, "MethodNotAllowed", "the server does not allow this method")
            )
            return
        ns = m.group(1)
        if ns not in self.server.namespaces:
            self._send(
                404,
                status(
                    404,
                    "NotFound",
                    f'namespaces "{ns}" not found',
                    {"name": ns, "kind": "namespaces"},
                ),
            )
            return
        if "json" not in (self.headers.get("Content-Type") or ""):
            self._send(415, status(415, "UnsupportedMediaType", "unsupported media type"))
            return
        try:
            obj = json.loads(body)
        except ValueError:
            self._send(400, status(400, "BadRequest", "the object provided is unrecognized"))
            return
        err = self._validate(ns, obj)
        if err:
            self._send(err["code"], err)
            return
        name = obj["metadata"]["name"]
        if (ns, name) in self.server.store:
            self._send(
                409,
                status(
                    409,
                    "AlreadyExists",
                    f'secrets "{name}" already exists',
                    {"name": name, "kind": "secrets"},
                ),
            )
            return
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta = dict(obj["metadata"])
        meta.update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            resourceVersion=str(len(self.server.store) + 1000),
            creationTimestamp=now,
            managedFields=[
                {
                    "manager": query.get("fieldManager", "unknown"),
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": now,
                }
            ],
        )
        created = {**obj, "metadata": meta, "type": obj.get("type") or "Opaque"}
        if query.get("dryRun") != "All":
            self.server.store[(ns, name)] = created
        self._send(201, created)

    def _validate(self, ns: str, obj: Any) -> dict[str, Any] | None:
        if (
            not isinstance(obj, dict)
            or obj.get("kind") != "Secret"
            or obj.get("apiVersion") != "v1"
        ):
            return status(400, "BadRequest", "the object provided is not a v1 Secret")
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            return status(422, "Invalid", 'Secret "" is invalid: metadata.name: Required value')
        name = meta["name"]
        if meta.get("namespace") not in (None, ns):
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not "
                "match the namespace sent on the request",
            )
        if not _NAME.fullmatch(name) or len(name) > 253:
            return status(422, "Invalid", f'Secret "{name}" is invalid: metadata.name')
        for field in ("data", "stringData"):
            values = obj.get(field) or {}
            if not isinstance(values, dict):
                return status(400, "BadRequest", f"{field} must be a map")
            for k, v in values.items():
                if not _KEY.fullmatch(k):
                    return status(422, "Invalid", f'Secret "{name}" is invalid: {field}[{k}]')
                if field == "data":
                    try:
                        base64.b64decode(v, validate=True)
                    except (binascii.Error, TypeError, ValueError):
                        return status(400, "BadRequest", f"{field}[{k}]: illegal base64 data")
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    token: str
    namespaces: set[str]
    store: dict[tuple[str, str], dict[str, Any]]
    requests: list[dict[str, Any]]


class FakeKubeApiserver:
    """HTTPS on 127.0.0.1:<random>; ``write_kubeconfig`` points a client at it."""

    def __init__(self, tls_dir: str, *, token: str = "test-bearer-token") -> None:
        self.ca_path, cert, key = make_server_tls(
            tls_dir,
            ca_cn="fake-kube-apiserver-ca",
            cert_file="apiserver.crt",
            key_file="apiserver.key",
        )
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.token = token
        httpd.namespaces = {"default", "kube-system", "ns1"}
        httpd.store = {}
        httpd.requests = []
        self._httpd = httpd
        self._served = ServedHttp(httpd, (cert, key))
        self.url = f"https://127.0.0.1:{self._served.port}"
        self.token = token

    @property
    def store(self) -> dict[tuple[str, str], dict[str, Any]]:
        return self._httpd.store

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._httpd.requests

    def write_kubeconfig(
        self, path: str, *, namespace: str = "ns1", token: str | None = None
    ) -> str:
        with open(self.ca_path, "rb") as f:
            ca = base64.b64encode(f.read()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "fake", "cluster": {"server": self.url, "certificate-authority-data": ca}}
            ],
            "users": [{"name": "tester", "user": {"token": token or self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "tester", "namespace": namespace},
                },
                {"name": "other", "context": {"cluster": "fake", "user": "tester"}},
            ],
            "current-context": "fake",
        }
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is valid YAML; kubectl and the client both read it
        return path

    def __enter__(self) -> FakeKubeApiserver:
        self._served.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.stop()
