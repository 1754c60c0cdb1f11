"""Our SentencePiece tokenizer as a Hugging Face fast tokenizer that gives the same ids.

Built with the ``tokenizers`` library straight from the SentencePiece model proto (no slow-tokenizer
conversion, whose behaviour differs between transformers 4.x and 5.x):

* model: Unigram over the same pieces and scores, with byte fallback; control, unused and byte pieces get a
  score far below any real piece, because SentencePiece keeps them out of its lattice while ``tokenizers``
  matches every vocabulary entry (the text "[MASK]" must not become the mask token);
* normalizer: SentencePiece's precompiled character map, then its whitespace handling (strip, collapse runs
  of spaces, escape spaces as "▁", dummy prefix);
* post-processor: BERT ``[CLS] A [SEP] B [SEP]`` with segment 1 on B, or GPT-1's ``[START] A [DELIM] B
  [EXTRACT]``, the inputs our fine-tuning builds;
* ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (v5's own ``save_pretrained`` writes a
  ``TokenizersBackend`` class that 4.57 rejects) and ``split_special_tokens``, so special tokens come only
  from the template, never from text, as in SentencePiece.

``spiece.model`` (the SentencePiece model, byte for byte) and ``tokenizer_meta.json`` travel with it as the
source of truth; ``python -m pipeline finetune`` reads those.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pipeline.export.source import HF_MODEL_FILE
from pipeline.tokenizer.special import SPECIAL_IDS, SPECIAL_TOKENS
from pipeline.tokenizer.spm import META_FILE, Tokenizer

# SentencePiece piece types (sentencepiece_model.proto): only NORMAL and USER_DEFINED pieces are matched in text.
_NORMAL, _USER_DEFINED = 1, 4
_EXCLUDED_SCORE_GAP = 1e4  # far enough below the lowest real piece that no segmentation ever prefers it

MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def _template(arch: str):
    from tokenizers.processors import TemplateProcessing

    t = SPECIAL_IDS.by_token()
    if arch == "bert":
        single, pair, used = "[CLS] $A:0 [SEP]:0", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1", ("[CLS]", "[SEP]")
    else:
        single, pair = "[START] $A:0 [EXTRACT]:0", "[START]:0 $A:0 [DELIM]:0 $B:0 [EXTRACT]:0"
        used = ("[START]", "[DELIM]", "[EXTRACT]")
    return TemplateProcessing(single=single, pair=pair, special_tokens=[(tok, t[tok]) for tok in used])


def _unmatchable_guard(pieces, matched: list[bool]) -> str:
    """A regex that isolates, in text spelling a control or byte piece ("[MASK]", "<0x41>"), its first character
    that is in no real piece.

    The low score keeps such pieces out of any segmentation made of real pieces, but ``tokenizers`` scores an
    unknown character below every piece, so "<0x41>" with "<" outside the vocabulary would still become the
    byte piece. SentencePiece never matches them: an unknown character is a piece of its own. Cutting the text
    around that character is therefore what SentencePiece does anyway, and gives the same pieces.
    """
    covered = {ch for p, m in zip(pieces, matched, strict=True) if m for ch in p.piece}
    groups: dict[tuple[str, str], list[str]] = {}  # (text before, unknown character) -> texts after
    for p, m in zip(pieces, matched, strict=True):
        k = next((i for i, ch in enumerate(p.piece) if ch not in covered), None)
        if not m and len(p.piece) > 1 and k is not None:
            groups.setdefault((p.piece[:k], p.piece[k]), []).append(p.piece[k + 1 :])
    alternatives = []
    for (before, ch), afters in sorted(groups.items()):
        behind = f"(?<={re.escape(before)})" if before else ""
        ahead = "|".join(re.escape(a) for a in sorted(afters) if a)
        alternatives.append(behind + re.escape(ch) + (f"(?={ahead})" if ahead else ""))
    return "|".join(alternatives)


def build_fast_tokenizer(spm_model: str | Path, arch: str):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model, with the arch's input template."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        raise ValueError("only SentencePiece unigram models are converted (tokenizer.model_type unigram)")
    spec = proto.normalizer_spec
    matched = [p.type in (_NORMAL, _USER_DEFINED) for p in proto.pieces]
    floor = min(p.score for p, m in zip(proto.pieces, matched, strict=True) if m) - _EXCLUDED_SCORE_GAP
    vocab = [(p.piece, p.score if m else floor) for p, m in zip(proto.pieces, matched, strict=True)]
    tok = FastTokenizer(
        Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback)
    )

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # SentencePiece collapses spaces only (after the map turned tabs into them)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    # The dummy prefix: SentencePiece prepends "▁" even when the text already starts with one.
    steps = [
        pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="always" if spec.add_dummy_prefix else "never", split=False
        )
    ]
    guard = _unmatchable_guard(proto.pieces, matched)
    if guard:
        steps.append(pre_tokenizers.Split(Regex(guard), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = _template(arch)
    return tok


def write_hf_tokenizer(tokenizer: Tokenizer, arch: str, out_dir: Path, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, spiece.model and our meta."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = build_fast_tokenizer(tokenizer.directory / tokenizer.model_file, arch)
    fast.save(str(out_dir / "tokenizer.json"))
    names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    names["mask_token"] = "[MASK]"
    if arch == "gpt":  # GPT-1 has no [CLS]/[SEP]; its fine-tuning inputs start and end with these
        names.update(bos_token="[START]", eos_token="[EXTRACT]")
    others = [t for t in SPECIAL_TOKENS if t not in names.values()]
    special_map = {**names, "additional_special_tokens": others}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": MODEL_INPUT_NAMES if arch == "bert" else ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        **special_map,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(tokenizer.directory / tokenizer.model_file, out_dir / HF_MODEL_FILE)
    shutil.copyfile(tokenizer.directory / META_FILE, out_dir / META_FILE)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", HF_MODEL_FILE, META_FILE]
