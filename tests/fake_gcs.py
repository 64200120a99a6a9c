"""A Google Cloud Storage emulator on 127.0.0.1, so gs:// paths are tested against a real server.

gcp-storage-emulator serves the JSON API every client here speaks: gcsfs (etils.epath, hence every
file s2flash writes itself), tensorstore (orbax's arrays and metadata) and ArrayRecord's reader.
The stock emulator departs from GCS where these clients depend on it, so `fake_gcs` first patches
its handlers (idempotently) to answer as GCS does:
- listings honour startOffset / endOffset (tensorstore lists a prefix as a key range; unfiltered,
  it aborts the whole process);
- writes, copies and deletes honour ifGenerationMatch (412 when stale; 0 = "must not exist"), which
  tensorstore's read-modify-write of orbax's manifests relies on;
- media downloads carry x-goog-generation, which tensorstore reads on every download;
- objects.moveTo is served (copy, then delete) instead of 501, on which gcsfs retries for ~35 s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus

BUCKET = "s2flash-test"

# A conditional write is a check then a write: one at a time, whatever server class serves the requests.
_WRITE_LOCK = threading.RLock()


def _query(request, key: str) -> str | None:
    values = request.query.get(key)
    return values[0] if values else None


def _current_generation(storage, bucket: str, name: str) -> str:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _upload_name(request) -> str | None:
    """The object an upload request writes: ?name=, else the multipart / resumable metadata's name."""
    name = _query(request, "name")
    if name is None and _query(request, "uploadType") in ("multipart", "resumable"):
        data = request.data
        meta = data.get("meta", data) if isinstance(data, dict) else {}
        name = meta.get("name") if isinstance(meta, dict) else None
    return name


def _with_precondition(handler, target):
    """`handler`, refused with 412 when the request's ifGenerationMatch is not the target object's
    generation. target(request) -> (bucket, object name) or None (nothing to check)."""

    @functools.wraps(handler)
    def checked(request, response, storage, *args, **kwargs):
        expected = _query(request, "ifGenerationMatch")
        where = target(request) if expected is not None else None
        with _WRITE_LOCK:
            if where is not None and _current_generation(storage, *where) != expected:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                return None
            return handler(request, response, storage, *args, **kwargs)

    checked.s2flash_patched = True
    return checked


def _then(handler, amend):
    """`handler`, its answer then amended by amend(request, response, storage)."""

    @functools.wraps(handler)
    def amended(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        amend(request, response, storage)

    amended.s2flash_patched = True
    return amended


def _keep_key_range(request, response, storage) -> None:
    """A listing's items and prefixes within [startOffset, endOffset)."""
    start, end = _query(request, "startOffset"), _query(request, "endOffset")
    if response.status != HTTPStatus.OK or (start is None and end is None):
        return
    inside = lambda name: (start is None or name >= start) and (end is None or name < end)  # noqa: E731
    body = json.loads(response._content)
    body["items"] = [item for item in body.get("items") or [] if inside(item["name"])]
    body["prefixes"] = [prefix for prefix in body.get("prefixes") or [] if inside(prefix)]
    response.json(body)


def _report_generation(request, response, storage) -> None:
    """A download's object generation headers, as GCS sends them."""
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def _move(request, response, storage, *args, **kwargs):
    """POST .../o/{object}/moveTo/o/{destination}: GCS's atomic rename within a bucket."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    bucket = request.params["bucket_name"]
    with _WRITE_LOCK:
        try:
            moved = objects._copy(request.base_url, storage, bucket, request.params["object_id"], bucket,
                                  request.params["dest_object_id"])
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        storage.delete_file(bucket, request.params["object_id"])
    response.json(moved)


def patch_emulator() -> None:
    """Make the emulator's handlers answer as GCS does where the clients depend on it (see above)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    routes = server.HANDLERS
    if any(getattr(h, "s2flash_patched", False) for _, handlers in routes for h in handlers.values()):
        return
    params = lambda *keys: lambda request: tuple(request.params[k] for k in keys)  # noqa: E731
    wrapped = {
        objects.ls: _then(objects.ls, _keep_key_range),
        objects.download: _then(objects.download, _report_generation),
        objects.insert: _with_precondition(
            objects.insert, lambda r: None if _upload_name(r) is None else (r.params["bucket_name"], _upload_name(r))),
        objects.xml_upload: _with_precondition(objects.xml_upload, params("bucket_name", "object_id")),
        objects.delete: _with_precondition(objects.delete, params("bucket_name", "object_id")),
        objects.copy: _with_precondition(objects.copy, params("dest_bucket_name", "dest_object_id")),
        objects.rewrite: _with_precondition(objects.rewrite, params("dest_bucket_name", "dest_object_id")),
    }
    for _, handlers in routes:
        for method, handler in handlers.items():
            handlers[method] = wrapped.get(handler, handler)
    # Handlers also reach each other by module attribute (objects.get with alt=media downloads; the
    # router falls back to objects.insert for uploads without /upload).
    for original, replacement in list(wrapped.items()):
        setattr(objects, original.__name__, replacement)
    handle = server.RequestHandler.handle

    def handle_quietly(self):  # a client that hangs up early (a cancelled read) is not an error
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            handle(self)

    server.RequestHandler.handle = handle_quietly
    move_route = (r"^{}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
                  .format(server.settings.API_ENDPOINT), {server.POST: _move})
    server.HANDLERS = (move_route, *routes)


def environment(url: str) -> dict[str, str]:
    """The variables that point every client at the emulator at `url` (set before they start)."""
    return {"STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC probe of the bucket type
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # ArrayRecord (google-cloud-cpp)
            "EPATH_USE_TF": "false", "GOOGLE_CLOUD_PROJECT": "s2flash-test"}


@contextlib.contextmanager
def fake_gcs() -> Iterator[dict[str, str]]:
    """Run the emulator (in memory, one bucket BUCKET) on a free port of 127.0.0.1 for the block;
    yields the variables a process needs to use it."""
    from gcp_storage_emulator.server import create_server

    patch_emulator()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        yield environment(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
