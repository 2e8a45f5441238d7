"""Tinker's wire formats, both ways: pure functions of bytes and dicts, no I/O.

The protobuf messages are the SDK's own (``tinker.proto.tinker_public_pb2``, PyPI ``tinker``
pinned): a forward_backward request arrives as protobuf, and forward_backward and sample
results leave as protobuf when the SDK asks for them (``Accept: application/x-protobuf``).
Model ids are ``{session_id}:train:{n}`` (the SDK builds them itself after ``load_weights``),
checkpoint paths ``tinker://{model_id}/weights/{name}`` and
``tinker://{model_id}/sampler_weights/{name}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.training.objectives import TokenDatum

SESSION_RE = re.compile(r"^[a-z0-9]{8,64}$")
MODEL_RE = re.compile(r"^(?P<session>[a-z0-9]{8,64}):train:(?P<n>\d{1,9})$")
PATH_RE = re.compile(
    r"^tinker://(?P<model>[a-z0-9]{8,64}:train:\d{1,9})/(?P<kind>weights|sampler_weights)/"
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})$"
)
MAX_DATUMS = 4096
MAX_TOKENS = 1 << 20  # tokens in one forward_backward request


class WireError(ValueError):
    """A request that does not follow the protocol (the message names the part)."""


def model_id(session_id: str, n: int) -> str:
    return f"{session_id}:train:{n}"


def parse_model_id(value: Any) -> tuple[str, int]:
    """(session id, model seq id) of a model id.

    Raises:
        WireError: not ``{session_id}:train:{n}``.
    """
    m = MODEL_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise WireError(f"model_id {str(value)[:80]!r} is not a model of this server")
    return m["session"], int(m["n"])


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # "weights" (a training state) or "sampler_weights"
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"


def parse_path(value: Any) -> TinkerPath:
    """A ``tinker://`` checkpoint path.

    Raises:
        WireError: any other string (a server path is never read).
    """
    m = PATH_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise WireError(f"path {str(value)[:120]!r} is not a tinker:// checkpoint of this server")
    return TinkerPath(m["model"], m["kind"], m["name"])


def checkpoint_name(value: Any) -> str:
    """A save's ``path`` field: the checkpoint's name.

    Raises:
        WireError: not a short name.
    """
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
        raise WireError("path: a checkpoint name of letters, digits, '.', '_' or '-' "
                        "(at most 128)")  # fmt: skip
    return value


# -- forward_backward ----------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    config: dict[str, float]
    forward_only: bool
    datums: list[TokenDatum]


def _proto() -> Any:
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def _tensor(msg: Any, where: str) -> np.ndarray:
    pb = _proto()
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64}.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{where}: tensors are float32 or int64")
    if msg.HasField("sparse_csr"):
        values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        shape = list(msg.shape)
        if len(shape) != 1 or len(crow) != 2 or len(col) != len(values):
            raise WireError(f"{where}: a sparse tensor must be one row")
        if len(col) and (col.min() < 0 or col.max() >= shape[0]):
            raise WireError(f"{where}: a sparse index is outside the tensor")
        dense = np.zeros(shape[0], dtype=dtype)
        dense[col] = values
        return dense
    if len(msg.dense) % np.dtype(dtype).itemsize:
        raise WireError(f"{where}: {len(msg.dense)} bytes is not a whole number of values")
    return np.frombuffer(msg.dense, dtype=dtype)


def decode_forward_backward(body: bytes) -> ForwardBackward:
    """A protobuf ``ForwardBackwardRequest`` as datums.

    Raises:
        WireError: bytes that do not parse, a chunk that is not text tokens, a missing
            ``target_tokens``, or a request above the size limits.
    """
    pb = _proto()
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception:  # protobuf's DecodeError: the body is not this message
        raise WireError("the body is not a protobuf ForwardBackwardRequest") from None
    parse_model_id(msg.model_id)
    if len(msg.data) > MAX_DATUMS:
        raise WireError(f"{len(msg.data)} datums in one request (at most {MAX_DATUMS})")
    config: dict[str, float] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") == "number":
            config[k] = float(v.number)
    datums: list[TokenDatum] = []
    total = 0
    for i, d in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in d.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise WireError(f"datum {i}: only encoded_text chunks (token ids) are supported")
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        total += len(tokens)
        if total > MAX_TOKENS:
            raise WireError(f"more than {MAX_TOKENS} tokens in one request")
        inputs = {name: _tensor(t, f"datum {i}: {name}") for name, t in d.loss_fn_inputs.items()}
        targets = inputs.pop("target_tokens", None)
        if targets is None:
            raise WireError(f"datum {i}: loss_fn_inputs needs target_tokens")
        datums.append(TokenDatum(tuple(tokens), tuple(int(t) for t in targets),
                                 {k: tuple(float(x) for x in v.reshape(-1))
                                  for k, v in inputs.items()}))  # fmt: skip
    return ForwardBackward(msg.model_id, int(msg.seq_id), msg.loss_fn, config,
                           bool(msg.forward_only), datums)  # fmt: skip


def encode_forward_backward(logprobs: list[list[float]], metrics: dict[str, float]) -> bytes:
    """A ``ForwardBackwardOutput``: per datum its ``logprobs`` (float32), and the metrics
    (``name:reduction`` keys)."""
    pb = _proto()
    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    record = out.loss_fn_outputs.add()
    record.num_datums = len(logprobs)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    arrays = [np.asarray(lp, dtype=np.float32) for lp in logprobs]
    offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = offsets.tobytes()
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    return bytes(out.SerializeToString())


# -- sampling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stopped: bool  # False: max_tokens cut it
    top: list[list[tuple[int, float]]] | None = None


def prompt_tokens(prompt: Any) -> list[int]:
    """A JSON ``ModelInput``'s token ids.

    Raises:
        WireError: not ``{"chunks": [{"type": "encoded_text", "tokens": [...]}]}``.
    """
    chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise WireError("prompt: a model input with at least one chunk")
    tokens: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise WireError("prompt: only encoded_text chunks (token ids) are supported")
        ids = chunk.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise WireError("prompt: a chunk's tokens are a list of integers")
        tokens += ids
    if not tokens:
        raise WireError("prompt: no tokens")
    return tokens


def _topk(msg: Any, rows: list[list[tuple[int, float]]]) -> None:
    k = max((len(r) for r in rows), default=0)
    if k == 0:
        return
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), -math.inf, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (t, lp) in enumerate(row):
            ids[i, j], lps[i, j] = t, lp
    msg.token_ids, msg.logprobs = ids.tobytes(), lps.tobytes()
    msg.k, msg.length = k, len(rows)


def encode_sample(
    sequences: list[SampledSequence],
    prompt_logprobs: list[float | None] | None,
    prompt_top: list[list[tuple[int, float]]] | None = None,
) -> bytes:
    """A ``SampleResponse`` (prompt log-probabilities NaN where there is none: position 0)."""
    pb = _proto()
    out = pb.SampleResponse()
    for s in sequences:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s.stopped else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype=np.float32).tobytes()
        if s.top:
            _topk(seq.topk_sampled_logprobs, s.top)
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        out.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    if prompt_top:
        _topk(out.topk_prompt_logprobs, prompt_top)
    return bytes(out.SerializeToString())
