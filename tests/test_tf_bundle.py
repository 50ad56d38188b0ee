"""The pure-Python TF checkpoint reader against the official ColTran fixtures, plus damaged copies of them."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from shared_data import needs_shared_data, require_shared_data

from coltran.convert._sstable import _crc_serial, crc32c, mask_crc, varint
from coltran.convert.tf_bundle import (
    CheckpointFormatError,
    TFCheckpointReader,
    list_variables,
    resolve_checkpoint_prefix,
)

TEST_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "official-coltran-tf" / "test"
FOLDERS = sorted(p.parent.name for p in TEST_DATA.glob("*/ckpt")) or ["(fixtures absent)"]
GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
needs_data = needs_shared_data(TEST_DATA)


def _variables(path: Path) -> dict[str, list[str]]:
    """key -> [shape, dtype or note, ...] from variables*.txt."""
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {row[0]: row[1:] for row in rows}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_crc32c_known_value_and_vectorised_path():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0 and mask_crc(0) == 0xA282EAD8
    rng = np.random.default_rng(0)
    for n in (16384, 16385, 99991, (1 << 20) + 3):  # the lane algorithm, with and without a tail
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc_serial(0xFFFFFFFF, data) ^ 0xFFFFFFFF, n
        assert crc32c(data[n // 3:], crc32c(data[:n // 3])) == crc32c(data), n


@needs_data
@pytest.mark.parametrize("folder", FOLDERS)
def test_reader_matches_weights_npz_and_variables_txt(folder):
    weights = np.load(TEST_DATA / folder / "weights.npz")
    variables = _variables(TEST_DATA / folder / "variables.txt")
    with TFCheckpointReader(TEST_DATA / folder / "ckpt") as reader:
        keys = reader.keys()
        assert keys == sorted(keys, key=lambda k: k.encode())
        assert set(keys) == set(weights.files) | {GRAPH} == set(variables)
        values = reader.read_all()
        assert set(values) == set(weights.files)
        bad = [k for k in weights.files if not _same(values[k], weights[k])]
        assert not bad, f"{len(bad)} tensors differ from weights.npz, e.g. {bad[:3]}"
        for key, (shape, dtype, *_) in variables.items():
            assert (list(reader.shape(key)), reader.dtype(key)) == (json.loads(shape), dtype), key
        graph = reader.read(GRAPH)
    assert graph.shape == () and isinstance(graph[()], bytes)
    missing = [k for k in weights.files if k.encode() not in graph[()]]
    assert not missing, f"object graph blob lacks checkpoint keys {missing[:3]}: strings decoded wrongly"
    listed = list_variables(TEST_DATA / folder / "ckpt")
    assert listed == [(k, reader.shape(k), reader.dtype(k)) for k in keys]


@needs_data
def test_legacy_optimizer_checkpoint():
    folder = TEST_DATA / "color_upsampler"
    weights = np.load(folder / "weights.npz")
    variables = _variables(folder / "variables_legacy_optimizer.txt")
    with TFCheckpointReader(folder / "ckpt_legacy_optimizer") as reader:
        assert set(reader.keys()) == set(variables)
        for key, (shape, *note) in variables.items():
            assert list(reader.shape(key)) == json.loads(shape), key
            if note and note[0] == "same value as weights.npz":
                assert _same(reader.read(key), weights[key]), key
        slots = [k for k in reader.keys() if ".OPTIMIZER_SLOT" in k]
        assert len(slots) == sum(1 for k in weights.files if k.startswith("optimizer/_variables/"))
        for slot in slots:
            variable = slot.split("/.OPTIMIZER_SLOT/")[0] + "/.ATTRIBUTES/VARIABLE_VALUE"
            assert reader.shape(slot) == reader.shape(variable) and reader.dtype(slot) == "float32"
        assert reader.dtype("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE") == "int64"
        assert reader.read("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == weights[
            "save_counter/.ATTRIBUTES/VARIABLE_VALUE"]


@pytest.fixture
def ckpt_copy(tmp_path) -> Path:
    require_shared_data(TEST_DATA)
    target = tmp_path / "ckpt"
    shutil.copytree(TEST_DATA / "color_upsampler" / "ckpt", target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_resolve_checkpoint_prefix(ckpt_copy, tmp_path):
    prefix = str(ckpt_copy / "model-1")
    for given in (ckpt_copy, str(ckpt_copy), prefix, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert resolve_checkpoint_prefix(given) == prefix
    (ckpt_copy / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/train/model-1"\n')
    assert resolve_checkpoint_prefix(ckpt_copy) == prefix  # state file from another machine
    (ckpt_copy / "checkpoint").unlink()
    assert resolve_checkpoint_prefix(ckpt_copy) == prefix  # no state file, a single .index
    with pytest.raises(CheckpointFormatError, match="model-2.index does not exist"):
        resolve_checkpoint_prefix(ckpt_copy / "model-2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="no 'checkpoint' state file and 0"):
        resolve_checkpoint_prefix(tmp_path / "empty")


def test_missing_files(ckpt_copy):
    (ckpt_copy / "checkpoint").write_text('model_checkpoint_path: "model-7"\n')
    with pytest.raises(CheckpointFormatError, match="points to 'model-7'"):
        TFCheckpointReader(ckpt_copy)
    (ckpt_copy / "model-1.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointFormatError, match=r"data file\(s\) missing.*model-1.data-00000-of-00001"):
        TFCheckpointReader(ckpt_copy / "model-1")
    (ckpt_copy / "model-1.index").unlink()
    with pytest.raises(CheckpointFormatError, match="model-1.index does not exist"):
        TFCheckpointReader(ckpt_copy / "model-1")


def test_truncated_data_file(ckpt_copy):
    data = ckpt_copy / "model-1.data-00000-of-00001"
    os.truncate(data, data.stat().st_size // 2)
    with TFCheckpointReader(ckpt_copy) as reader:
        with pytest.raises(CheckpointFormatError, match=r"00001 is truncated: tensor '.+' needs bytes"):
            reader.read_all()
        with pytest.raises(KeyError, match="not a tensor"):
            reader.read("no/such/key")


@pytest.mark.parametrize("target", ["largest float tensor", GRAPH])
def test_corrupted_tensor_byte_fails_its_crc(ckpt_copy, target):
    data_path = ckpt_copy / "model-1.data-00000-of-00001"
    data = bytearray(data_path.read_bytes())
    with TFCheckpointReader(ckpt_copy) as reader:
        if target == GRAPH:
            key, needle = GRAPH, reader.read(GRAPH)[()][100:200]
        else:
            key = max(reader.keys(), key=lambda k: np.prod(reader.shape(k)))
            needle = reader.read(key).tobytes()
    assert data.count(needle) == 1
    data[data.find(needle) + len(needle) // 2] ^= 0x10
    data_path.write_bytes(data)
    with TFCheckpointReader(ckpt_copy) as reader:
        with pytest.raises(CheckpointFormatError, match=f"tensor '{key}': crc32c mismatch"):
            reader.read(key)
        for other in reader.keys():  # the other tensors are untouched and still read
            if other != key:
                reader.read(other)


@pytest.mark.parametrize("keep", [0, 10, 47, 1000, -1, -48])
def test_truncated_index(ckpt_copy, keep):
    index = ckpt_copy / "model-1.index"
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CheckpointFormatError, match="index file is truncated"):
        TFCheckpointReader(ckpt_copy)


def test_corrupted_index_block(ckpt_copy):
    index = ckpt_copy / "model-1.index"
    blob = bytearray(index.read_bytes())
    blob[60] ^= 0x01  # inside the first data block, in a key
    index.write_bytes(blob)
    with pytest.raises(CheckpointFormatError, match="data block at offset 0 fails its crc32c check"):
        TFCheckpointReader(ckpt_copy)


def test_snappy_block_is_refused_clearly(ckpt_copy):
    index = ckpt_copy / "model-1.index"
    blob = bytearray(index.read_bytes())
    footer = len(blob) - 48
    offset, pos = varint(blob, footer, "footer")
    size, _ = varint(blob, pos, "footer")
    blob[offset + size] = 1  # metaindex block type: snappy, with a valid trailer crc
    trailer_crc = mask_crc(crc32c(blob[offset:offset + size + 1]))
    blob[offset + size + 1:offset + size + 5] = trailer_crc.to_bytes(4, "little")
    index.write_bytes(blob)
    with pytest.raises(CheckpointFormatError, match="snappy-compressed"):
        TFCheckpointReader(ckpt_copy)


# ---- a synthetic bundle: several index data blocks, both byte orders, dtypes the fixtures lack ----------
def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, bytes):
        return _uvarint(number << 3 | 2) + _uvarint(len(value)) + value
    return _uvarint(number << 3) + _uvarint(value)


def _table(items: list[tuple[bytes, bytes]], per_block: int = 3) -> bytes:
    """An uncompressed SSTable, `per_block` entries per data block, restart points every 2 entries."""
    out, index = bytearray(), []

    def block(entries):
        body, restarts, last = bytearray(), [], b""
        for i, (key, value) in enumerate(entries):
            shared = 0
            if i % 2:
                while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                    shared += 1
            else:
                restarts.append(len(body))
            body += _uvarint(shared) + _uvarint(len(key) - shared) + _uvarint(len(value))
            body += key[shared:] + value
            last = key
        restarts = restarts or [0]
        body += b"".join(r.to_bytes(4, "little") for r in [*restarts, len(restarts)])
        handle = _uvarint(len(out)) + _uvarint(len(body))
        out.extend(body + b"\0" + mask_crc(crc32c(body + b"\0")).to_bytes(4, "little"))
        return handle

    for start in range(0, len(items), per_block):
        chunk = items[start:start + per_block]
        index.append((chunk[-1][0], block(chunk)))
    metaindex, index_handle = block([]), block(index)
    footer = (metaindex + index_handle).ljust(40, b"\0")
    return bytes(out) + footer + (0xDB4775248B80FB57).to_bytes(8, "little")


def _write_bundle(prefix: Path, tensors: dict, order: str) -> None:
    """tensors: key -> (TF dtype enum, shape, payload bytes in `order`, or a list of bytes for strings)."""
    data, entries = bytearray(), []
    for key, (dtype, shape, payload) in sorted(tensors.items()):
        if isinstance(payload, list):  # strings: varint lengths, masked crc of the lengths, bytes
            crc = 0
            for item in payload:
                crc = crc32c(len(item).to_bytes(4, order), crc)
            length_crc = mask_crc(crc).to_bytes(4, order)
            crc = crc32c(b"".join(payload), crc32c(length_crc, crc))
            payload = b"".join(_uvarint(len(item)) for item in payload) + length_crc + b"".join(payload)
        else:
            crc = crc32c(payload)
        shape_proto = b"".join(_field(2, _field(1, d)) for d in shape)
        entry = _field(1, dtype) + _field(2, shape_proto) + _field(4, len(data)) + _field(5, len(payload))
        entries.append((key.encode(), entry + _uvarint(6 << 3 | 5) + mask_crc(crc).to_bytes(4, "little")))
        data += payload
    header = _field(1, 1) + _field(2, int(order == "big")) + _field(3, _field(1, 1))
    Path(f"{prefix}.index").write_bytes(_table([(b"", header), *entries]))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


@pytest.mark.parametrize("order", ["little", "big"])
def test_synthetic_bundle_dtypes_and_multi_block_index(tmp_path, order):
    bo = "<" if order == "little" else ">"
    expected = {"a/float64": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
                "b/int32": np.array([-3, 0, 9], np.int32), "c/bool": np.array([True, False, True]),
                "d/empty": np.zeros((0, 3), np.float32),
                "e/int64": np.array(-(2**40), np.int64), "f/float16": np.array([0.5, -2], np.float16)}
    enums = {"float64": 2, "int32": 3, "bool": 10, "float32": 1, "int64": 9, "float16": 19}
    tensors = {k: (enums[v.dtype.name], v.shape, v.astype(v.dtype.newbyteorder(bo)).tobytes())
               for k, v in expected.items()}
    bf16 = np.array([1.5, -2.0, 3.140625], np.float32)
    tensors["g/bfloat16"] = (14, (3,), (bf16.view(np.uint32) >> 16).astype(bo + "u2").tobytes())
    tensors["h/strings"] = (7, (2, 2), [b"ab", b"", b"\x00\xffxyz", b"q" * 300])
    _write_bundle(tmp_path / "model-3", tensors, order)
    with TFCheckpointReader(tmp_path / "model-3.index") as reader:
        assert reader.keys() == sorted(tensors) and reader.dtype("g/bfloat16") == "bfloat16"
        for key, value in expected.items():
            assert _same(reader.read(key), value) and reader.dtype(key) == value.dtype.name, key
        assert _same(reader.read("g/bfloat16"), bf16)
        strings = reader.read("h/strings")
        assert strings.shape == (2, 2) and strings.tolist() == [[b"ab", b""], [b"\x00\xffxyz", b"q" * 300]]
