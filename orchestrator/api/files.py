"""``/v1/files``: datasets uploaded as OpenAI's fine-tuning API has them (``purpose=fine-tune``).

An upload must declare its length, and one over the limit is refused (413) before its body is
read (``UploadGuard``); its file part is then copied to a temporary file with a running byte
count, validated row by row (422 naming ``filename:line``), stored
content-addressed and recorded in the caller's namespace. Another namespace's files are 404,
as if they did not exist.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from orchestrator.api import schemas
from orchestrator.api.deps import PrincipalDep
from orchestrator.api.jobs import page_body
from orchestrator.http_errors import ApiError
from orchestrator.objects import file_deleted_object, file_object
from orchestrator.uploads import UploadTooLarge, check_size, upload_dataset
from storage.auth import Principal
from storage.catalog import files as file_repo
from storage.catalog.domain import DataFile
from storage.errors import InvalidName, NotFound
from storage.registry import Registry
from workers.datasets import MAX_LINE_BYTES, LineTooLong
from workers.errors import DatasetError

CHUNK = 1 << 20
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    411: {"model": schemas.ErrorBody, "description": "The upload declares no Content-Length"},
    413: {"model": schemas.ErrorBody, "description": "The upload is over the size limit"},
}
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields


class UploadGuard:
    """ASGI middleware: refuse an oversized ``POST /v1/files`` before its body is read.

    FastAPI parses a multipart body (spooling file parts to disk) before the route runs, so
    the route's own checks come too late to protect the server's disk. Here a body must
    declare its length (411 otherwise) and a declared length over the limit is a 413 at once.
    (The HTTP server refuses a body longer than it declared: h11 under uvicorn.)
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.limit = app, max_bytes + FORM_OVERHEAD

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].rstrip("/") == "/v1/files"):  # fmt: skip
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is None or not declared.isdigit():
            await _refuse(send, 411, "an upload must declare its Content-Length")
            return
        if int(declared) > self.limit:
            limit = self.limit - FORM_OVERHEAD
            await _refuse(send, 413, f"the upload is {int(declared):,} bytes; the limit is "
                          f"{limit:,} (LORAFLEET_MAX_UPLOAD_BYTES)")  # fmt: skip
            return
        await self.app(scope, receive, send)


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "field": "file"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _target_namespace(who: Principal, namespace: str | None) -> str:
    if who.namespace is not None:
        if namespace not in (None, who.namespace):
            raise ApiError(403, f"token may not upload to namespace {namespace}", "namespace")
        return who.namespace
    if namespace is None:
        raise ApiError(422, "namespace: the admin token must name a namespace", "namespace")
    return namespace


async def _spool(upload: UploadFile, dest: Path, limit: int, max_line: int) -> int:
    """Copy an upload to ``dest``, stopping with ``UploadTooLarge`` past ``limit`` bytes and
    with ``LineTooLong`` as soon as a line passes ``max_line`` bytes (checked as the bytes
    arrive, so an over-long line is refused before the rest is read)."""
    size, line, lineno = 0, 0, 1  # bytes of the open line, its number
    name = Path(upload.filename or "upload").name
    with open(dest, "wb") as out:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            check_size(size, limit, filename=name)
            lengths = [len(part) for part in chunk.split(b"\n")]
            lengths[0] += line
            over = next((i for i, n in enumerate(lengths) if n > max_line), None)
            if over is not None:
                raise LineTooLong(f"{name}:{lineno + over}: the line is longer than "
                                  f"{max_line:,} bytes (LORAFLEET_MAX_LINE_BYTES)")  # fmt: skip
            lineno += len(lengths) - 1
            line = lengths[-1]
            out.write(chunk)
    return size


class UploadSlots:
    """Uploads in progress per namespace, capped: one namespace cannot hold every worker
    thread and the server's temporary disk with uploads (the others' go on)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy: dict[str, int] = {}

    def take(self, namespace: str) -> bool:
        if self._busy.get(namespace, 0) >= self.limit:
            return False
        self._busy[namespace] = self._busy.get(namespace, 0) + 1
        return True

    def give(self, namespace: str) -> None:
        self._busy[namespace] = self._busy.get(namespace, 1) - 1
        if self._busy[namespace] <= 0:
            del self._busy[namespace]


def files_router(
    registry: Registry, max_bytes: int, principal: PrincipalDep, *,
    max_line: int = MAX_LINE_BYTES, max_uploads: int = 4,
) -> APIRouter:  # fmt: skip
    """The ``/v1/files`` routes over ``registry``; ``principal`` is the auth dependency;
    ``max_line``: bytes per JSONL row; ``max_uploads``: uploads at once per namespace."""
    router = APIRouter(prefix="/v1/files", tags=["files"], responses=schemas.ERRORS)
    db = registry.catalog
    slots = UploadSlots(max_uploads)

    def visible(file_id: str, who: Principal) -> DataFile:
        try:
            return file_repo.get_file(db, file_id=file_id, namespace=who.namespace)
        except NotFound:
            raise ApiError(404, f"file {file_id} not found") from None

    @router.post("", status_code=201, response_model=schemas.DataFile, responses=UPLOAD_ERRORS)
    async def upload(
        request: Request,
        file: UploadFile = File(...),
        purpose: str = Form(...),
        namespace: str | None = Form(None),
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:
        if purpose not in file_repo.PURPOSES:
            raise ApiError(422, f"purpose: must be one of {', '.join(file_repo.PURPOSES)}",
                           "purpose")  # fmt: skip
        target = _target_namespace(who, namespace)
        filename = Path(file.filename or "upload.jsonl").name  # a name, never a path
        if not slots.take(target):
            raise ApiError(429, f"namespace {target} has {slots.limit} uploads in progress; "
                           "try again when one ends")  # fmt: skip
        tmp = Path(tempfile.mkdtemp(prefix="lorafleet-upload-"))
        try:
            try:
                # the declared body (file + form fields + boundaries) tells early
                declared = int(request.headers.get("content-length") or 0)
                check_size(max(0, declared - FORM_OVERHEAD), max_bytes, filename=filename)
                await _spool(file, tmp / "data", max_bytes, max_line)
                record, _ = await asyncio.to_thread(
                    upload_dataset, registry, tmp / "data", namespace=target,
                    filename=filename, max_bytes=max_bytes, max_line=max_line,
                )  # fmt: skip
            except (UploadTooLarge, LineTooLong) as exc:
                raise ApiError(413, str(exc), "file") from None
            except DatasetError as exc:
                raise ApiError(422, str(exc), "file") from None
            except InvalidName as exc:
                raise ApiError(422, str(exc), "namespace") from None
        finally:
            slots.give(target)
            shutil.rmtree(tmp, ignore_errors=True)
        return file_object(record)

    @router.get("", response_model=schemas.DataFilePage)
    def list_files(
        limit: int = Query(20, ge=1, le=100),
        after: str | None = Query(None, max_length=64, description="The last id of a page."),
        who: Principal = Depends(principal),
    ) -> dict[str, Any]:
        try:
            page, more = file_repo.page_files(db, namespace=who.namespace, limit=limit,
                                              after=after)  # fmt: skip
        except NotFound:
            raise ApiError(400, f"after: no file {after} to continue from", "after") from None
        return page_body([file_object(f) for f in page], more)

    @router.get("/{file_id}", response_model=schemas.DataFile)
    def show(file_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        return file_object(visible(file_id, who))

    @router.get("/{file_id}/content", response_class=FileResponse,
                responses={200: {"content": {"application/jsonl": {}},
                                 "description": "The file's bytes, as uploaded"}})  # fmt: skip
    def content(file_id: str, who: Principal = Depends(principal)) -> FileResponse:
        f = visible(file_id, who)
        path = registry.file_path(f)  # verified against the recorded digest
        return FileResponse(path, media_type="application/jsonl", filename=f.filename)

    @router.delete("/{file_id}", response_model=schemas.FileDeleted)
    def delete(file_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        f = visible(file_id, who)
        registry.delete_file(f.id)
        return file_deleted_object(f.id)

    return router
