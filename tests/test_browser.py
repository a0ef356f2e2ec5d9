"""The verdict page in a real browser: headless Chromium renders it (a screenshot that is not
blank, in the failure's red) and its DOM holds the verdict and every layer.

Skipped where no `chromium` is on PATH (Debian/Ubuntu: `apt-get install chromium`). With
`LINCONVERT_SCREENSHOT=1` the screenshot is also saved as tests/screenshots/verdict-failed.png,
the one the README shows.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
from tests.conftest import FIXTURES

CHROMIUM = shutil.which("chromium")
SCREENSHOT = Path(__file__).resolve().parent / "screenshots" / "verdict-failed.png"
MODELS = FIXTURES / "models.py"
WINDOW = (1040, 940)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (install it "
                                "with `apt-get install chromium` to run the browser test)")


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """(width, height, pixels) of an 8-bit RGB or RGBA PNG, decoded with zlib and struct."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    pixels: list[tuple[int, ...]] = []
    for y in range(height):
        line = raw[y * (stride + 1):(y + 1) * (stride + 1)]
        kind, row = line[0], bytearray(line[1:])
        for i in range(stride):  # undo the PNG filter of this scanline
            a = row[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            if kind == 1:
                row[i] = (row[i] + a) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + b) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) \
                    & 0xFF
        pixels += [tuple(row[x:x + 3]) for x in range(0, stride, channels)]
        previous = row
    return width, height, pixels


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, timeout=120,
                          check=False)


@pytest.fixture
def failed_page(fixture_dir, tmp_path):
    """The page of a failed whole-model verification: DST edited after conversion."""
    src = fixture_dir / "mlp_param.pt"
    dst = fixture_dir / "mlp_param.linear.safetensors"
    convert.to_linear(src, dst)
    with safe_open(dst, "pt") as f:
        meta = f.metadata()  # its provenance kept: the per-layer checks run too
    t = load_file(dst)
    t["fc2.weight"][0, 0] += 0.01
    tampered = fixture_dir / "tampered.safetensors"
    save_file(t, str(tampered), metadata=meta)
    page = tmp_path / "verdict.html"
    report = convert.verify(src, tampered, source_model=f"{MODELS}:build_param_mlp",
                            target_model=f"{MODELS}:build_linear_mlp", input_shape=[(8, 4)],
                            reference="float64", html=page)
    assert not report.equivalent
    return page


def test_chromium_renders_the_failed_verdict(failed_page, tmp_path):
    shot = tmp_path / "shot.png"
    proc = chromium(f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    failed_page.as_uri(), tmp=tmp_path)
    assert shot.exists(), proc.stderr.decode(errors="replace")[-2000:]
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == WINDOW
    colours = set(pixels)
    assert len(colours) > 50, f"{len(colours)} colours: the page rendered blank"
    white = sum(p == (255, 255, 255) for p in pixels)
    assert white < 0.95 * len(pixels)
    red = sum(r > 150 and g < 90 and b < 90 for r, g, b in pixels)
    assert red > 200, "no failure red on the page (verdict banner, failing bars)"
    if os.environ.get("LINCONVERT_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_chromium_dom_holds_the_verdict_and_every_layer(failed_page, tmp_path):
    proc = chromium("--dump-dom", failed_page.as_uri(), tmp=tmp_path)
    dom = proc.stdout.decode()
    assert "NOT equivalent" in dom
    for name in ("fc1.weight", "fc2.weight", "output[0]"):
        assert name in dom
    assert 'class="fail"' in dom
