"""The on-disk sample format of the shards (one place, used by the writer, `inspect` and the loader).

Every shard is a plain POSIX tar file written by webdataset's ShardWriter. A sample is the group of members
sharing a key (``<job>-<unit>-<index>``):

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

One tar member per sample is deliberate: Python's tarfile costs about 20 us per member to write and to read,
more than everything else the sharder does per sample, so the NSP label travels inside the array rather than
as a second member.
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


def npy_bytes(arr: np.ndarray) -> bytes:
    """``np.save`` output for a C-contiguous array, with the header cached per (dtype, shape): ~50x faster."""
    key = (arr.dtype.str, arr.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, allow_pickle=False)
        full = buf.getvalue()
        header = full[: len(full) - arr.nbytes]
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[key] = header
        return full
    return header + arr.tobytes()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def bert_record(key: str, is_random_next: int, input_ids: list[int], dtype: np.dtype, mlm=None) -> dict:
    sample = {"__key__": key, BERT_FIELD: npy_bytes(np.array([is_random_next, *input_ids], dtype=dtype))}
    if mlm is not None:
        sample[MLM_FIELD] = npy_bytes(np.asarray(mlm, dtype=np.int32).reshape(2, -1))
    return sample


def gpt_record(key: str, input_ids: np.ndarray) -> dict:
    return {"__key__": key, GPT_FIELD: npy_bytes(input_ids)}


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
