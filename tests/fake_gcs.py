"""An offline Google Cloud Storage for tests: gcp-storage-emulator's in-memory server on 127.0.0.1, with
gcsfs (etils.epath's gs:// backend, TFDS) and TensorStore (Orbax's array writer) pointed at it.

The emulator leaves out two parts of the JSON API that TensorStore relies on (its OCDBT manifests are
written and read by generation): the `x-goog-generation` header of a download and the generation
preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`). `serve_generations` adds them to its handlers,
as GCS documents them: a failed precondition is HTTP 412, a GET whose generation matches
ifGenerationNotMatch is 304.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from http import HTTPStatus

ENV = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING',
       'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """What a process needs to talk to the emulator at `url` instead of storage.googleapis.com."""
  return {'STORAGE_EMULATOR_HOST': url,          # gcsfs
          'TENSORSTORE_GCS_HTTP_URL': url,       # TensorStore's gcs kvstore (Orbax arrays)
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake',   # TensorStore: no credential lookup
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}  # gcsfs: no gRPC bucket-type probe (the emulator is HTTP only)


_WRITE_LOCK = threading.Lock()   # a precondition check and its write happen as one step


def _current(storage, bucket: str, name: str | None):
  from gcp_storage_emulator.exceptions import NotFound
  if not name:
    return None
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def _upload_name(request) -> str | None:
  if 'name' in request.query:
    return request.query['name'][0]
  data = request.data
  return data.get('meta', {}).get('name') if isinstance(data, dict) and 'meta' in data else \
      (data.get('name') if isinstance(data, dict) else None)


def _failed_precondition(request, obj) -> HTTPStatus | None:
  """412 when ifGenerationMatch does not hold (0 = must not exist), 304 when ifGenerationNotMatch matches."""
  generation = obj['generation'] if obj is not None else '0'
  match = request.query.get('ifGenerationMatch')
  if match and match[0] != generation:
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get('ifGenerationNotMatch')
  if not_match and not_match[0] == generation:
    return HTTPStatus.NOT_MODIFIED if request.method == 'GET' else HTTPStatus.PRECONDITION_FAILED
  return None


def _with_generations(handler, name_of):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    with _WRITE_LOCK:
      bucket = request.params.get('bucket_name')
      obj = _current(storage, bucket, name_of(request))
      status = _failed_precondition(request, obj)
      if status is not None:
        response.status = status
        if status == HTTPStatus.PRECONDITION_FAILED:
          response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return None
      if obj is not None and request.method == 'GET':
        response['x-goog-generation'] = obj['generation']
        response['x-goog-metageneration'] = obj.get('metageneration', '1')
      return handler(request, response, storage, *args, **kwargs)
  return wrapped


def serve_generations() -> None:
  """Give the emulator's object handlers GCS's generation headers and preconditions (idempotent)."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  if getattr(objects, '_fmjax_generations', False):
    return
  by_object = lambda request: request.params.get('object_id')   # noqa: E731
  wrapped = {objects.download: _with_generations(objects.download, by_object),
             objects.get: _with_generations(objects.get, by_object),
             objects.delete: _with_generations(objects.delete, by_object),
             objects.insert: _with_generations(objects.insert, _upload_name)}
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in wrapped:
        handlers[method] = wrapped[handler]
  objects.insert = wrapped[objects.insert]   # the router also calls it by name for uploads without /upload
  objects._fmjax_generations = True   # pylint: disable=protected-access


@contextlib.contextmanager
def fake_gcs(bucket: str = 'fmjax-test'):
  """Serve an empty in-memory bucket; yields the emulator's URL with this process's environment set."""
  from gcp_storage_emulator.server import create_server
  serve_generations()
  url = f'http://127.0.0.1:{free_port()}'
  server = create_server('127.0.0.1', int(url.rsplit(':', 1)[1]), in_memory=True, default_bucket=bucket)
  server.start()
  _quiet(server)
  saved = {k: os.environ.get(k) for k in ENV}
  os.environ.update(environment(url))
  _forget_filesystems()
  try:
    yield url
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _forget_filesystems()


def _quiet(server) -> None:
  """No traceback when a client closes a connection early (TensorStore does), no log per missing object."""
  import logging
  import sys
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
  httpd = server._api._httpd   # pylint: disable=protected-access
  report = httpd.handle_error

  def handle_error(request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      report(request, client_address)
  httpd.handle_error = handle_error


def _forget_filesystems() -> None:
  """gcsfs caches filesystem instances (and their endpoint): drop them when the endpoint changes."""
  import gcsfs
  from etils.epath import backend
  gcsfs.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()   # pylint: disable=protected-access
