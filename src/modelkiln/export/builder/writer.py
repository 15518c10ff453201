"""An ONNX graph written node by node, its weights streamed into one external-data file as they
come: the graph (names, nodes, small constants) stays in memory, each weight is written and
dropped, so building a model never holds more than one weight matrix beside the file.

Small models (weights under ``INLINE_MAX_BYTES``) are folded back into a single ``.onnx`` file at
the end, as every other export writes them; larger ones keep ``<name>.onnx.data`` beside the graph
(the convention ``onnx_io.save_model`` and ``model_bytes`` use), each tensor 4 KiB-aligned.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.errors import ExportError

#: Weights up to this size are inlined into the .onnx file (one file, as traced exports are).
INLINE_MAX_BYTES = 512 << 20
#: External tensors start on a 4 KiB boundary (page-aligned: ONNX Runtime can map them).
ALIGN = 4096
#: The IR version written: opset 17's (ONNX 1.12), read by every ONNX Runtime we support.
IR_VERSION = 8
MS_DOMAIN = "com.microsoft"

Dim = int | str


class GraphWriter:
    """Nodes, graph inputs/outputs, inline constants and streamed weights of one graph.

    Use as a context manager (or call ``close``): the data file stays open until ``save``."""

    def __init__(self, name: str, folder: Path, file_name: str, opset: int = 17) -> None:
        self.name, self.opset = name, opset
        self.folder, self.file_name = Path(folder), file_name
        self.data_name = f"{file_name}.data"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._data: BinaryIO | None = (self.folder / self.data_name).open("wb")
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.domains: set[str] = set()
        self._ids = itertools.count()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def weight_bytes(self) -> int:
        return self._offset

    def fresh(self, hint: str) -> str:
        """A value name no other value of this graph has."""
        return f"{hint}_{next(self._ids)}"

    def input(self, name: str, dtype: int, shape: tuple[Dim, ...]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, dtype: int, shape: tuple[Dim, ...]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))

    def op(
        self,
        op_type: str,
        inputs: list[str],
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Append one node; returns its output names (fresh ones unless ``outputs`` names them)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        node = helper.make_node(
            op_type, inputs, names, name=self.fresh(op_type), domain=domain or None, **attrs
        )
        self.nodes.append(node)
        if domain:
            self.domains.add(domain)
        return names

    def op1(
        self, op_type: str, inputs: list[str], out: str | None = None, domain: str = "", **attrs: Any
    ) -> str:
        """``op`` for the usual single-output node."""
        return self.op(op_type, inputs, [out] if out else 1, domain, **attrs)[0]

    def const(self, array: Any, hint: str = "const") -> str:
        """A small constant (shapes, scalars, tables) stored in the graph itself; equal constants
        share one initializer."""
        arr = np.ascontiguousarray(array)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            name = self.fresh(hint)
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, array: np.ndarray, name: str) -> str:
        """A weight written now into the data file (``array`` may be dropped afterwards)."""
        arr = np.asarray(array)
        return self.weight_parts(name, arr.dtype, arr.shape, [arr])

    def weight_parts(
        self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...], parts: Iterable[np.ndarray]
    ) -> str:
        """One weight written from consecutive pieces (row chunks of the whole, in order), so a
        large matrix is converted and written a chunk at a time."""
        if self._data is None:
            raise ExportError(f"{self.name}: weight {name!r} added after the graph was saved")
        dtype = np.dtype(dtype).newbyteorder("<")
        pad = -self._offset % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        start = self._offset
        for part in parts:
            arr = np.ascontiguousarray(part, dtype)
            self._data.write(arr.tobytes() if arr.nbytes < ALIGN else arr.data.cast("B"))
            self._offset += arr.nbytes
        length = self._offset - start
        if length != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ExportError(f"{self.name}: weight {name!r} got {length} bytes for shape {shape} {dtype}")
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype))
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", start), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        return name

    def save(self, metadata: dict[str, str] | None = None, doc: str = "") -> Path:
        """Write ``<folder>/<file_name>`` (the weights inlined when small); returns its path."""
        self.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [
            helper.make_opsetid("", self.opset),
            *(helper.make_opsetid(d, 1) for d in sorted(self.domains)),
        ]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="modelkiln", doc_string=doc)
        model.ir_version = IR_VERSION
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        data = self.folder / self.data_name
        if self._offset <= INLINE_MAX_BYTES:
            onnx.external_data_helper.load_external_data_for_model(model, os.fspath(self.folder))
            data.unlink()
        path = self.folder / self.file_name
        with path.open("wb") as f:
            f.write(model.SerializeToString())
        return path

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
