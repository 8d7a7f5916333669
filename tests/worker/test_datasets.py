"""Dataset intake: layouts, conversions, and broken data sets with their reasons."""

from __future__ import annotations

import io
import struct
import tarfile
import threading
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from difffit.errors import InvalidDataset
from difffit.settings import Settings
from worker.datasets import extract, load_dataset


def png(mode: str = "RGB", size=(12, 10), value: int = 200) -> bytes:
    img = Image.new(mode, size, value if mode in ("L", "P", "I;16") else (value,) * len(mode))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path.as_uri()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", allow_file_urls=True)


def test_zip_with_top_folder_and_mixed_modes(tmp_path, settings):
    files = {
        "top/cat/a.png": png("RGB"),
        "top/cat/b.png": png("RGBA"),
        "top/dog/c.png": png("L"),
        "top/dog/d.png": png("P"),
        "top/dog/e.png": png("I;16", value=4000),
    }
    ds = load_dataset(make_zip(tmp_path / "d.zip", files), settings, channels=3, size=8)
    assert ds.class_names == ["cat", "dog"]
    assert ds.pixels.shape == (5, 3, 8, 8) and ds.pixels.dtype == np.float32
    assert list(ds.labels) == [0, 0, 1, 1, 1]
    assert ds.pixels.min() >= -1.0 and ds.pixels.max() <= 1.0


def test_tar_gz_is_accepted(tmp_path, settings):
    path = tmp_path / "d.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in ("a/1.png", "b/2.png"):
            data = png("L")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = load_dataset(path.as_uri(), settings, channels=1, size=8)
    assert ds.class_names == ["a", "b"] and ds.pixels.shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "files, reason",
    [
        ({"a.png": png(), "b.png": png()}, "no class folders"),
        ({"only/a.png": png(), "only/b.png": png()}, "only one class folder"),
        ({"a/readme.txt": b"hello", "b/notes.txt": b"x"}, "could not be read as images: a/readme.txt"),
        ({"a/x.png": png(), "b/broken.png": png()[:40]}, "b/broken.png (corrupt image"),
        ({"a/x.png": png(), "b/.keep": b""}, "class folders with no images: b"),
        ({"../evil/x.png": png(), "b/y.png": png()}, "'..' path"),
    ],
)
def test_broken_data_sets_fail_with_their_reason(tmp_path, settings, files, reason):
    url = make_zip(tmp_path / "bad.zip", files)
    with pytest.raises(InvalidDataset, match=reason.replace("(", r"\(").replace(".", r"\.")):
        load_dataset(url, settings, channels=1, size=8)


def test_zero_images_and_non_archives(tmp_path, settings):
    with pytest.raises(InvalidDataset, match="zero images|no images"):
        load_dataset(make_zip(tmp_path / "e.zip", {"a/.x": b"", "b/.y": b""}), settings, 1, 8)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidDataset, match="neither a zip nor a tar"):
        load_dataset(junk.as_uri(), settings, 1, 8)


def test_file_urls_need_the_setting_and_schemes_are_checked(tmp_path):
    url = make_zip(tmp_path / "d.zip", {"a/x.png": png(), "b/y.png": png()})
    with pytest.raises(InvalidDataset, match="DIFFFIT_ALLOW_FILE_URLS"):
        load_dataset(url, Settings(data_dir=tmp_path), 1, 8)
    with pytest.raises(InvalidDataset, match="scheme must be"):
        load_dataset("ftp://example.com/d.zip", Settings(data_dir=tmp_path), 1, 8)


def test_archive_caps(tmp_path):
    data = tmp_path / "big.zip"
    make_zip(data, {f"a/{i}.png": png() for i in range(5)})
    with pytest.raises(InvalidDataset, match="more than 3 files"):
        extract(data.read_bytes(), tmp_path / "out", Settings(dataset_max_files=3))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/d.zip",
        "http://localhost/d.zip",
        "http://169.254.169.254/latest",
        "http://10.1.2.3/x",
    ],
)
def test_private_and_metadata_hosts_are_refused_unless_allowed(tmp_path, url):
    from worker.datasets import check_public_host

    with pytest.raises(InvalidDataset, match="non-public address"):
        check_public_host(url, Settings(data_dir=tmp_path))
    check_public_host(url, Settings(data_dir=tmp_path, allow_private_urls=True))  # no raise


def test_redirect_to_a_private_host_is_refused(tmp_path, monkeypatch):
    import worker.datasets as ds

    seen = []

    def fake_check(url, settings):
        seen.append(url)
        if "127.0.0.1" in url and len(seen) > 1:
            raise InvalidDataset("non-public address (redirect)")

    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/secret")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.setattr(ds, "check_public_host", fake_check)
    with pytest.raises(InvalidDataset, match="redirect"):
        ds.fetch(f"http://localhost:{server.server_address[1]}/d.zip", Settings(data_dir=tmp_path))
    assert seen == [f"http://localhost:{server.server_address[1]}/d.zip", "http://127.0.0.1:1/secret"]


# --- hostile data sets (issue 6) ------------------------------------------------------------


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what PIL will not write (16-bit RGB, huge 1-bit canvases)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def files_under(path) -> list:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x.png", png())
        zf.writestr("b/zeros.bin", bytes(50 * 1024**2))
    assert path.stat().st_size < 200_000
    with pytest.raises(InvalidDataset, match=r"'b/zeros.bin'.*compression ratio of \d+:1.*more than 100:1"):
        extract(path.read_bytes(), tmp_path / "out", Settings())
    assert files_under(tmp_path / "out") == []  # judged on the declared sizes, up front


def test_tar_gz_bomb_stops_at_the_ratio_cap_while_streaming(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    member = bytes(1024**2)
    with tarfile.open(path, "w:gz") as tf:
        for i in range(40):
            info = tarfile.TarInfo(f"a/{i:02}.bin")
            info.size = len(member)
            tf.addfile(info, io.BytesIO(member))
    with pytest.raises(InvalidDataset, match=r"'a/\d+.bin'.*compression ratio"):
        extract(path.read_bytes(), tmp_path / "out", Settings())
    written = files_under(tmp_path / "out")
    assert 0 < len(written) < 40  # stopped part way, at the cap


def test_small_archives_may_compress_well(tmp_path, settings):
    # Solid-colour BMPs compress far beyond 100:1, but a small archive cannot be a bomb.
    solid = encoded(Image.new("RGB", (256, 256), (10, 200, 30)), "BMP")
    path = tmp_path / "solid.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x.bmp", solid)
        zf.writestr("b/y.bmp", solid)
    assert sum(i.file_size for i in zipfile.ZipFile(path).infolist()) / path.stat().st_size > 100
    assert load_dataset(path.as_uri(), settings, channels=3, size=8).pixels.shape == (2, 3, 8, 8)


def test_damaged_archives_are_invalid_datasets(tmp_path):
    path = tmp_path / "d.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        data = np.random.default_rng(0).bytes(200_000)
        info = tarfile.TarInfo("a/x.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidDataset, match="damaged or truncated"):
        extract(path.read_bytes()[:50_000], tmp_path / "out", Settings())

    zpath = tmp_path / "d.zip"
    make_zip(zpath, {"a/x.bin": b"hello world" * 100, "b/y.bin": b"z"})
    raw = zpath.read_bytes().replace(
        b"hello world", b"HELLO WORLD", 1
    )  # stored data no longer matches its CRC
    with pytest.raises(InvalidDataset, match="damaged or truncated"):
        extract(raw, tmp_path / "out2", Settings())


def _tar_with(path, member: tarfile.TarInfo) -> bytes:
    with tarfile.open(path, "w") as tf:
        data = png()
        info = tarfile.TarInfo("a/x.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        tf.addfile(member)
    return path.read_bytes()


@pytest.mark.parametrize(
    "kind, reason",
    [
        (tarfile.SYMTYPE, "is a symbolic link"),
        (tarfile.LNKTYPE, "is a hard link"),
        (tarfile.FIFOTYPE, "is a special file"),
        (tarfile.CHRTYPE, "is a special file"),
    ],
)
def test_tar_links_and_special_files_are_refused(tmp_path, kind, reason):
    member = tarfile.TarInfo("b/y.png")
    member.type = kind
    member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "a/x.png"
    with pytest.raises(InvalidDataset, match=f"member 'b/y.png' {reason}"):
        extract(_tar_with(tmp_path / "l.tar", member), tmp_path / "out", Settings())
    assert not (tmp_path / "out" / "b").exists()


def test_zip_symlinks_are_refused(tmp_path):
    path = tmp_path / "l.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/x.png", png())
        link = zipfile.ZipInfo("b/y.png")
        link.external_attr = (0o120777 << 16) | 0x20
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(InvalidDataset, match="member 'b/y.png' is a symbolic link"):
        extract(path.read_bytes(), tmp_path / "out", Settings())


def test_image_modes_cmyk_la_and_16_bit_are_converted(tmp_path, settings):
    rgb16 = b"".join(b"\x00" + struct.pack(">HHH", 65535, 32896, 0) * 4 for _ in range(4))
    gray16 = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    files = {
        "a/cmyk.tif": encoded(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), "TIFF"),  # magenta
        "a/cmyk.jpg": encoded(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), "JPEG"),
        "b/la.png": encoded(Image.new("LA", (4, 4), (128, 255)), "PNG"),
        "b/la_clear.png": encoded(Image.new("LA", (4, 4), (255, 0)), "PNG"),  # transparent: black
        "c/gray16.png": encoded(gray16, "PNG"),
        "c/rgb16.png": raw_png(4, 4, 16, 2, rgb16),
    }
    with Image.open(io.BytesIO(files["a/cmyk.jpg"])) as im:
        assert im.mode == "CMYK"
    with Image.open(io.BytesIO(files["c/gray16.png"])) as im:
        assert im.mode == "I;16"
    ds = load_dataset(make_zip(tmp_path / "modes.zip", files), settings, channels=3, size=4)
    names = ["cmyk.jpg", "cmyk.tif", "la.png", "la_clear.png", "gray16.png", "rgb16.png"]  # sorted per folder
    px = {name: ds.pixels[i, :, 0, 0] for i, name in enumerate(names)}
    np.testing.assert_allclose(px["cmyk.tif"], [1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(px["cmyk.jpg"], [1, -1, 1], atol=0.05)
    np.testing.assert_allclose(px["la.png"], [128 / 127.5 - 1] * 3, atol=1e-6)
    np.testing.assert_allclose(px["la_clear.png"], [-1, -1, -1], atol=1e-6)
    # 16-bit is scaled to 8 bits (32896 / 257 = 128), not stretched to white.
    np.testing.assert_allclose(px["gray16.png"], [128 / 127.5 - 1] * 3, atol=1e-6)
    np.testing.assert_allclose(px["rgb16.png"], [1, 128 / 127.5 - 1, -1], atol=1e-6)


def test_decompression_bomb_image_is_reported_by_name(tmp_path, settings):
    side = 12_000  # 144M pixels: over PIL's 2 x MAX_IMAGE_PIXELS, yet ~20 kB as a 1-bit PNG
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    bomb = raw_png(side, side, 1, 0, (b"\x00" * (1 + side // 8)) * side)
    assert len(bomb) < 100_000
    url = make_zip(tmp_path / "b.zip", {"a/x.png": png(), "b/bomb.png": bomb})
    with pytest.raises(InvalidDataset, match=r"b/bomb.png \(decompression bomb: .*144000000 pixels"):
        load_dataset(url, settings, channels=1, size=8)


class _SlowServer:
    """A local http server that sends headers at once, then a byte every 0.5 s (or stalls)."""

    def __init__(self, stall: bool):
        import http.server

        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    if stop.wait(5 if stall else 0.5):
                        return
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/d.zip"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("stall", [False, True], ids=["drip", "stall"])
def test_download_time_is_capped_as_a_whole(tmp_path, stall):
    from worker.datasets import fetch

    server = _SlowServer(stall)
    settings = Settings(data_dir=tmp_path, dataset_timeout_s=1.0, allow_private_urls=True)
    started = time.monotonic()
    try:
        with pytest.raises(InvalidDataset, match=r"took longer than 1 s \(DIFFFIT_DATASET_TIMEOUT_S\)"):
            fetch(server.url, settings)
    finally:
        server.close()
    assert time.monotonic() - started < 1.8
