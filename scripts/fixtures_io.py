"""Writing .safetensors files from PyTorch tensors or NumPy arrays, for the fixture scripts."""
import json
import struct

import numpy as np
import torch

DTYPES = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.int64: 'I64'}
NUMPY_DTYPES = {np.dtype('float32'): 'F32', np.dtype('uint16'): 'U16', np.dtype('uint32'): 'U32'}


def _raw(value):
    """(dtype name, shape, bytes) of a PyTorch tensor or a NumPy array."""
    if isinstance(value, torch.Tensor):
        t = value.contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        return DTYPES[t.dtype], list(t.shape), raw
    a = np.ascontiguousarray(value)
    return NUMPY_DTYPES[a.dtype], list(a.shape), a.tobytes()


def save(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header['__metadata__'] = metadata
    for name in sorted(tensors):
        dtype, shape, raw = _raw(tensors[name])
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b' ' * ((8 - len(text) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
