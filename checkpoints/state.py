"""Pickle-free serialisation of nested training state.

``flatten_state`` splits a nested object (a model/optimizer/scheduler ``state_dict``, RNG states,
dataloader positions) into a flat ``{name: tensor}`` dict, written with safetensors, and a JSON-able
*skeleton* that records the structure and every non-tensor value. ``unflatten_state`` is the exact
inverse: dict key types (``int`` optimizer param ids), tuple vs list, float bit patterns and tensor
dtypes all come back unchanged.

Skeleton encoding: ``None``, ``bool``, ``str``, ``int``, finite ``float`` and ``list`` are stored as
themselves; everything else is a tagged JSON object ``{"@": <tag>, ...}``. Because every ``dict``
is tagged too, a bare JSON object in a skeleton is always a tag and never collides with user data.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

TAG = "@"
_ROOT_NAME = "_root"
_SCALAR_KEY_TYPES = (str, int, float, bool, type(None))


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``state`` into tensors and a JSON-able skeleton that references them by name.

    Tensor names are the ``/``-joined path of keys (a top-level model ``state_dict`` keeps its own
    keys, e.g. ``layers.0.weight``). Tensors that are views of the same memory with the same shape,
    stride and offset (tied weights) are stored once and referenced twice.

    Args:
        state: Nested dicts (``str``/``int``/``float``/``bool``/``None`` keys), lists, tuples,
            Python scalars, ``torch.Tensor`` (strided), numpy arrays and scalars, ``torch.dtype``,
            ``torch.device`` and ``torch.Size``.

    Returns:
        ``(tensors, skeleton)``: detached tensors keyed by name, and the structure as JSON-able data.

    Raises:
        TypeError: For a value of an unsupported type; the message names its path.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(state, ())
    return flattener.tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild the object that :func:`flatten_state` split into ``tensors`` and ``skeleton``.

    Args:
        tensors: Tensors by name, e.g. from ``safetensors.torch.load_file``.
        skeleton: The skeleton returned by :func:`flatten_state` (after a JSON round trip).

    Returns:
        The original nested object. A tensor referenced twice comes back as one shared object.

    Raises:
        ValueError: If the skeleton is malformed or references a tensor that is missing.
    """
    return _decode(skeleton, tensors, "")


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path) or "<root>"


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._aliases: dict[tuple[Any, ...], str] = {}

    def _name(self, path: tuple[Any, ...]) -> str:
        base = "/".join(str(p) for p in path) or _ROOT_NAME
        name, n = base, 1
        while name in self.tensors:  # e.g. keys "0" and 0 in one dict
            name, n = f"{base}#{n}", n + 1
        return name

    def _add(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> str:
        tensor = tensor.detach()
        alias = None
        if tensor.numel() > 0 and tensor.device.type != "meta":
            alias = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
            )
            if alias in self._aliases:
                return self._aliases[alias]
        name = self._name(path)
        self.tensors[name] = tensor
        if alias is not None:
            self._aliases[alias] = name
        return name

    def encode(self, obj: Any, path: tuple[Any, ...]) -> Any:
        if obj is None or type(obj) in (bool, str, int):
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {TAG: "float", "v": repr(obj), "bits": _float_bits(obj)}
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:
                raise TypeError(f"state at '{_path_str(path)}': {obj.layout} tensors are not supported")
            return {TAG: "tensor", "key": self._add(obj, path)}
        if type(obj) in (dict, OrderedDict):
            return self._encode_dict(obj, path)
        if type(obj) is list:
            return [self.encode(v, (*path, i)) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {TAG: "tuple", "v": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if type(obj) is torch.Size:
            return {TAG: "size", "v": list(obj)}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {TAG: "device", "v": str(obj)}
        if isinstance(obj, np.ndarray):
            return self._encode_ndarray(obj, path)
        if isinstance(obj, np.generic) and obj.dtype != object:
            return {TAG: "npscalar", "dtype": _dtype_descr(obj.dtype), "hex": obj.tobytes().hex()}
        raise TypeError(
            f"state at '{_path_str(path)}' has unsupported type {type(obj).__module__}.{type(obj).__qualname__}; "
            "convert it to tensors, numpy arrays, dicts, lists, tuples or JSON scalars"
        )

    def _encode_dict(self, obj: dict[Any, Any], path: tuple[Any, ...]) -> dict[str, Any]:
        for key in obj:
            if type(key) not in _SCALAR_KEY_TYPES:
                raise TypeError(
                    f"state at '{_path_str(path)}' has a key of type {type(key).__name__} ({key!r}); "
                    "keys must be str, int, float, bool or None"
                )
        node: dict[str, Any] = {TAG: "odict" if type(obj) is OrderedDict else "dict"}
        if all(type(k) is str for k in obj):
            node["v"] = {k: self.encode(v, (*path, k)) for k, v in obj.items()}
        else:
            node["items"] = [[self.encode(k, path), self.encode(v, (*path, k))] for k, v in obj.items()]
        meta = getattr(obj, "_metadata", None)  # nn.Module.state_dict() keeps per-module versions here
        if type(obj) is OrderedDict and meta is not None:
            node["meta"] = self.encode(meta, (*path, "_metadata"))
        return node

    def _encode_ndarray(self, arr: np.ndarray, path: tuple[Any, ...]) -> dict[str, Any]:
        if arr.dtype.hasobject:
            raise TypeError(f"state at '{_path_str(path)}': numpy arrays of Python objects are not supported")
        # Stored as raw bytes so every dtype (byte order and structured ones included) is exact.
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        name = self._add(torch.from_numpy(raw.copy()), path)
        return {TAG: "ndarray", "key": name, "dtype": _dtype_descr(arr.dtype), "shape": list(arr.shape)}


def _float_bits(x: float) -> str:
    return struct.pack("<d", x).hex()  # keeps the sign and payload of a NaN


def _dtype_descr(dtype: np.dtype) -> Any:
    return np.lib.format.dtype_to_descr(dtype)


def _np_dtype(descr: Any) -> np.dtype:
    if isinstance(descr, list):  # structured dtype: JSON turned its field tuples into lists
        descr = [tuple(_np_field(f)) for f in descr]
    return np.lib.format.descr_to_dtype(descr)


def _np_field(field: list[Any]) -> list[Any]:
    out = list(field)
    if len(out) > 1 and isinstance(out[1], list):
        out[1] = [tuple(_np_field(f)) for f in out[1]]
    if len(out) > 2 and isinstance(out[2], list):
        out[2] = tuple(out[2])
    return out


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if node is None or type(node) in (bool, str, int, float):
        return node
    if type(node) is list:
        return [_decode(v, tensors, f"{path}/{i}") for i, v in enumerate(node)]
    if type(node) is not dict or TAG not in node:
        raise ValueError(f"malformed state skeleton at '{path or '<root>'}': {node!r:.80}")
    tag = node[TAG]
    if tag in ("dict", "odict"):
        return _decode_dict(node, tensors, path)
    if tag == "tensor":
        return _tensor(tensors, node["key"], path)
    if tag == "tuple":
        return tuple(_decode(v, tensors, f"{path}/{i}") for i, v in enumerate(node["v"]))
    if tag == "float":
        return struct.unpack("<d", bytes.fromhex(node["bits"]))[0]
    if tag == "size":
        return torch.Size(node["v"])
    if tag == "dtype":
        dtype = getattr(torch, node["v"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {node['v']!r} at '{path or '<root>'}'")
        return dtype
    if tag == "device":
        return torch.device(node["v"])
    if tag == "ndarray":
        raw = _tensor(tensors, node["key"], path).cpu().numpy()
        return np.frombuffer(raw.tobytes(), dtype=_np_dtype(node["dtype"])).reshape(node["shape"]).copy()
    if tag == "npscalar":
        return np.frombuffer(bytes.fromhex(node["hex"]), dtype=_np_dtype(node["dtype"]))[0]
    raise ValueError(f"unknown tag {tag!r} in state skeleton at '{path or '<root>'}'")


def _decode_dict(node: dict[str, Any], tensors: dict[str, torch.Tensor], path: str) -> dict[Any, Any]:
    out: dict[Any, Any] = OrderedDict() if node[TAG] == "odict" else {}
    if "v" in node:
        for k, v in node["v"].items():
            out[k] = _decode(v, tensors, f"{path}/{k}")
    else:
        for k, v in node["items"]:
            key = _decode(k, tensors, path)
            out[key] = _decode(v, tensors, f"{path}/{key}")
    if "meta" in node:
        out._metadata = _decode(node["meta"], tensors, f"{path}/_metadata")  # type: ignore[attr-defined]
    return out


def _tensor(tensors: dict[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(
            f"state skeleton at '{path or '<root>'}' references tensor {key!r}, which is missing"
        )
    return tensors[key]
