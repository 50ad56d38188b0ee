"""Reading an official ColTran TF checkpoint's tensors, sorting its keys into model variables, EMA shadows,
RMSprop slots (tf_keras 2.x `optimizer/_variables/N` or legacy `.OPTIMIZER_SLOT/optimizer/rms`) and counters,
and matching Keras auto-numbers (`dense_N`, ...) to the ones the checkpoint uses."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coltran.convert.tf_bundle import TFCheckpointReader
from coltran.convert.tf_mapping import TFVariable

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
SLOT_MARK = "/.OPTIMIZER_SLOT/optimizer/"
EMA_SUFFIX = "/ExponentialMovingAverage"
WEIGHT_SOURCES = ("auto", "tf", "npz")
# Scalars of the optimizer object: tf_keras 2.x names, then the legacy OptimizerV2 ones.
ITERATION_KEYS = ("_iterations", "iter")
LEARNING_RATE_KEYS = ("_learning_rate", "learning_rate")
LEGACY_HYPER = ("rho", "momentum", "decay")


def unescape(key: str) -> str:
    """TF object-graph key escaping undone: '..' -> '.', '.S' -> '/'."""
    out, i = [], 0
    while i < len(key):
        if key[i] == "." and i + 1 < len(key) and key[i + 1] in ".S":
            out.append("." if key[i + 1] == "." else "/")
            i += 2
        else:
            out.append(key[i])
            i += 1
    return "".join(out)


def escape(name: str) -> str:
    return name.replace(".", "..").replace("/", ".S")


def variable_key(name: str) -> str:
    """Checkpoint key of the variable `name` (without ':0') saved as an attribute of the root checkpoint."""
    return escape(name + ":0") + VALUE_SUFFIX


def read_tf_variables(path: str | Path, weights_source: str = "auto") -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a TF checkpoint (directory, prefix or .index file) or of an .npz holding the same keys
    (as `tf.train.list_variables` names them), plus a description of what was read."""
    if weights_source not in WEIGHT_SOURCES:
        raise ValueError(f"weights_source must be one of {WEIGHT_SOURCES}, got {weights_source!r}")
    path = Path(path)
    if weights_source == "npz" or (weights_source == "auto" and path.suffix == ".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}, str(path)
    with TFCheckpointReader(path) as reader:
        return reader.read_all(), reader.prefix


@dataclass
class SortedKeys:
    """A checkpoint's tensors by role; variable names are TF names without ':0'."""

    model: dict[str, np.ndarray] = field(default_factory=dict)
    ema: dict[str, np.ndarray] = field(default_factory=dict)
    legacy_slots: dict[str, np.ndarray] = field(default_factory=dict)  # variable name -> rms slot
    indexed_slots: dict[int, np.ndarray] = field(default_factory=dict)  # N of optimizer/_variables/N
    optimizer_scalars: dict[str, np.ndarray] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    @property
    def layout(self) -> str | None:
        """'tf_keras' (index slots), 'legacy' (per-variable slots) or None (no optimizer state)."""
        new = bool(self.indexed_slots) or "_iterations" in self.optimizer_scalars
        old = bool(self.legacy_slots) or "iter" in self.optimizer_scalars
        if new and old:
            return "mixed"
        return "tf_keras" if new else "legacy" if old else None

    def scalar(self, names) -> float | None:
        for name in names:
            if name in self.optimizer_scalars:
                return self.optimizer_scalars[name].item()
        return None


def sort_keys(tensors: dict[str, np.ndarray]) -> SortedKeys:
    out = SortedKeys()
    for key, value in tensors.items():
        if key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH") or key.startswith("save_counter/"):
            continue
        if key.startswith("optimizer/") and key.endswith(VALUE_SUFFIX):
            _sort_optimizer_key(out, key, value)
        elif SLOT_MARK in key:
            var, slot = key.split(SLOT_MARK, 1)
            name = unescape(var)
            if slot == "rms" + VALUE_SUFFIX and name.endswith(":0"):
                out.legacy_slots[name[:-2]] = value
            else:
                out.unexpected.append(key)
        elif key.endswith(VALUE_SUFFIX) and unescape(key[: -len(VALUE_SUFFIX)]).endswith(":0"):
            name = unescape(key[: -len(VALUE_SUFFIX)])[:-2]
            if name.endswith(EMA_SUFFIX):
                out.ema[name[: -len(EMA_SUFFIX)]] = value
            else:
                out.model[name] = value
        else:
            out.unexpected.append(key)
    return out


def _sort_optimizer_key(out: SortedKeys, key: str, value: np.ndarray) -> None:
    inner = key[len("optimizer/"): -len(VALUE_SUFFIX)]
    if inner.startswith("_variables/") and inner[len("_variables/"):].isdigit():
        index = int(inner[len("_variables/"):])
        if index == 0 and value.ndim == 0:  # slot 0 of tf_keras is the iteration counter itself
            return
        out.indexed_slots[index] = value
    elif inner in ITERATION_KEYS + LEARNING_RATE_KEYS + LEGACY_HYPER and value.ndim == 0:
        out.optimizer_scalars[inner] = value
    else:
        out.unexpected.append(key)


AUTO_NAMED = ("dense", "layer_normalization", "conditional_layer_norm", "self_attention_nd", "position_embed",
              "factorized_attention", "gray_scale_encoder", "outer_decoder", "inner_decoder", "col_tran_core",
              "color_upsampler", "spatial_upsampler")


def _auto_family(segments, base: str) -> list[str]:
    """The segments `base`, `base_1`, `base_2`, ... among `segments`, in number order."""
    numbered = {}
    for seg in segments:
        if m := re.fullmatch(rf"{base}(?:_(\d+))?", seg):
            numbered[seg] = int(m.group(1) or 0)
    return sorted(numbered, key=numbered.get)


def align_auto_names(variables: list[TFVariable], found_names) -> list[TFVariable]:
    """Renumber auto-named layers to the numbers a checkpoint actually uses.

    A process that built other layers first shifts every counter (`dense_3` becomes `dense_21`), but keeps their
    order; so for each auto-named family whose count matches, the k-th expected name becomes the k-th name found.
    Families whose count differs are left alone (the mismatch is then reported by the caller).
    """
    expected = {seg for v in variables for seg in v.name.split("/")[:-1]}
    found = {seg for name in found_names for seg in name.split("/")[:-1]}
    rename: dict[str, str] = {}
    for base in AUTO_NAMED:
        want, have = _auto_family(expected, base), _auto_family(found, base)
        if len(want) == len(have) and want != have:
            rename.update(zip(want, have, strict=True))
    if not rename:
        return variables
    return [dataclasses.replace(v, name="/".join(rename.get(seg, seg) for seg in v.name.split("/")[:-1])
                                + "/" + v.name.split("/")[-1]) for v in variables]
