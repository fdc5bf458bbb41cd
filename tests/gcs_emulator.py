"""Starts `gcp-storage-emulator` (PyPI), a local server of the GCS JSON API, for the cloud
storage tests: `python tests/gcs_emulator.py start --port P --default-bucket B --in-memory`.

One header is added to what the emulator serves: real GCS answers every media download
with the object's `x-goog-generation`, and tensorstore (Orbax's array store) refuses a
download without it ("Malformed StorageGeneration"); the emulator omits it. Everything
else is the emulator as published.
"""

from __future__ import annotations

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 (not found: the emulator already answered 404)
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


# Before the server module builds its routing table from `objects.download`.
objects.download = download_with_generation

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
