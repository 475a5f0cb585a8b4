#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/seeds/<harness>/ (run once, results committed).

Each seed is a few hundred bytes to a few KB, in the input layout its harness documents (most
harnesses take a leading selector byte). Image seeds are cut from the test fixtures and saved
in every format and pixel layout qscore decodes. Needs Pillow and numpy (e.g. in a venv).
Usage: python3 fuzz/make_seeds.py
"""
import base64
import io
import json
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

fuzz = pathlib.Path(__file__).parent
fixtures = fuzz.parent / "tests" / "fixtures"
seeds = fuzz / "seeds"


def write(harness, name, data):
    d = seeds / harness
    d.mkdir(parents=True, exist_ok=True)
    assert len(data) <= 4096, (harness, name, len(data))
    (d / name).write_bytes(data)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(w, h, depth, colour, rows):
    """A PNG written chunk by chunk (Pillow cannot write 16-bit RGB)."""
    raw = b"".join(b"\x00" + r for r in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


# --- image: byte 0 even = ImageNet RGB preprocessing, odd = greyscale 28x28 ---------------
photo = Image.open(fixtures / "photos" / "chelsea.png").convert("RGB")
small = photo.resize((24, 16), Image.BILINEAR)          # landscape, RGB
tall = photo.crop((100, 0, 300, 300)).resize((10, 15))  # portrait
grey = Image.open(sorted((fixtures / "fmnist" / "bag").glob("*.png"))[0]).convert("L")  # 28x28
RGB, GREY = b"\x00", b"\x01"
images = {
    "jpeg_rgb.jpg": (RGB, encode(small, "JPEG", quality=80)),
    "jpeg_grey.jpg": (GREY, encode(grey, "JPEG", quality=80)),
    "jpeg_progressive.jpg": (RGB, encode(tall, "JPEG", quality=70, progressive=True)),
    "jpeg_cmyk.jpg": (RGB, encode(small.convert("CMYK"), "JPEG", quality=70)),
    "png_rgb8.png": (RGB, encode(small, "PNG")),
    "png_grey8.png": (GREY, encode(grey, "PNG")),
    "png_rgba8.png": (RGB, encode(tall.convert("RGBA"), "PNG")),
    "png_palette.png": (GREY, encode(small.quantize(16), "PNG")),
    "png_grey16.png": (GREY, encode(Image.fromarray(
        np.asarray(grey, dtype="uint16") * 257), "PNG")),
    "gif_palette.gif": (RGB, encode(small.quantize(32), "GIF")),
    "gif_animated.gif": (GREY, encode(tall.quantize(8), "GIF", save_all=True,
                                      append_images=[tall.rotate(90).quantize(8)], duration=10, loop=0)),
    "bmp_rgb24.bmp": (RGB, encode(tall, "BMP")),
    "bmp_palette8.bmp": (GREY, encode(grey.quantize(16), "BMP")),
    "webp_lossy.webp": (RGB, encode(small, "WEBP", quality=60)),
    "webp_lossless_alpha.webp": (GREY, encode(tall.convert("RGBA"), "WEBP", lossless=True)),
    "tiff_raw.tiff": (RGB, encode(tall, "TIFF")),
    "tiff_lzw_grey.tiff": (GREY, encode(grey, "TIFF", compression="tiff_lzw")),
    "tiff_deflate.tiff": (RGB, encode(tall, "TIFF", compression="tiff_adobe_deflate")),
}
# 16-bit RGB PNG, and a JPEG with EXIF orientation 6 (pixels stored sideways).
a16 = (np.asarray(tall, dtype=np.uint16) * 257).astype(">u2")
images["png_rgb16.png"] = (RGB, png_raw(a16.shape[1], a16.shape[0], 16, 2, [r.tobytes() for r in a16]))
exif = Image.Exif()
exif[0x0112] = 6
images["jpeg_exif6.jpg"] = (GREY, encode(small.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=60,
                                         exif=exif.tobytes()))
# Large enough for a reduced-scale decode (`jpeg_dct_scaling`, selector bit 1): 1/8 of 240x232
# still covers 28x28. (ImageNet's 256 would need a 2048-pixel JPEG, past a seed's size.)
REDUCED_GREY = b"\x03"
images["jpeg_reduced_grey.jpg"] = (REDUCED_GREY, encode(grey.resize((240, 232), Image.BILINEAR), "JPEG", quality=20))
images["jpeg_reduced_rgb_exif6.jpg"] = (REDUCED_GREY, encode(photo.resize((240, 232), Image.BILINEAR), "JPEG",
                                                              quality=10, exif=exif.tobytes()))
for name, (choice, data) in images.items():
    write("image", name, choice + data)

# --- multipart_and_json_batch: byte 0 = (max_images - 1) << 4 | content-type mode ----------
png = encode(grey.resize((8, 8)), "PNG")
b64 = base64.b64encode(png).decode()


def part(name, filename, data, ctype="image/png"):
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--XyZ\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"


MP, JS, RAW, CT = 0, 1, 2, 3
write("multipart_and_json_batch", "multipart_one", bytes([3 << 4 | MP]) + part("image", "a.png", png) + b"--XyZ--\r\n")
write("multipart_and_json_batch", "multipart_two_noname",
      bytes([3 << 4 | MP]) + part("image", "a.png", png) + part("image", None, b"xyz") + b"--XyZ--\r\n")
write("multipart_and_json_batch", "multipart_wrong_field",
      bytes([3 << 4 | MP]) + part("file", "a.png", b"x") + b"--XyZ--\r\n")
write("multipart_and_json_batch", "json_one",
      bytes([3 << 4 | JS]) + json.dumps({"images": [{"id": "a", "data": b64}]}).encode())
write("multipart_and_json_batch", "json_three",
      bytes([3 << 4 | JS]) + json.dumps({"images": [{"id": "a", "data": "eA=="}, {"data": "eHk="},
                                                    {"id": "bad", "data": "!!"}]}).encode())
write("multipart_and_json_batch", "raw_png", bytes([RAW]) + png)
write("multipart_and_json_batch", "ct_multipart_quoted",
      bytes([3 << 4 | CT]) + b'Multipart/Form-Data; charset=utf-8; boundary="XyZ"\n'
      + part("image", "b.png", b"abc") + b"--XyZ--\r\n")
# Case-insensitive parameter names, filename* (RFC 8187), escaped and %22 quotes, no
# Content-Type, uppercase Boundary= in the request's content type.
write("multipart_and_json_batch", "multipart_disposition_forms",
      bytes([3 << 4 | CT]) + b'multipart/form-data; Boundary="XyZ"\n' + b"preamble\r\n"
      + b'--XyZ\r\nContent-Disposition: Form-Data; Name="image"; FileName="A.PNG"\r\n\r\n' + png + b"\r\n"
      + b"--XyZ\r\ncontent-disposition: form-data ; name = image ; filename*=UTF-8''%C3%BC%20b.png\r\n\r\nx\r\n"
      + b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a\\"b%22c.png"\r\n'
      + b"Content-Type: application/octet-stream\r\n\r\ny\r\n--XyZ--\r\nepilogue")
write("multipart_and_json_batch", "ct_json_charset",
      bytes([3 << 4 | CT]) + b"application/json; charset=utf-8\n" + b'{"images":[{"id":"x","data":"eA=="}]}')
write("multipart_and_json_batch", "ct_octet_stream", bytes([CT]) + b"application/octet-stream\n" + png[:64])

# --- kserve: byte 0 = (max_images - 1) << 4 | header mode ------------------------------------
NONE, U16, TEXT, BACK = 0, 1, 2, 3


def infer(shape, data=None, params=None, **extra):
    t = {"name": "image", "shape": shape, "datatype": "BYTES"}
    if data is not None:
        t["data"] = data
    if params is not None:
        t["parameters"] = params
    return json.dumps({"inputs": [t], **extra}, separators=(",", ":")).encode()


write("kserve", "json_one", bytes([3 << 4 | NONE]) + infer([1], ["eA=="]))
write("kserve", "json_nested", bytes([3 << 4 | NONE]) + infer([2, 1], [["eA=="], ["eA=="]]))
write("kserve", "json_outputs_id", bytes([3 << 4 | NONE]) + infer(
    [1], [b64], id="req-1", outputs=[{"name": "q_score"}, {"name": "embedding"}]))
elems = struct.pack("<I", 1) + b"x" + struct.pack("<I", 2) + b"yz"
head = infer([2], params={"binary_data_size": len(elems)})
write("kserve", "binary_u16", bytes([3 << 4 | U16]) + struct.pack("<H", len(head)) + head + elems)
write("kserve", "binary_text", bytes([3 << 4 | TEXT]) + str(len(head)).encode() + b"\n" + head + elems)
write("kserve", "binary_back", bytes([3 << 4 | BACK, len(elems)]) + head + elems)
one = struct.pack("<I", len(png)) + png
head1 = infer([1], params={"binary_data_size": len(one), "binary_data": True})
write("kserve", "binary_png", bytes([U16]) + struct.pack("<H", len(head1)) + head1 + one)

# --- labelstudio: a /predict body; after a NUL, two references split by another NUL ----------
def predict(images, **extra):
    tasks = [{"id": i + 1, "data": {"image": im}} for i, im in enumerate(images)]
    return json.dumps({"tasks": tasks, "label_config": "<View/>", "project": "1.1", **extra}).encode()


write("labelstudio", "predict_one", predict(["/data/upload/1/a.png"]))
write("labelstudio", "predict_many", predict(
    ["/data/upload/1/a.png", "http://ls.local:8080/data/local-files/?d=x.png",
     "https://images.example.com/cat.png", "//evil.example/x.png", "data/upload/2/b.jpg"]))
write("labelstudio", "predict_fixture_like", json.dumps({
    "tasks": [{"id": "t-1", "data": {"caption": "a cat", "image": "/data/upload/7/cat.png"}, "meta": {},
               "annotations": [], "predictions": [], "project": 7},
              {"id": 2.5, "data": {"url": "/storage/x.png", "n": [1, {"a": None}]}}],
    "label_config": "<View><Image name=\"image\" value=\"$image\"/></View>",
    "project": "7.1700000000", "params": {"login": None}}).encode())
write("labelstudio", "refs", b"{}\x00/data/upload/1/a.png\x00http://ls.local:8080/../../x")
write("labelstudio", "refs_tricky", b"\x00http://ls.local:8080@evil.example/\x00\\\\evil.example\\x")

# The label config names the image fields ($photo beside a caption, several tags, valueList);
# the part before the first NUL is also parsed as a label config on its own.
write("labelstudio", "predict_label_config", json.dumps({
    "tasks": [{"id": 1, "data": {"caption": "a cat on a blanket", "photo": "/data/upload/1/cat.png"}},
              {"id": 2, "data": {"caption": "no photo"}},
              {"id": 3, "data": {"front": "s3://bucket/a.png", "pages": ["gs://b/p1.png", 7, "data:image/png;base64,iVBORw0KGgo="]}}],
    "label_config": "<View><Text name=\"cap\" value=\"$caption\"/><Image name=\"img\" value=\"$photo\"/>"
                    "<image name=\"f\" VALUE=\"$front\"/><Image name=\"p\" valueList=\"$pages\"/></View>",
    "project": "1.1700000000"}).encode())
write("labelstudio", "predict_project_object", json.dumps({
    "tasks": [{"id": 4, "data": {"photo": "/data/upload/../../api/projects"}}],
    "project": {"id": 3, "label_config": "<View><Image name=\"i\" value=\"$photo\"/></View>"}}).encode())
write("labelstudio", "config_raw", b"<View><Image name=\"i\" value=\"$photo\"/><Image name=\"r\" value=\"$items[{{idx}}].url\"/></View>"
      b"\x00/data/upload/%2e%2e/api/projects\x00s3://bucket/cat.png")
write("labelstudio", "config_doctype", b"<!DOCTYPE v [<!ENTITY a \"&#38;a;\">]><View>&a;</View>\x00/data/local-files/?d=../x\x00"
      b"/tasks/1/presign/?fileuri=czM6Ly9iL2E=")
write("labelstudio", "config_deep", b"<V>" * 80 + b"<Image value=\"$x\"/>" + b"</V>" * 80)

# --- api_keys: byte 0 = header mode; key file text, NUL, the presented part ------------------
BEARER, BASIC_ENC, BASIC_RAW, PLAIN = 0, 1, 2, 3
keys = b"# qscore API keys\nk-0123456789abcdef\n\n  spaced-key  \n#disabled-key\n"
write("api_keys", "bearer_ok", bytes([BEARER]) + keys + b"\x00k-0123456789abcdef")
write("api_keys", "bearer_spaced", bytes([BEARER]) + keys + b"\x00 spaced-key \t")
write("api_keys", "bearer_comment", bytes([BEARER]) + keys + b"\x00#disabled-key")
write("api_keys", "basic_encoded", bytes([BASIC_ENC]) + keys + b"\x00labelstudio:k-0123456789abcdef")
write("api_keys", "basic_raw", bytes([BASIC_RAW]) + keys + b"\x00"
      + base64.b64encode(b"user:spaced-key"))
write("api_keys", "plain", bytes([PLAIN]) + b"a\r\nb\x00Token a")
write("api_keys", "scheme_lower_spaces", bytes([PLAIN]) + keys + b"\x00bearer    k-0123456789abcdef")
write("api_keys", "key_not_ascii", bytes([BEARER]) + "ok\ncl\u00e9\n".encode() + b"\x00ok")

# --- explain: dim - 2 (u16), max_features - 1, patch, stride (u16, 0xFFFF absent), input side ---
def explain(name, dim, max_features, patch, stride, side, text):
    write("explain", name, struct.pack("<HBHHB", dim - 2, max_features - 1, patch, stride, side) + text.encode())


ABSENT = 0xFFFF
explain("list", 128, 16, ABSENT, ABSENT, 0, "3, 17,42")
explain("discriminative", 1280, 16, 32, 16, 1, "discriminative")
explain("active", 128, 4, 4, 2, 0, "active")
explain("duplicate", 128, 16, 7, 7, 0, "1,1")
explain("odd_stride", 64, 2, 4, 3, 9, "0,63")
explain("too_many", 128, 2, 1, 1, 1, "1,2,3")
print("seeds written")
