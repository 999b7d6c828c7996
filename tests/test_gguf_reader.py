"""The strict GGUF parser: valid files round-trip; malformed ones fail fast with GGUFError."""
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

from ember.gguf import GGUFError, GGUFFile

SMOL = os.environ.get("EMBER_SMOLLM2_GGUF")
needs_smol = pytest.mark.skipif(not SMOL, reason="EMBER_SMOLLM2_GGUF is not set")


# ------------------------------------------------------------------------- valid files

def write_valid(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.strs", ["a", "", "ü" * 3])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.bools", [True, False])
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.weight": rng.standard_normal(7).astype(np.float16),
        "c.weight": rng.standard_normal((2, 3, 4)).astype(np.float32),
    }
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0)
    w.add_tensor("q.weight", q, raw_dtype=Q.Q8_0)
    tensors["q.weight"] = q
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_round_trip(tmp_path):
    path = tmp_path / "ok.gguf"
    written = write_valid(path)
    with GGUFFile(path) as gf:
        m = gf.metadata
        assert gf.version == 3 and gf.alignment == 32
        assert m["general.architecture"] == "llama"
        assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -5, 60000, -30000)
        assert (m["t.u32"], m["t.i32"]) == (4_000_000_000, -2_000_000_000)
        assert (m["t.u64"], m["t.i64"]) == (2**63 + 5, -(2**62))
        assert m["t.f32"] == float(np.float32(0.1)) and m["t.f64"] == 0.1
        assert m["t.bool"] is True and m["t.str"] == "héllo ✓"
        assert m["t.strs"] == ["a", "", "üüü"]
        assert m["t.ints"] == [1, -2, 3] and m["t.floats"] == [0.5, 1.5]
        assert m["t.bools"] == [True, False] and m["t.nested"] == [[1, 2], [3]]
        assert list(gf.tensors) == ["a.weight", "b.weight", "c.weight", "q.weight"]
        t = gf.tensors
        assert t["a.weight"].shape == (3, 5) and t["a.weight"].qtype == Q.F32
        assert t["b.weight"].shape == (7,) and t["b.weight"].qtype == Q.F16
        assert t["c.weight"].shape == (2, 3, 4)
        assert t["q.weight"].shape == (4, 64) and t["q.weight"].qtype == Q.Q8_0
        assert t["q.weight"].nbytes == 4 * 2 * 34
        for name, arr in written.items():
            raw = gf.raw(name)
            assert raw.dtype == np.uint8 and not raw.flags.writeable
            assert raw.tobytes() == arr.tobytes()
            assert gf.tensors[name].offset % gf.alignment == 0
        # the reference reader agrees on where the data is
        ref = gguf.GGUFReader(str(path))
        for rt in ref.tensors:
            assert rt.data_offset == gf.tensors[rt.name].offset
        with pytest.raises(KeyError):
            gf.raw("nope")


def test_custom_alignment_and_close(tmp_path):
    path = tmp_path / "aligned.gguf"
    written = write_valid(path, alignment=64)
    gf = GGUFFile(path)
    assert gf.alignment == 64
    assert all(t.offset % 64 == 0 for t in gf.tensors.values())
    view = gf.raw("a.weight")
    gf.close()
    assert view.tobytes() == written["a.weight"].tobytes()  # views outlive close()
    with pytest.raises(ValueError, match="closed"):
        gf.raw("a.weight")
    gf.close()  # idempotent


# ------------------------------------------------------------------------- malformed files

def s(x) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32kv(key, v) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", v))


def tinfo(name, ne, qtype=Q.F32, offset=0) -> bytes:
    return (s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<I", qtype) + struct.pack("<Q", offset))


def build(kvs=(), infos=(), data=b"", version=3, n_tensors=None, n_kv=None, magic=b"GGUF",
          version_bytes=None) -> bytes:
    head = (magic + (version_bytes or struct.pack("<I", version))
            + struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(infos))
    return head + b"\0" * (-len(head) % 32) + data


ARCH = kv("general.architecture", V.STRING, s("llama"))
F32_4 = tinfo("w", [4])

MALFORMED = {
    "bad_magic": (build(magic=b"GGML"), "bad magic"),
    "version_99": (build(version=99), "unsupported GGUF version 99"),
    "version_1": (build(version=1), "unsupported GGUF version 1"),
    "big_endian": (build(version_bytes=struct.pack(">I", 3)), "big-endian"),
    "tiny": (b"GGUF\3\0", "too small"),
    "empty": (b"", "too small"),
    "huge_tensor_count": (build([ARCH], n_tensors=2**62), "tensor_count"),
    "huge_kv_count": (build(n_kv=2**64 - 1), "kv_count"),
    "huge_key_length": (build([struct.pack("<Q", 2**60) + b"abc"]), "string length"),
    "huge_value_length": (build([kv("k", V.STRING, struct.pack("<Q", 2**63) + b"x")]),
                          "string length"),
    "huge_array_length": (build([kv("k", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**40))]),
                          "array length"),
    "array_past_end": (build([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 1000) + s("a"))]),
                       "array length"),
    "string_item_past_end": (build([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2)
                                       + s("a") + struct.pack("<Q", 999) + b"\0" * 10)]),
                             "string length"),
    "unknown_value_type": (build([kv("k", 99, b"\0" * 8)]), "unknown value type 99"),
    "unknown_array_type": (build([kv("k", V.ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8)]),
                           "unknown value type 77"),
    "invalid_bool": (build([kv("k", V.BOOL, b"\2")]), "invalid bool"),
    "duplicate_key": (build([u32kv("k", 1), u32kv("k", 2)]), "duplicate metadata key"),
    "bad_utf8_key": (build([kv(b"\xff\xfe", V.UINT32, b"\0" * 4)]), "not valid UTF-8"),
    "deep_array": (build([kv("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 8
                             + struct.pack("<IQ", V.UINT8, 0))]), "nested deeper"),
    "bad_alignment": (build([u32kv("general.alignment", 3)]), "power of two"),
    "zero_alignment": (build([u32kv("general.alignment", 0)]), "power of two"),
    "n_dims_99": (build(infos=[tinfo("w", [1] * 99)], data=b"\0" * 16), "n_dims 99"),
    "n_dims_0": (build(infos=[tinfo("w", [])], data=b"\0" * 16), "n_dims 0"),
    "zero_dim": (build(infos=[tinfo("w", [4, 0])], data=b"\0" * 16), "invalid dim 0"),
    "negative_dim": (build(infos=[tinfo("w", [2**64 - 4])], data=b"\0" * 16), "invalid dim"),
    "overflow_dims": (build(infos=[tinfo("w", [2**40, 2**40])], data=b"\0" * 16),
                      "overflows int64"),
    "huge_tensor": (build(infos=[tinfo("w", [2**20, 2**20])], data=b"\0" * 16),
                    "past the end of file"),
    "unknown_qtype": (build(infos=[tinfo("w", [4], qtype=999)], data=b"\0" * 16),
                      "unknown tensor type 999"),
    "offset_past_end": (build(infos=[tinfo("w", [4], offset=1024)], data=b"\0" * 16),
                        "past the end of file"),
    "misaligned": (build(infos=[tinfo("w", [4], offset=4)], data=b"\0" * 32), "misaligned"),
    "duplicate_tensor": (build(infos=[F32_4, tinfo("w", [4], offset=32)], data=b"\0" * 64),
                         "duplicate tensor name"),
    "overlap": (build(infos=[tinfo("a", [16]), tinfo("b", [4], offset=32)], data=b"\0" * 64),
                "overlap"),
    "row_not_block_multiple": (build(infos=[tinfo("w", [16, 2], qtype=Q.Q4_0)], data=b"\0" * 64),
                               "not a multiple of the Q4_0 block size"),
    "bad_utf8_tensor_name": (build(infos=[tinfo(b"\xc3", [4])], data=b"\0" * 16),
                             "not valid UTF-8"),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed(tmp_path, case):
    blob, problem = MALFORMED[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(blob)
    with pytest.raises(GGUFError, match=problem) as info:
        GGUFFile(path)
    assert str(path) in str(info.value)


def test_builder_makes_valid_files(tmp_path):
    """The malformed cases differ from this valid baseline only in what they name."""
    path = tmp_path / "base.gguf"
    path.write_bytes(build([ARCH, u32kv("general.alignment", 32)],
                           [F32_4, tinfo("x", [32, 2], Q.Q4_0, offset=32)], data=b"\0" * 68))
    with GGUFFile(path) as gf:
        assert gf.tensors["x"].shape == (2, 32) and gf.tensors["x"].nbytes == 36


@pytest.mark.timeout(10)
def test_truncated_everywhere(tmp_path):
    src = tmp_path / "full.gguf"
    write_valid(src)
    blob = src.read_bytes()
    with GGUFFile(src) as gf:
        data_end = max(t.offset + t.nbytes for t in gf.tensors.values())
        header_end = gf.data_offset
    cuts = list(range(0, header_end, 3)) + list(range(header_end, data_end, 17))
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(blob[:cut])
        with pytest.raises(GGUFError):
            GGUFFile(path)


@pytest.mark.timeout(10)
def test_random_corruption_never_crashes(tmp_path):
    src = tmp_path / "full.gguf"
    write_valid(src)
    blob = bytearray(src.read_bytes())
    with GGUFFile(src) as gf:
        header_end = gf.data_offset
    rng = np.random.default_rng(0)
    path = tmp_path / "bad.gguf"
    for _ in range(300):
        bad = bytearray(blob)
        for pos in rng.integers(4, header_end, size=3):
            bad[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(bad))
        try:
            GGUFFile(path).close()
        except GGUFError:
            pass


# ------------------------------------------------------------------------- the real file

@needs_smol
def test_smollm2_parses_fast():
    t0 = time.perf_counter()
    gf = GGUFFile(SMOL)
    elapsed = time.perf_counter() - t0
    with gf:
        assert gf.version == 3 and len(gf.tensors) == 272
        m = gf.metadata
        assert m["general.architecture"] == "llama"
        assert len(m["tokenizer.ggml.tokens"]) == 49152
        assert len(m["tokenizer.ggml.merges"]) == 48900
        assert m["tokenizer.ggml.tokens"][1] == "<|im_start|>"
        assert "<|im_start|>" in m["tokenizer.chat_template"]
        emb = gf.tensors["token_embd.weight"]
        assert emb.shape == (49152, 576) and emb.qtype == Q.Q8_0
        assert gf.tensors["blk.0.attn_k.weight"].shape == (192, 576)
        assert gf.raw("token_embd.weight").nbytes == 49152 * 576 // 32 * 34
    assert elapsed < 1.0, f"parsing took {elapsed:.2f}s"


@needs_smol
@pytest.mark.slow
def test_smollm2_agrees_with_gguf_reader():
    ref = gguf.GGUFReader(SMOL)  # ~2.5 s: the reference reader is slow
    with GGUFFile(SMOL) as gf:
        assert len(ref.tensors) == len(gf.tensors)
        for rt in ref.tensors:
            t = gf.tensors[rt.name]
            assert (t.offset, t.qtype, t.nbytes) == (rt.data_offset, rt.tensor_type, rt.n_bytes)
            assert t.shape == tuple(int(d) for d in reversed(rt.shape))
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            assert gf.metadata[key] == field.contents(), key
