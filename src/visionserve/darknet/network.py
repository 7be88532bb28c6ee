"""A darknet cfg as a list of layers with their output shapes, inputs and parameter counts.

This is the shape-checking pass: every section is validated here (options, sizes, layer
references), so that the ONNX builder only translates. Layer indices count sections after
``[net]`` from 0, as darknet's ``layers=`` and ``from=`` options do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from visionserve.darknet.cfg import Section
from visionserve.darknet.errors import DarknetError

INPUT = -1  # layer index meaning "the network input"

ACTIVATIONS = ("linear", "leaky", "relu", "logistic", "mish", "swish")

# Options that only matter for training; they are accepted and ignored.
_NET_TRAINING = {
    "batch", "subdivisions", "momentum", "decay", "angle", "saturation", "exposure", "hue",
    "learning_rate", "burn_in", "max_batches", "policy", "steps", "scales", "step", "gamma",
    "power", "max_crop", "min_crop", "flip", "mosaic", "mosaic_bound", "cutmix", "mixup",
    "blur", "gaussian_noise", "aspect", "adam", "B1", "B2", "eps", "random", "resize_step",
    "sequential_subdivisions", "label_smooth_eps", "track", "augment_speed", "time_steps",
    "adversarial_lr", "attention", "contrastive", "unsupervised", "ema_alpha", "loss_scale",
    "dynamic_minibatch", "optimized_memory", "workspace_size_limit_MB", "init_sequential_subdivisions",
    "rate", "jitter", "show_receptive_field", "max_chart_loss",
}
_ANY_TRAINING = {"stopbackward", "train_only_bn"}
_REGION_TRAINING = {
    "bias_match", "jitter", "rescore", "object_scale", "noobject_scale", "class_scale",
    "coord_scale", "absolute", "thresh", "random", "max", "log", "sqrt", "mask_scale",
    "focal_loss", "max_delta",
}
_YOLO_TRAINING = {
    "jitter", "ignore_thresh", "truth_thresh", "random", "iou_thresh", "cls_normalizer",
    "iou_normalizer", "obj_normalizer", "iou_loss", "iou_thresh_kind", "nms_kind", "beta_nms",
    "max", "counters_per_class", "label_smooth_eps", "resize", "objectness_smooth",
    "max_delta", "focal_loss", "track_history_size", "sim_thresh", "dets_for_track",
    "dets_for_show", "track_ciou_norm", "embedding_layer", "show_details", "map",
}
_DROPOUT_TRAINING = {"probability", "dropblock", "dropblock_size_rel", "dropblock_size_abs"}


@dataclass(frozen=True, slots=True)
class NetInfo:
    width: int
    height: int
    channels: int
    letter_box: bool


@dataclass
class Layer:
    index: int
    section: Section
    kind: str
    inputs: list[int]  # layer indices feeding this one (INPUT for the network input)
    shape: tuple[int, int, int]  # output C, H, W
    params: int = 0  # float32 values this layer takes from the weights file
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Head:
    """A [region] or [yolo] layer: decoding is left to the model family."""

    kind: str  # "region" or "yolo"
    layer: int  # the head's own index
    source: int  # the layer whose raw output the head decodes
    classes: int
    anchors: list[tuple[float, float]]  # region: grid cells; yolo: network pixels (mask applied)
    scale_x_y: float = 1.0
    grid: tuple[int, int] = (0, 0)  # H, W


@dataclass
class Network:
    net: NetInfo
    layers: list[Layer]
    heads: list[Head]

    @property
    def param_count(self) -> int:
        return sum(layer.params for layer in self.layers)


def plan_network(sections: list[Section]) -> Network:
    """Validates every section and works out shapes; raises ``DarknetError`` naming the section."""
    net = _net(sections[0])
    layers: list[Layer] = []
    heads: list[Head] = []
    shape = (net.channels, net.height, net.width)
    for section in sections[1:]:
        index = len(layers)
        if section.kind == "net":
            raise section.error("a second [net] section")
        planner = _PLANNERS.get(section.kind)
        if planner is None:
            raise DarknetError(
                f"unsupported layer type [{section.name}] (supported: "
                + ", ".join(f"[{k}]" for k in sorted(_PLANNERS)) + ")",
                section=section.name, line=section.line,
            )
        layer = planner(section, index, layers, shape)
        section.reject_unread(_ANY_TRAINING | _TRAINING_OPTIONS.get(section.kind, set()))
        if layer.kind in ("region", "yolo"):
            heads.append(_head(layer, layers))
        for source in layer.inputs:
            if source != INPUT and layers[source].kind in ("region", "yolo"):
                raise section.error(
                    f"uses the output of [{layers[source].section.name}] (layer {source}), which is not supported"
                )
        layers.append(layer)
        shape = layer.shape
    if not heads:
        raise DarknetError("the cfg has no [region] or [yolo] layer, so there is nothing to detect with")
    if {h.kind for h in heads} == {"region", "yolo"} or sum(h.kind == "region" for h in heads) > 1:
        last = layers[heads[-1].layer].section
        raise last.error("only one [region] layer, or any number of [yolo] layers, is supported")
    return Network(net, layers, heads)


def _net(section: Section) -> NetInfo:
    info = NetInfo(
        width=section.get_int("width", 0),
        height=section.get_int("height", 0),
        channels=section.get_int("channels", 0),
        letter_box=bool(section.get_int("letter_box", 0)),
    )
    for key in ("width", "height", "channels"):
        if getattr(info, key) <= 0:
            raise section.error(f"[net] needs a positive {key}", key)
    if info.channels != 3:  # the families feed RGB: a grayscale network imported, then never ran
        raise section.error(f"channels={info.channels}: only networks of 3 input channels (RGB) are supported", "channels")
    section.reject_unread(_ANY_TRAINING | _NET_TRAINING)
    return info


def _ref(section: Section, key: str, index: int, value: int) -> int:
    """A layer reference (negative = relative to this layer) as an absolute index."""
    target = index + value if value < 0 else value
    if not 0 <= target < index:
        raise section.error(f"refers to layer {value}, which does not exist before layer {index}", key)
    return target


def _activation(section: Section, default: str) -> str:
    name = section.get_str("activation", default)
    if name not in ACTIVATIONS:
        raise section.error(f"unsupported activation (supported: {', '.join(ACTIVATIONS)})", "activation")
    return name


def _conv(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    c, h, w = shape
    filters = section.get_int("filters", 1)
    size = section.get_int("size", 1)
    stride = section.get_int("stride", 1)
    padding = section.get_int("padding", 0)
    if section.get_int("pad", 0):
        padding = size // 2  # darknet: pad=1 means "same" padding, overriding padding=
    groups = section.get_int("groups", 1)
    bn = bool(section.get_int("batch_normalize", 0))
    activation = _activation(section, "logistic")  # darknet's default
    if section.get_int("dilation", 1) != 1:
        raise section.error("dilated convolutions are not supported", "dilation")
    if min(filters, size, stride, groups) < 1 or padding < 0:
        raise section.error("filters, size, stride and groups must be positive")
    if c % groups or filters % groups:
        raise section.error(f"groups={groups} does not divide the {c} input channels and {filters} filters", "groups")
    oh, ow = (h + 2 * padding - size) // stride + 1, (w + 2 * padding - size) // stride + 1
    if oh < 1 or ow < 1:
        raise section.error(f"a {size}x{size} kernel does not fit the {w}x{h} input")
    params = filters * (4 if bn else 1) + filters * (c // groups) * size * size
    attrs = dict(filters=filters, size=size, stride=stride, padding=padding, groups=groups,
                 batch_normalize=bn, activation=activation, in_channels=c)
    return Layer(index, section, "convolutional", [index - 1 if index else INPUT], (filters, oh, ow), params, attrs)


def _maxpool(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    c, h, w = shape
    stride = section.get_int("stride", 1)
    size = section.get_int("size", stride)
    padding = section.get_int("padding", size - 1)  # darknet pads size-1 in total, the extra at the end
    if size < 1 or stride < 1 or padding < 0:
        raise section.error("size and stride must be positive")
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    if oh < 1 or ow < 1:
        raise section.error(f"a {size}x{size} window does not fit the {w}x{h} input")
    attrs = dict(size=size, stride=stride, pad_begin=padding // 2, pad_end=padding - padding // 2)
    return Layer(index, section, "maxpool", [index - 1 if index else INPUT], (c, oh, ow), 0, attrs)


def _route(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    refs = section.get_ints("layers")
    if not refs:
        raise section.error("needs at least one layer", "layers")
    sources = [_ref(section, "layers", index, v) for v in refs]
    groups = section.get_int("groups", 1)
    group_id = section.get_int("group_id", 0)
    if groups < 1 or not 0 <= group_id < groups:
        raise section.error(f"group_id={group_id} is not within groups={groups}", "group_id")
    hw = layers[sources[0]].shape[1:]
    channels = 0
    for s in sources:
        c, *other = layers[s].shape
        if tuple(other) != hw:
            raise section.error(
                f"layers {sources} have different sizes ({layers[sources[0]].shape} vs {layers[s].shape})", "layers"
            )
        if c % groups:
            raise section.error(f"groups={groups} does not divide the {c} channels of layer {s}", "groups")
        channels += c // groups
    return Layer(index, section, "route", sources, (channels, *hw), 0, dict(groups=groups, group_id=group_id))


def _shortcut(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    refs = section.get_ints("from")
    if len(refs) != 1:
        raise section.error("only a single 'from' layer is supported", "from")
    source = _ref(section, "from", index, refs[0])
    if index == 0:
        raise section.error("a [shortcut] cannot be the first layer")
    activation = _activation(section, "linear")
    if section.get_str("weights_type", "none") != "none":
        raise section.error("weighted shortcuts are not supported", "weights_type")
    if section.get_str("weights_normalization", "none") != "none":
        raise section.error("weighted shortcuts are not supported", "weights_normalization")
    for key in ("alpha", "beta"):
        if section.get_float(key, 1.0) != 1.0:
            raise section.error("scaled shortcuts are not supported", key)
    if layers[source].shape != shape:
        raise section.error(
            f"adds layer {source} of shape {layers[source].shape} to the previous layer's {shape}; "
            "only equal shapes are supported", "from",
        )
    return Layer(index, section, "shortcut", [index - 1, source], shape, 0, dict(activation=activation))


def _upsample(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    stride = section.get_int("stride", 2)
    if stride < 1:
        raise section.error("only positive strides (upsampling) are supported", "stride")
    if section.get_float("scale", 1.0) != 1.0:
        raise section.error("scaled upsampling is not supported", "scale")
    c, h, w = shape
    return Layer(index, section, "upsample", [index - 1 if index else INPUT], (c, h * stride, w * stride), 0,
                 dict(stride=stride))


def _dropout(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    return Layer(index, section, "dropout", [index - 1 if index else INPUT], shape)


def _reorg(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    stride = section.get_int("stride", 1)
    for key in ("reverse", "flatten", "extra"):
        if section.get_int(key, 0):
            raise section.error("only the plain (forward) reorg is supported", key)
    c, h, w = shape
    if stride < 1 or h % stride or w % stride or c % (stride * stride):
        raise section.error(f"stride={stride} does not divide the input {c}x{h}x{w}", "stride")
    return Layer(index, section, "reorg", [index - 1 if index else INPUT],
                 (c * stride * stride, h // stride, w // stride), 0, dict(stride=stride))


def _region(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    classes = section.get_int("classes", 20)
    coords = section.get_int("coords", 4)
    num = section.get_int("num", 1)
    anchors = section.get_floats("anchors")
    if coords != 4:
        raise section.error("only coords=4 is supported", "coords")
    if section.get_int("softmax", 0) != 1:
        raise section.error("only softmax=1 class scores are supported", "softmax")
    if section.get_int("background", 0):
        raise section.error("background=1 is not supported", "background")
    if len(anchors) != 2 * num:
        raise section.error(f"{len(anchors)} anchor values for num={num} (want {2 * num})", "anchors")
    want = num * (coords + 1 + classes)
    if shape[0] != want:
        raise section.error(f"its input has {shape[0]} channels; num={num} and classes={classes} need {want}")
    pairs = [(anchors[2 * i], anchors[2 * i + 1]) for i in range(num)]
    return Layer(index, section, "region", [index - 1], shape, 0, dict(classes=classes, anchors=pairs))


def _yolo(section: Section, index: int, layers: list[Layer], shape: tuple[int, int, int]) -> Layer:
    classes = section.get_int("classes", 20)
    num = section.get_int("num", 1)
    mask = section.get_ints("mask", list(range(num)))
    anchors = section.get_floats("anchors")
    scale_x_y = section.get_float("scale_x_y", 1.0)
    if section.get_int("new_coords", 0):
        raise section.error("new_coords=1 (scaled-YOLOv4 decoding) is not supported", "new_coords")
    if len(anchors) != 2 * num:
        raise section.error(f"{len(anchors)} anchor values for num={num} (want {2 * num})", "anchors")
    if any(not 0 <= m < num for m in mask):
        raise section.error(f"mask values must be within 0..{num - 1}", "mask")
    want = len(mask) * (5 + classes)
    if shape[0] != want:
        raise section.error(f"its input has {shape[0]} channels; {len(mask)} masked anchors and classes={classes} need {want}")
    pairs = [(anchors[2 * m], anchors[2 * m + 1]) for m in mask]
    return Layer(index, section, "yolo", [index - 1], shape, 0,
                 dict(classes=classes, anchors=pairs, scale_x_y=scale_x_y))


def _head(layer: Layer, layers: list[Layer]) -> Head:
    if layer.index == 0:
        raise layer.section.error("a detection layer needs a layer before it")
    return Head(
        kind=layer.kind,
        layer=layer.index,
        source=layer.inputs[0],
        classes=layer.attrs["classes"],
        anchors=layer.attrs["anchors"],
        scale_x_y=layer.attrs.get("scale_x_y", 1.0),
        grid=layer.shape[1:],
    )


Planner = Callable[[Section, int, list[Layer], tuple[int, int, int]], Layer]
_PLANNERS: dict[str, Planner] = {
    "convolutional": _conv,
    "maxpool": _maxpool,
    "route": _route,
    "shortcut": _shortcut,
    "upsample": _upsample,
    "dropout": _dropout,
    "reorg": _reorg,
    "region": _region,
    "yolo": _yolo,
}
_TRAINING_OPTIONS: dict[str, set[str]] = {
    "region": _REGION_TRAINING,
    "yolo": _YOLO_TRAINING,
    "dropout": _DROPOUT_TRAINING,
}
