"""Runs gcp-storage-emulator (a real HTTP server) with the one header tensorstore needs added.

tensorstore's gcs driver (orbax's checkpoint writer) reads an object's generation from the `x-goog-generation`
header of a media download, as the real GCS sends it; gcp-storage-emulator 2026.7.19 omits it, and tensorstore
then fails with "Malformed StorageGeneration". This wrapper adds the header (and x-goog-metageneration) and
otherwise runs the emulator unchanged:  python tests/gcs_emulator.py start --port PORT --in-memory

It also serves each connection on its own thread: the emulator's single-threaded http.server.HTTPServer stalls
every client as soon as one connection stays open without a complete request (seen with a training job whose
prefetching data iterator and evaluation iterator read shards concurrently); the real GCS has no such limit.
The emulator's storage (objects, resumable-upload sessions) is not thread-safe, so requests, once read, are
still handled one at a time under a lock: without it concurrent orbax uploads lost a resumable session now and
then (404 on the upload's PUT) when the suite ran under load.
"""
import http.server
import threading

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

http.server.HTTPServer = http.server.ThreadingHTTPServer  # the emulator builds `server.HTTPServer(...)`

_handle = server.Router.handle
_storage_lock = threading.Lock()


def handle(self, method):
  with _storage_lock:  # one request at a time against the shared in-memory storage
    return _handle(self, method)


server.Router.handle = handle

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj['metageneration']
  except Exception:  # no such object: the emulator's own handler answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # objects.get(alt=media), tensorstore's read path, calls it by this name
for _, handlers in server.HANDLERS:
  for method, handler in list(handlers.items()):
    if handler is _download:
      handlers[method] = download

if __name__ == '__main__':
  emulator_main.main()
