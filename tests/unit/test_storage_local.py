from pathlib import Path

import pytest

from zimage_stream.settings import StorageSettings
from zimage_stream.storage import Storage


async def test_local_storage_is_content_addressed(tmp_path: Path) -> None:
    storage = Storage.from_settings(StorageSettings(url=str(tmp_path / "images")))
    first = await storage.put_image(b"png bytes", "png")
    again = await storage.put_image(b"png bytes", "png")
    other = await storage.put_image(b"other bytes", "png")
    assert first == again and first.uri != other.uri
    assert first.uri.startswith((tmp_path / "images").as_uri())
    assert first.uri.endswith(f"/images/{first.sha256[:2]}/{first.sha256}.png")
    path = Path(first.uri.removeprefix("file://"))
    assert path.read_bytes() == b"png bytes"
    assert await storage.get(first.uri) == b"png bytes"
    assert await storage.exists(first.uri)
    assert not await storage.exists(first.uri.replace(first.sha256, "0" * 64))


def test_storage_url_forms(tmp_path: Path) -> None:
    url = (tmp_path / "x").as_uri()
    assert Storage.from_settings(StorageSettings(url=url)).root == (tmp_path / "x")
    with pytest.raises(ValueError, match="s3://bucket"):
        Storage.from_settings(StorageSettings(url="ftp://host/x"))
    with pytest.raises(ValueError, match="no bucket"):
        Storage.from_settings(StorageSettings(url="s3:///prefix"))
