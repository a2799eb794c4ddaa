"""Plays Triton's Python backend for a model repository built by ``towhee.build_pipeline_model``,
the way Towhee tests its own Triton support.

Towhee's mock ``pb_utils`` (``towhee/serve/triton/bls/mock``, used whenever Triton's own module is
absent) stand in for Triton's; the repository's ONNX model runs in ONNX Runtime as the model the
pipeline calls; the repository's ``pipeline/1/model.py`` is loaded from its file as Triton loads it
(it reads ``pipe.pickle`` beside it); each image is sent as Towhee's ``triton_client`` sends it: a
``[1, 1]`` BYTES tensor ``INPUT0`` holding the JSON of the pipeline's input.

Usage: ``python triton_side.py REPOSITORY IMAGE_FILE...``; each image file is sent as its bytes in a
uint8 array (what the client can send: it serialises arrays, not bytes), then as a decoded RGB array.
Prints one JSON line: the vectors, the input shapes the ONNX model was called with, every
``torch.load`` (file, mmap) and the modules the operator was loaded as.

``python triton_side.py --http REPOSITORY`` answers Triton's HTTP inference protocol (KServe v2:
``POST /v2/models/pipeline/infer``, JSON or binary tensors) on 127.0.0.1 at a free port, which it prints
(``listening on PORT``), for a client such as ``tritonclient.http``; it serves until terminated.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from PIL import Image

loads = []
_torch_load = torch.load


def recorded_load(f, *args, **kwargs):
    loads.append({'file': str(f), 'mmap': bool(kwargs.get('mmap'))})
    return _torch_load(f, *args, **kwargs)


torch.load = recorded_load  # to see whether the operator reads weights on this side

from towhee.serve.triton.bls.python_backend_wrapper import pb_utils  # noqa: E402 (the mock: no Triton here)
from towhee.utils.serializer import from_triton_data, to_triton_data  # noqa: E402


def load_pipeline(repository: Path) -> tuple[object, list]:
    """The repository's ``pipeline`` model as Triton's Python backend loads it, its network model run
    in ONNX Runtime; and the list of input shapes that model is called with."""
    networks = [d for d in repository.iterdir() if d.is_dir() and d.name != 'pipeline']
    assert len(networks) == 1, networks
    session = onnxruntime.InferenceSession(str(networks[0] / '1' / 'model.onnx'), providers=['CPUExecutionProvider'])
    calls = []

    def onnx_model(images: np.ndarray) -> np.ndarray:
        calls.append(list(images.shape))
        return session.run(None, {'images': images})[0]

    pb_utils.InferenceRequest.set_model(networks[0].name, onnx_model)

    spec = importlib.util.spec_from_file_location('pipeline_model', repository / 'pipeline' / '1' / 'model.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipeline = module.TritonPythonModel()
    pipeline.initialize({})
    return pipeline, calls


def infer(pipeline, inputs: list[str]) -> list[str]:
    """One request of ``INPUT0`` rows (each the JSON Towhee's serializer makes of the pipeline's input)
    to the pipeline; ``OUTPUT0``'s values, serialised the same way."""
    request = pb_utils.InferenceRequest(
        [pb_utils.Tensor('INPUT0', np.array([[row] for row in inputs], dtype=np.object_))], ['OUTPUT0'], 'pipeline')
    [response] = pipeline.execute([request])
    return [str(v) for v in pb_utils.get_output_tensor_by_name(response, 'OUTPUT0').as_numpy().reshape(-1)]


def main(repository: Path, image_files: list[str]) -> None:
    pipeline, calls = load_pipeline(repository)
    vectors = []
    for file in image_files:
        for image in (np.fromfile(file, dtype=np.uint8), np.asarray(Image.open(file).convert('RGB'))):
            [output] = infer(pipeline, [to_triton_data(image)])
            rows = from_triton_data(output)[0]  # this request's rows; each row holds the pipeline's output columns
            vectors.append(np.asarray(rows[0][0]).tolist())
    print(json.dumps({'vectors': vectors, 'onnx_calls': calls, 'torch_loads': loads,
                      'operator_modules': sorted(m for m in sys.modules if m.startswith('towhee.operator.image_embedding')),
                      'towhee_isc_imported': 'towhee_isc' in sys.modules}))


def bytes_elements(data: bytes) -> list[str]:
    """A BYTES tensor in Triton's binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(data):
        [size] = struct.unpack_from('<I', data, at)
        elements.append(data[at + 4:at + 4 + size].decode())
        at += 4 + size
    return elements


def serve_http(repository: Path) -> None:
    pipeline, _ = load_pipeline(repository)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            if self.path != '/v2/models/pipeline/infer':
                self.send_error(404, f'no model at {self.path}')
                return
            body = self.rfile.read(int(self.headers['Content-Length']))
            header_length = int(self.headers.get('Inference-Header-Content-Length') or len(body))
            header, binary = json.loads(body[:header_length]), body[header_length:]
            [tensor] = header['inputs']
            assert tensor['name'] == 'INPUT0' and tensor['datatype'] == 'BYTES', tensor
            size = tensor.get('parameters', {}).get('binary_data_size')
            rows = bytes_elements(binary[:size]) if size is not None else [str(v) for v in np.ravel(tensor['data'])]
            outputs = infer(pipeline, rows)
            answer = json.dumps({'model_name': 'pipeline', 'outputs': [
                {'name': 'OUTPUT0', 'datatype': 'BYTES', 'shape': [len(outputs)], 'data': outputs}]}).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    print(f'listening on {server.server_port}', flush=True)
    server.serve_forever()


if __name__ == '__main__':
    if sys.argv[1] == '--http':
        serve_http(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
