"""Image bytes -> the JPEG bytes a shard stores, with a cheap full-stream check of valid JPEGs.

A valid RGB JPEG keeps its original bytes. It is checked by a 1/8-scale *draft* decode
(`Image.draft("RGB", (w // 8, h // 8))` makes libjpeg scale the DCT by 1/8): libjpeg still
Huffman-decodes every entropy-coded byte of every scan, so a file cut short ("image file is
truncated") or with garbage inside the scan data ("broken data stream") raises, while the inverse
DCT, upsampling and colour conversion run on 1/64 of the pixels. What libjpeg reports only as a
warning (and Pillow does not surface) passes: zeroed blocks or flipped bits inside the entropy-coded
data that still form valid Huffman codes, or a truncated file that happens to end with an EOI
marker. The training reader skips (and counts) any sample it cannot decode.

Everything else that Pillow can open (CMYK or grayscale JPEGs, PNG, GIF, ... under any name) is
converted to RGB (transparency composited on white) and re-encoded as JPEG quality 95.
"""

from __future__ import annotations

import io

from PIL import Image

REENCODE_QUALITY = 95
VERIFY_MODES = ("decode", "header")


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow can decode (the message says why)."""


def prepare_jpeg(data: bytes, reencode: bool = False, verify: str = "decode") -> tuple[bytes, bool]:
    """Return (JPEG bytes, re-encoded?) for an image file's bytes; UnreadableImage if undecodable.

    verify="decode": check a valid RGB JPEG with the 1/8-scale draft decode (module docstring).
    verify="header": trust a JPEG whose header parses and whose bytes end with the EOI marker
    (not truncated) and draft-decode only the others; damage inside the entropy-coded data then
    reaches the training reader, which skips and counts such samples.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG" and im.mode == "RGB" and not reencode:
            if verify == "header" and data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
                return data, False
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return data, False
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))  # composite on white, not on black
        else:
            rgb = im.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return buf.getvalue(), True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
