"""`python tests/gcs_emulator.py start ...`: the PyPI gcp-storage-emulator with two things real GCS
does and the emulator (version 2026.7.19) does not, both needed by tensorstore:

- object listings honour `startOffset` and `endOffset`: tensorstore deletes a key range by listing it
  with them, so a zarr array created with `delete_existing` (how `jaxlm prepare` writes every array)
  would otherwise delete every object of the bucket;
- a download says the object's generation (`x-goog-generation`): tensorstore's read-modify-writes
  (a chunk rewritten in place, an OCDBT manifest) otherwise fail with "Malformed StorageGeneration".
"""

import sys

from gcp_storage_emulator.handlers import objects


class _InRange:
  """The handler's response, with the listed items cut to [startOffset, endOffset)."""

  def __init__(self, response, start: str | None, end: str | None):
    self._response, self._start, self._end = response, start, end

  def __getattr__(self, name):
    return getattr(self._response, name)

  def __setattr__(self, name, value):
    if name.startswith("_"):
      object.__setattr__(self, name, value)
    else:
      setattr(self._response, name, value)

  def json(self, body):
    if isinstance(body, dict) and "items" in body:
      body = {**body, "items": [item for item in body["items"] if self._keep(item["name"])]}
    return self._response.json(body)

  def _keep(self, name: str) -> bool:
    return (self._start is None or name >= self._start) and (self._end is None or name < self._end)


_listing = objects.ls


def _ls_in_range(request, response, storage, *args, **kwargs):
  query = request.query
  start = query["startOffset"][0] if query.get("startOffset") else None
  end = query["endOffset"][0] if query.get("endOffset") else None
  return _listing(request, _InRange(response, start, end), storage, *args, **kwargs)


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except objects.NotFound:
    pass  # (the handler answers 404)
  return _download(request, response, storage, *args, **kwargs)


# (Before the server module builds its routes from them.)
objects.ls = _ls_in_range
objects.download = _download_with_generation

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
