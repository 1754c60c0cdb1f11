"""The on-disk sample format of the shards (one place, used by the writer, `inspect` and the loader).

Every shard is a plain POSIX tar file, its members byte for byte as webdataset's ShardWriter writes them
(``tar_format.py``). A sample is the group of members sharing a key (``<job>-<unit>-<index>``):

BERT
  ``<key>.bert.npy``  uint16 (uint32 for vocabularies over 65,536) ``[is_random_next, [CLS], A, [SEP], B, [SEP]]``:
                      element 0 is the NSP label (1: B is a random other document's text), the rest are the
                      unpadded input ids. Segment A ends at the first [SEP], which can only be the separator:
                      [SEP] is a SentencePiece control symbol that no text encodes to.
  ``<key>.mlm.npy``   only with static masking: int32 ``[2, n]``, masked positions (in the input ids) and the
                      original ids there; ``bert.npy`` then holds the masked input ids
GPT
  ``<key>.gpt.npy``   ``seq_len + 1`` ids: consecutive blocks overlap by one token, so inputs ``ids[:-1]`` and
                      targets ``ids[1:]`` cover every token of the unit's stream exactly once

One tar member per sample is deliberate: Python's tarfile costs about 20 us per member to read, more than
everything else a loader does per sample, so the NSP label travels inside the array rather than as a second
member.
"""

from __future__ import annotations

import io

import numpy as np

BERT_FIELD = "bert.npy"
MLM_FIELD = "mlm.npy"
GPT_FIELD = "gpt.npy"


def sample_fields(objective: str, static_masking: bool = False) -> list[str]:
    if objective == "gpt":
        return [GPT_FIELD]
    return [BERT_FIELD, MLM_FIELD] if static_masking else [BERT_FIELD]


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """What ``np.save`` writes before the data of a C-contiguous array of this dtype and shape (cached)."""
    key = (np.dtype(dtype).str, shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(np.empty(shape, dtype)))
        header = buf.getvalue()
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[key] = header
    return header


def npy_bytes(arr: np.ndarray) -> bytes:
    """``np.save`` output for a C-contiguous array, with the header cached per (dtype, shape): ~50x faster."""
    return npy_header(arr.dtype, arr.shape) + arr.tobytes()


def npy_columns(rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record ``i``, ``rows[i, :lengths[i]]`` (``rows`` zero after it), as a complete 1-D ``.npy`` file: its
    header is row ``i`` of the first array returned, its data row ``i`` of the second (bytes); the third holds
    the sizes. What ``npy_bytes`` gives for each, for a whole unit at once (see ``tar_format.pack``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    unique, inverse = np.unique(lengths, return_inverse=True)
    table = [npy_header(rows.dtype, (int(n),)) for n in unique]
    width = len(table[0]) if table else 0
    assert all(len(h) == width for h in table), "1-D .npy headers all pad to the same length"
    headers = np.frombuffer(b"".join(table), dtype=np.uint8).reshape(len(table), width)[inverse]
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).view(np.uint8)
    return headers, data, width + lengths * rows.itemsize


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def bert_samples(tokens: np.ndarray, pairs, cls: int, sep: int) -> tuple[np.ndarray, list[int]]:
    """Every sample of a unit in one array, each ``[is_random_next, [CLS], A, [SEP], B, [SEP]]``: sample ``i``
    is ``out[bounds[i]:bounds[i + 1]]``. One numpy gather over the unit's flat tokens (``pairs`` holds spans
    into them, see bert_pairs.Pairs) instead of a list per sample."""
    num, extra = len(pairs), len(tokens)
    source = np.concatenate([tokens, np.array([cls, sep, 0, 1], dtype=tokens.dtype)])
    starts = np.empty((num, 6), dtype=np.int64)  # six runs per sample: label, [CLS], A, [SEP], B, [SEP]
    counts = np.ones((num, 6), dtype=np.int64)
    starts[:, 0] = extra + 2 + pairs.is_random_next
    starts[:, 1] = extra
    starts[:, 2], counts[:, 2] = pairs.a_start, pairs.a_end - pairs.a_start
    starts[:, 3] = starts[:, 5] = extra + 1
    starts[:, 4], counts[:, 4] = pairs.b_start, pairs.b_end - pairs.b_start
    ends = np.cumsum(counts.ravel())
    index = np.repeat(starts.ravel() - (ends - counts.ravel()), counts.ravel()) + np.arange(ends[-1] if num else 0)
    return source[index], [0, *np.cumsum(counts.sum(axis=1)).tolist()]


def parse_bert(sample: dict, sep_id: int) -> dict:
    """A decoded BERT record: input ids, NSP label, length of A (and static masks when present)."""
    arr = npy_load(sample[BERT_FIELD])
    input_ids = arr[1:]
    first_sep = int(np.argmax(input_ids == sep_id))
    out = {"input_ids": input_ids, "is_random_next": int(arr[0]), "len_a": first_sep - 1}
    if MLM_FIELD in sample:
        mlm = npy_load(sample[MLM_FIELD])
        out["masked_positions"], out["masked_labels"] = mlm[0], mlm[1]
    return out


def token_type_ids(num_tokens: int, len_a: int) -> np.ndarray:
    """0 for [CLS] A [SEP], 1 for B [SEP]."""
    types = np.zeros(num_tokens, dtype=np.int64)
    types[len_a + 2 :] = 1
    return types
