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
"""
from __future__ import annotations

import importlib.util
import json
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


def main(repository: Path, image_files: list[str]) -> None:
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

    vectors = []
    for file in image_files:
        for image in (np.fromfile(file, dtype=np.uint8), np.asarray(Image.open(file).convert('RGB'))):
            request = pb_utils.InferenceRequest(
                [pb_utils.Tensor('INPUT0', np.array([[to_triton_data(image)]], dtype=np.object_))], ['OUTPUT0'],
                'pipeline')
            [response] = pipeline.execute([request])
            output = from_triton_data(pb_utils.get_output_tensor_by_name(response, 'OUTPUT0').as_numpy()[0])
            rows = output[0]  # this request's rows; each row holds the pipeline's output columns
            vectors.append(np.asarray(rows[0][0]).tolist())
    print(json.dumps({'vectors': vectors, 'onnx_calls': calls, 'torch_loads': loads,
                      'operator_modules': sorted(m for m in sys.modules if m.startswith('towhee.operator.image_embedding')),
                      'towhee_isc_imported': 'towhee_isc' in sys.modules}))


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2:])
