"""Which official TF variable is which parameter of this port, derived from a stage's config.

Replays the official construction order (`models/{colorizer,core,upsampler,layers}.py`) with Keras' per-process
auto-name counters (`dense_N`, `layer_normalization_N`, `conditional_layer_norm_N`, ...) to get every variable's
name and shape, and walks the tracked layers the way Keras orders `model.trainable_variables`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from coltran.configs import ColorizerConfig, ModelConfig

# How a TF array becomes the torch tensor (and back, see `to_torch_layout` / `to_tf_layout`).
LAYOUTS = ("copy", "dense", "heads_in", "heads_out", "spatial", "frozen_ones", "frozen_zeros")


@dataclass(frozen=True)
class TFVariable:
    """One variable of an official model: `name` without ':0', TF `shape`, and the torch parameter it feeds
    (None for the frozen LayerNorm inside a ConditionalLayerNorm, which is not a parameter here)."""

    name: str
    shape: tuple[int, ...]
    torch_name: str | None
    layout: str
    trainable: bool = True


@dataclass
class _Layer:
    """A Keras layer as far as naming and weight order go: its weights' name scope ('' = unscoped), its own
    weights in `add_weight` order and its tracked children in attribute-assignment order."""

    scope: str
    weights: list[TFVariable] = field(default_factory=list)
    children: list[_Layer | None] = field(default_factory=list)

    def add(self, weight: str, shape, torch_name: str | None, layout: str, trainable: bool = True) -> _Layer:
        name = f"{self.scope}/{weight}" if self.scope else weight
        self.weights.append(TFVariable(name, tuple(int(s) for s in shape), torch_name, layout, trainable))
        return self

    def variables(self) -> list[TFVariable]:
        """Own weights first, then each child's, depth first: the order of Keras `layer.weights`."""
        out = list(self.weights)
        for child in self.children:
            if child is not None:
                out += child.variables()
        return out


class _Namer:
    """Keras' auto-names in a fresh process: the k-th unnamed layer of class `base` is `base` then `base_k`."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def __call__(self, base: str) -> str:
        k = self.counts[base]
        self.counts[base] += 1
        return base if k == 0 else f"{base}_{k}"


def _join(scope: str, name: str) -> str:
    return f"{scope}/{name}" if scope else name


def _dense(scope: str, n_in: int, n_out: int, torch_prefix: str, bias: bool = True) -> _Layer:
    layer = _Layer(scope).add("kernel", (n_in, n_out), f"{torch_prefix}.weight", "dense")
    return layer.add("bias", (n_out,), f"{torch_prefix}.bias", "copy") if bias else layer


def _table(scope: str, n_in: int, n_out: int, torch_name: str) -> _Layer:
    """A Dense applied to one-hot inputs: its kernel is the torch embedding table as it is."""
    return _Layer(scope).add("kernel", (n_in, n_out), torch_name, "copy")


def _layer_norm(scope: str, d: int, torch_prefix: str) -> _Layer:
    layer = _Layer(scope).add("gamma", (d,), f"{torch_prefix}.weight", "copy")
    return layer.add("beta", (d,), f"{torch_prefix}.bias", "copy")


def _position_embed(scope: str, height: int, width: int, d: int, torch_prefix: str) -> _Layer:
    layer = _Layer(scope).add("position_embedding_0", (height, 1, d), f"{torch_prefix}.row", "copy")
    return layer.add("position_embedding_1", (width, d), f"{torch_prefix}.column", "copy")


def _feed_forward(namer: _Namer, d: int, ff: int, torch_prefix: str) -> _Layer:
    """The official `tf.keras.Sequential([Dense(ff, relu), Dense(d)])`: its Dense variables are unscoped."""
    fc1 = _dense(namer("dense"), d, ff, f"{torch_prefix}.fc1")
    fc2 = _dense(namer("dense"), ff, d, f"{torch_prefix}.fc2")
    return _Layer("", children=[fc1, fc2])


def _attention(cfg, scope: str, axis: str, torch_prefix: str, cond_size: int | None = None) -> _Layer:
    """`SelfAttentionND` along one axis. Tracked in build order: q, k, v, output, relative bias, then the
    conditional projections in the order cond_k, cond_q, cond_v."""
    d, h = cfg.hidden_size, cfg.num_heads
    c = d // h
    height, width = cfg.resolution
    axis_index, length = (1, width) if axis == "row" else (0, height)
    children = [_Layer(_join(scope, n)).add("kernel", (d, h, c), f"{torch_prefix}.{n}.weight", "heads_in")
                for n in ("q", "k", "v")]
    children.append(_Layer(_join(scope, "output")).add("kernel", (h, c, d), f"{torch_prefix}.out.weight",
                                                       "heads_out"))
    children.append(_Layer(scope).add(f"relative_attention_bias_{axis_index}", (h, 2 * length),
                                      f"{torch_prefix}.rel_bias", "copy"))
    if cond_size is not None:
        width_c = 2 * c if cfg.cond_att_scale else c
        for n in ("k", "q", "v"):
            if getattr(cfg, f"cond_att_{n}"):
                children.append(_Layer(_join(scope, f"cond_{n}")).add(
                    "kernel", (cond_size, h, width_c), f"{torch_prefix}.cond_{n}.weight", "heads_in"))
    return _Layer(scope, children=children)


def _factorized_attention(cfg, namer: _Namer, scope: str, torch_prefix: str) -> _Layer:
    """`FactorizedAttention.build`: position embedding, 4L LayerNorms, then per layer row att, FF, col att, FF."""
    d, ff = cfg.hidden_size, cfg.ff_size
    height, width = cfg.resolution
    pos = _position_embed(_join(scope, namer("position_embed")), height, width, d, f"{torch_prefix}.pos_embed")
    norms = [_layer_norm(_join(scope, namer("layer_normalization")), d, f"{torch_prefix}.norms.{i}")
             for i in range(4 * cfg.num_encoder_layers)]
    residual = []
    for layer in range(cfg.num_encoder_layers):
        sub = f"{torch_prefix}.sublayers.{4 * layer}"
        residual.append(_attention(cfg, _join(scope, namer("self_attention_nd")), "row", sub))
        residual.append(_feed_forward(namer, d, ff, f"{torch_prefix}.sublayers.{4 * layer + 1}"))
        sub = f"{torch_prefix}.sublayers.{4 * layer + 2}"
        residual.append(_attention(cfg, _join(scope, namer("self_attention_nd")), "column", sub))
        residual.append(_feed_forward(namer, d, ff, f"{torch_prefix}.sublayers.{4 * layer + 3}"))
    return _Layer(scope, children=[pos, *residual, *norms])


def _norms(cfg: ColorizerConfig, namer: _Namer, scope: str, torch_prefix: str, count: int) -> list[_Layer]:
    """A decoder's normalisers, named when the decoder is built: ConditionalLayerNorms (their Dense is named
    later, at their first call: see `_finish_cond_norms`) or plain trainable LayerNorms."""
    if not cfg.cond_ln:
        return [_layer_norm(_join(scope, namer("layer_normalization")), cfg.hidden_size, f"{torch_prefix}.{i}")
                for i in range(count)]
    height, width = cfg.resolution
    out = []
    for i in range(count):
        cln_scope = _join(scope, namer("conditional_layer_norm"))
        frozen = _Layer(_join(cln_scope, "normalize"))
        frozen.add("gamma", (cfg.hidden_size,), None, "frozen_ones", trainable=False)
        frozen.add("beta", (cfg.hidden_size,), None, "frozen_zeros", trainable=False)
        cln = _Layer(cln_scope, children=[frozen])
        if cfg.cond_ln_sp_ave == "learnable":
            cln.add("spatial_average", (1, height, width, 1), f"{torch_prefix}.{i}.spatial_weights", "spatial")
        out.append(cln)
    return out


def _finish_cond_norms(cfg: ColorizerConfig, namer: _Namer, norms: list[_Layer], torch_prefix: str) -> None:
    """Each ConditionalLayerNorm creates its [scale | shift] Dense (D -> 2D, on z) when first called."""
    if cfg.cond_ln:
        d = cfg.hidden_size
        for i, cln in enumerate(norms):
            cln.children.append(_dense(_join(cln.scope, namer("dense")), d, 2 * d, f"{torch_prefix}.{i}.proj"))


def _cmlp(cfg: ColorizerConfig, scope: str, which: str, layer: int, cond_size: int, torch_prefix: str) -> _Layer:
    d = cfg.hidden_size
    name = f"{cfg.cond_mlp}_{which}_{layer}"  # affine_r_0, shift_c_1, ...
    return _dense(_join(scope, name), cond_size, 2 * d if cfg.cond_mlp == "affine" else d, torch_prefix)


def _decoder_children(cfg, pos, residual, norms, cmlps) -> list[_Layer]:
    """Tracking order of a decoder's attributes; with cond_ln off the official code reassigns `layer_norms`,
    which Keras untracks and tracks again after `cmlp_layers`."""
    return [pos, *residual, *norms, *cmlps] if cfg.cond_ln else [pos, *residual, *cmlps, *norms]


def _outer_decoder(cfg: ColorizerConfig, namer: _Namer, scope: str) -> _Layer:
    d, ff = cfg.hidden_size, cfg.ff_size
    height, width = cfg.resolution
    pos = _position_embed(_join(scope, namer("position_embed")), height, width, d, "outer_decoder.pos_embed")
    norms = _norms(cfg, namer, scope, "outer_decoder.norms", 4 * cfg.num_outer_layers)
    residual, cmlps = [], []
    for layer in range(cfg.num_outer_layers):
        residual.append(_attention(cfg, _join(scope, f"unmask_row_att_{layer}"), "row",
                                   f"outer_decoder.row_attns.{layer}", cond_size=d))
        residual.append(_feed_forward(namer, d, ff, f"outer_decoder.row_ffs.{layer}"))
        residual.append(_attention(cfg, _join(scope, f"mask_col_att_{layer}"), "column",
                                   f"outer_decoder.col_attns.{layer}", cond_size=d))
        residual.append(_feed_forward(namer, d, ff, f"outer_decoder.col_ffs.{layer}"))
        cmlps.append(_cmlp(cfg, scope, "r", layer, d, f"outer_decoder.row_cmlps.{layer}.proj"))
        cmlps.append(_cmlp(cfg, scope, "c", layer, d, f"outer_decoder.col_cmlps.{layer}.proj"))
    _finish_cond_norms(cfg, namer, norms, "outer_decoder.norms")
    return _Layer(scope, children=_decoder_children(cfg, pos, residual, norms, cmlps))


def _inner_decoder(cfg: ColorizerConfig, namer: _Namer, scope: str) -> _Layer:
    d, ff = cfg.hidden_size, cfg.ff_size
    height, width = cfg.resolution
    pos = _position_embed(_join(scope, namer("position_embed")), height, width, d, "inner_decoder.pos_embed")
    norms = _norms(cfg, namer, scope, "inner_decoder.norms", 2 * cfg.num_inner_layers)
    residual, cmlps = [], []
    for layer in range(cfg.num_inner_layers):
        residual.append(_attention(cfg, _join(scope, f"mask_row_att_{layer}"), "row",
                                   f"inner_decoder.attns.{layer}", cond_size=2 * d))
        residual.append(_feed_forward(namer, d, ff, f"inner_decoder.ffs.{layer}"))
        cmlps.append(_cmlp(cfg, scope, "c", layer, 2 * d, f"inner_decoder.cmlps.{layer}.proj"))
    _finish_cond_norms(cfg, namer, norms, "inner_decoder.norms")
    return _Layer(scope, children=_decoder_children(cfg, pos, residual, norms, cmlps))


def _colorizer(cfg: ColorizerConfig, namer: _Namer) -> _Layer:
    """`ColTranCore.build` names its sublayers; its first call then builds the encoder and both decoders."""
    d = cfg.hidden_size
    root = namer("col_tran_core")
    encoder_scope = _join(root, namer("gray_scale_encoder"))
    parallel = None
    if cfg.model_stage == "encoder_decoder":
        parallel = _dense(_join(root, "parallel_logits"), d, 512, "parallel_dense", bias=False)
    pixel = _table(_join(root, namer("dense")), 512, d, "pixel_embed.weight")
    outer_scope, inner_scope = _join(root, namer("outer_decoder")), _join(root, namer("inner_decoder"))
    final_dense = _dense(_join(root, "auto_logits"), d, 512, "final_dense")
    final_norm = _layer_norm(_join(root, namer("layer_normalization")), d, "final_norm")
    embed = _table(_join(encoder_scope, namer("dense")), 256, d, "encoder.embedding.weight")  # with a bias
    embed.add("bias", (d,), "encoder.embedding_bias", "copy")
    stack = _factorized_attention(cfg, namer, _join(encoder_scope, namer("factorized_attention")),
                                  "encoder.encoder")
    encoder = _Layer(encoder_scope, children=[embed, stack])
    outer = _outer_decoder(cfg, namer, outer_scope)
    inner = _inner_decoder(cfg, namer, inner_scope)
    return _Layer(root, children=[encoder, parallel, pixel, outer, inner, final_dense, final_norm])


def _upsampler(cfg, namer: _Namer, model_name: str, token_classes: int) -> _Layer:
    """Colour / spatial upsampler `build`: token table, gray table, input Dense, encoder stack, final Dense."""
    d = cfg.hidden_size
    root = namer(model_name)
    token = _table(_join(root, namer("dense")), token_classes, d, "token_embed.weight")
    gray = _table(_join(root, namer("dense")), 256, d, "gray_embed.weight")
    input_dense = _dense(_join(root, namer("dense")), 2 * d, d, "input_dense")
    encoder_scope = _join(root, namer("factorized_attention"))
    final_dense = _dense(_join(root, namer("dense")), d, 256, "final_dense")
    encoder = _factorized_attention(cfg, namer, encoder_scope, "encoder")
    return _Layer(root, children=[token, gray, input_dense, encoder, final_dense])


def official_variables(cfg: ModelConfig) -> list[TFVariable]:
    """Every variable of the official model for `cfg`, as named in a fresh process, in Keras weight order (so
    the trainable ones are in `model.trainable_variables` order, which indexes the optimizer's slots)."""
    cfg.validate()
    namer = _Namer()
    if cfg.stage == "colorizer":
        root = _colorizer(cfg, namer)
    elif cfg.stage == "color_upsampler":
        root = _upsampler(cfg, namer, "color_upsampler", 3 * 8)
    else:
        root = _upsampler(cfg, namer, "spatial_upsampler", 3 * 256)
    return root.variables()


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A TF array (or a slot of the same shape) in the layout of its torch parameter."""
    if layout == "copy":
        return array
    if layout == "dense":  # Keras (in, out) -> Linear (out, in)
        return array.T
    if layout == "heads_in":  # DenseND (Din, h, X) -> Linear(Din, h*X).weight
        return array.reshape(array.shape[0], -1).T
    if layout == "heads_out":  # DenseND (h, C, D) contracting (h, C) -> Linear(h*C, D).weight
        return array.reshape(-1, array.shape[-1]).T
    if layout == "spatial":  # (1, H, W, 1) -> (H, W)
        return array[0, :, :, 0]
    raise ValueError(f"layout {layout!r} has no torch counterpart; expected one of {LAYOUTS[:5]}")


def to_tf_layout(array: np.ndarray | None, var: TFVariable) -> np.ndarray:
    """Inverse of `to_torch_layout` for `var` (exports a torch model under the official names)."""
    if var.layout in ("frozen_ones", "frozen_zeros"):
        return (np.ones if var.layout == "frozen_ones" else np.zeros)(var.shape, np.float32)
    if var.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {var.layout!r}; expected one of {LAYOUTS}")
    return (array.T if var.layout in ("dense", "heads_in", "heads_out") else array).reshape(var.shape)
