"""Read a foreign state dict as numpy: safetensors, a sharded index, or a torch pickle.

    read_state_dict(path) -> ({key: np.ndarray}, [files read])

``.safetensors`` goes through ``safetensors.numpy`` (no torch); a ``*.index.json`` (the
sharded form ``save_pretrained`` writes for large models) names the shard of each key;
``.bin``/``.pth``/``.pt`` need torch (``torch.load(weights_only=True)``), the only place
jaxdl touches it. Arrays keep their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``);
`jaxdl.interop.mapping.convert` casts them to the model's dtype and reports the cast.
A truncated or corrupt file is a `UserError` naming it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxdl.errors import UserError

TORCH_SUFFIXES = (".bin", ".pth", ".pt")


def _corrupt(path: Path, err: Exception) -> UserError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(
        f"--from: {path} could not be read as a state dict ({reason}). Fix: the file is "
        "truncated or corrupt; download or save it again."
    )


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """{key: array} of one .safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        # tensor by tensor: reading the whole file first would hold it twice at the peak
        with safe_open(path, framework="np", backend="pread") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, err) from err


def read_torch(path: Path) -> dict[str, np.ndarray]:
    """{key: array} of a torch-pickled state dict (weights only: no code runs)."""
    try:
        import torch
    except ImportError as err:
        raise UserError(
            f"--from: {path} is a torch pickle and torch is not installed. Fix: `pip install "
            "torch` (needed only for .bin/.pth files) or convert it to .safetensors."
        ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        if "Weights only load failed" in str(err):  # weights_only met a non-tensor object
            raise UserError(
                f"--from: {path} holds objects other than tensors, which torch.load("
                "weights_only=True) refuses to unpickle (they could run code). Fix: save "
                "model.state_dict() (tensors only), or convert the file to .safetensors."
            ) from err
        raise _corrupt(path, err) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"--from: {path} holds a {type(state).__name__}, expected a state dict of tensors. "
            "Fix: save model.state_dict(), not the module or a training checkpoint."
        )
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: view the bits
            import ml_dtypes

            out[key] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = tensor.numpy()
    return out


def read_index(path: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    """A sharded checkpoint's ``*.index.json`` -> (merged state dict, shard files)."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _corrupt(path, err) from err
    shards = sorted({path.parent / name for name in weight_map.values()})
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(read_file(shard))
    if missing := sorted(set(weight_map) - set(state)):
        raise UserError(
            f"--from: {path} lists {len(missing)} keys its shards lack: "
            f"{', '.join(missing[:5])}. Fix: download every shard again."
        )
    return state, shards


def read_file(path: Path) -> dict[str, np.ndarray]:
    """One weight file by suffix."""
    if not path.is_file():
        raise UserError(f"--from: no file at {path}. Fix: check the path.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path)
    raise UserError(
        f"--from: {path}: expected a .safetensors, .bin, .pth or .pt file, or an *.index.json. "
        "Fix: pass the weights file or the folder save_pretrained wrote."
    )


# The files save_pretrained writes, in the order transformers itself prefers them.
DIR_CANDIDATES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def find_weights(path: Path) -> Path:
    """The weights file of a path: the file itself, or the preferred one in a folder."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in DIR_CANDIDATES:
            if (path / name).is_file():
                return path / name
        raise UserError(
            f"--from: {path} holds none of {list(DIR_CANDIDATES)}. Fix: pass the folder "
            "save_pretrained wrote, or the weights file itself."
        )
    raise UserError(f"--from: no file or folder at {path}. Fix: check the path.")


def read_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    """({key: array}, files read) of a weights file, an index or a save_pretrained folder."""
    weights = find_weights(Path(path))
    if weights.name.endswith(".index.json"):
        state, shards = read_index(weights)
        return state, [weights, *shards]
    return read_file(weights), [weights]


# safetensors' dtype names -> numpy's (what `safe_open(framework="np")` returns)
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsView(Mapping):
    """{key: array} over safetensors files, each tensor read when it is looked up (so an
    import holds the converted model and one source tensor, never the whole source)."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._handles, self._where = [], {}
        for path in files:
            try:
                handle = safe_open(path, framework="np", backend="pread")
            except (SafetensorError, OSError, ValueError) as err:
                raise _corrupt(path, err) from err
            self._handles.append((path, handle))
            self._where.update(dict.fromkeys(handle.keys(), len(self._handles) - 1))

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import SafetensorError

        path, handle = self._handles[self._where[key]]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise _corrupt(path, err) from err

    def stand_in(self, key: str) -> np.ndarray:
        """`self[key]`'s shape and dtype from the file's header, as an array that takes no
        memory (for `mapping.convert(defer=True)`); a dtype numpy cannot name is read."""
        from safetensors import SafetensorError

        path, handle = self._handles[self._where[key]]
        try:
            info = handle.get_slice(key)
            shape, kind = tuple(info.get_shape()), info.get_dtype()
        except (SafetensorError, OSError, ValueError) as err:
            raise _corrupt(path, err) from err
        if kind not in SAFETENSORS_DTYPES:
            return self[key]
        return np.broadcast_to(np.zeros((), SAFETENSORS_DTYPES[kind]), shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def stream_state_dict(path: str | Path) -> tuple[Mapping[str, np.ndarray], list[Path]]:
    """Like `read_state_dict`, but safetensors (single or sharded) are read lazily, tensor by
    tensor; torch pickles are read whole (torch.load has no other way)."""
    weights = find_weights(Path(path))
    if weights.name.endswith(".safetensors.index.json"):
        try:
            weight_map = json.loads(weights.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _corrupt(weights, err) from err
        shards = sorted({weights.parent / name for name in weight_map.values()})
        if missing_files := [s for s in shards if not s.is_file()]:
            raise UserError(
                f"--from: {weights} names shards that are not there: "
                f"{', '.join(s.name for s in missing_files[:5])}. Fix: download every shard."
            )
        view = SafetensorsView(shards)
        if missing := sorted(set(weight_map) - set(view)):
            raise UserError(
                f"--from: {weights} lists {len(missing)} keys its shards lack: "
                f"{', '.join(missing[:5])}. Fix: download every shard again."
            )
        return view, [weights, *shards]
    if weights.suffix == ".safetensors":
        return SafetensorsView([weights]), [weights]
    return read_state_dict(weights)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (weights can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def return_freed_memory_promptly() -> None:
    """Make glibc hand freed blocks of 64 KiB and more straight back to the OS.

    By default glibc serves blocks below its mmap threshold (which grows to 32 MB once large
    blocks are freed) from its heap and keeps them there when freed, so an import that
    converts a model leaf by leaf, then hands the leaves to XLA and Orbax, keeps every
    freed temporary and host copy in its RSS (SmolLM2's import peaked at 3x its float32
    weights). With a fixed 64 KiB threshold, each freed leaf-sized block is unmapped at
    once (benchmarks/llm_decode.py measures the import). Process-wide, and a no-op
    without glibc.
    """
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 1024 * 1024)


@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None
