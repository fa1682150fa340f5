"""A client for the live tests: HTTP/1.1 over the daemon's Unix socket or TCP, and a check of
every response against openapi.yaml."""
import http.client
import json
import os
import re
import urllib.parse

import jsonschema
import referencing
import yaml

import rawhttp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC_PATH = os.path.join(ROOT, "openapi.yaml")
with open(SPEC_PATH) as f:
    SPEC = yaml.safe_load(f)
_REGISTRY = referencing.Registry().with_resource(
    "spec.json", referencing.Resource.from_contents(SPEC, default_specification=referencing.jsonschema.DRAFT202012))
# A queue id is a small integer (the router takes up to 9 digits): `/queues/abc` is no path.
_TEMPLATES = [(re.compile("^" + re.sub(r"\{[^}]+\}", lambda m: "[0-9]{1,9}" if m[0] == "{id}" else "[^/]+", p) + "$"), p)
              for p in SPEC["paths"]]


class SpecViolation(AssertionError):
    pass


def validate(method, path, status, headers, body):
    """Raises SpecViolation unless the response is what openapi.yaml says this operation answers."""
    # As the server sees it: percent-escapes decoded (an escaped `/` is a separator then), and
    # a C string (an escaped NUL ends it).
    path = urllib.parse.unquote(path.split("?", 1)[0]).split("\0", 1)[0]
    template = next((t for rx, t in _TEMPLATES if rx.match(path)), None)
    if template is None:
        if status != 404:
            raise SpecViolation(f"{method} {path}: {status} for a path the spec does not have")
        schema_ref = "#/components/schemas/Error"
    else:
        op = SPEC["paths"][template].get(method.lower())
        if op is None:
            if status != 405:
                raise SpecViolation(f"{method} {template}: {status}, but the spec has no such operation")
            if not headers.get("allow"):
                raise SpecViolation(f"{method} {template}: 405 without Allow")
            schema_ref = "#/components/schemas/Error"
        else:
            resp = op["responses"].get(str(status))
            if resp is None:
                raise SpecViolation(f"{method} {template}: status {status} is not documented")
            if "$ref" in resp:
                resp = SPEC["components"]["responses"][resp["$ref"].split("/")[-1]]
            content = resp.get("content")
            if not content:
                if body:
                    raise SpecViolation(f"{method} {template}: {status} must have no body, got {body[:80]!r}")
                return
            media = next(iter(content))
            ctype = headers.get("content-type", "")
            if not ctype.startswith(media):
                raise SpecViolation(f"{method} {template}: content-type {ctype!r}, spec says {media}")
            if media == "application/x-ndjson":
                # Every non-blank line is one Event.
                for line in body.split(b"\n"):
                    if line.strip():
                        validate_event(json.loads(line))
                return
            if media != "application/json":
                return
            schema = content[media]["schema"]
            # Validate in place, so refs inside an inline schema resolve against the spec.
            pointer = "/".join(x.replace("~", "~0").replace("/", "~1")
                               for x in ["paths", template, method.lower(), "responses", str(status),
                                         "content", media, "schema"])
            schema_ref = None if "$ref" in schema else "#/" + pointer
            if "$ref" in op["responses"][str(status)]:
                schema_ref = schema.get("$ref")
    if schema_ref is not None:
        schema = {"$ref": schema_ref}
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise SpecViolation(f"{method} {path}: body is not JSON: {e}")
    schema = {"$ref": "spec.json" + schema["$ref"]} if "$ref" in schema else schema
    try:
        jsonschema.Draft202012Validator(schema, registry=_REGISTRY).validate(doc)
    except jsonschema.ValidationError as e:
        raise SpecViolation(f"{method} {path} {status}: {e.message} at {list(e.absolute_path)}")


def validate_event(doc):
    """Raises SpecViolation unless `doc` is an Event as openapi.yaml has it."""
    try:
        jsonschema.Draft202012Validator({"$ref": "spec.json#/components/schemas/Event"}, registry=_REGISTRY).validate(doc)
    except jsonschema.ValidationError as e:
        raise SpecViolation(f"event {doc}: {e.message}")


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def code(self):
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = rawhttp.connect(self._path, timeout=self.timeout)


class Client:
    """Each call is checked against the spec; `responses` keeps them all."""

    def __init__(self, unix_path=None, tcp_port=None, token=None, timeout=30):
        self.unix_path = unix_path
        self.tcp_port = tcp_port
        self.token = token
        self.timeout = timeout
        self.responses = []

    def _connection(self):
        if self.unix_path:
            return _UnixConnection(self.unix_path, timeout=self.timeout)
        return http.client.HTTPConnection("127.0.0.1", self.tcp_port, timeout=self.timeout)

    def request(self, method, path, body=None, content_type="application/json", headers=None, check=True):
        conn = self._connection()
        h = dict(headers or {})
        if self.token and "Authorization" not in h:
            h["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            if isinstance(data, str):
                data = data.encode()
            if content_type:
                h["Content-Type"] = content_type
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            resp = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()
        if check:
            validate(method, path, resp.status, resp.headers, resp.body)
        self.responses.append((method, path, resp))
        return resp

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def put(self, path, body=None, **kw):
        return self.request("PUT", path, body, **kw)

    def patch(self, path, body=None, **kw):
        return self.request("PATCH", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)
