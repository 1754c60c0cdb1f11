"""Human-readable summaries of a sharding run and of a shard directory."""

from __future__ import annotations

SKIP_REASONS = {
    "empty_documents": "empty documents (skipped)",
    "unreadable_files": "unreadable files (skipped from the failure on)",
    "skipped_non_utf8": "non-UTF-8 documents/files skipped",
    "decoded_with_replacement": "non-UTF-8 documents decoded with U+FFFD replacement (kept)",
    "invalid_json_lines": "invalid JSON lines (skipped)",
    "missing_text_field": "JSON records without the text field (skipped)",
    "non_string_text": "JSON records whose text is not a string (skipped)",
    "null_text": "parquet rows with a null text (skipped)",
}
MAX_FILES_SHOWN = 10
# Where NotNext segments came from, nearest first (bert_pairs.py counts each pair in one of these).
PARTNER_DISTANCES = {
    "random_next_same_document": "A's own document (a pool of one)",
    "random_next_same_unit": "same unit",
    "random_next_same_file": "same file, other unit",
    "random_next_other_file": "other file",
}


def partner_distances(stats: dict) -> str | None:
    """``NotNext partners: other file 95.0%, same unit 5.0%`` (None for GPT or shards of older versions)."""
    counts = {label: stats.get(key, 0) for key, label in PARTNER_DISTANCES.items()}
    total = sum(counts.values())
    if not total:
        return None
    return "NotNext partners: " + ", ".join(f"{label} {n / total:.1%}" for label, n in counts.items() if n)


def single_sentence_summary(stats: dict, mode: str | None) -> str:
    n = stats.get("single_sentence_documents", 0)
    if mode == "notnext_pair":
        return f"single-sentence documents {n} (segment A of {stats.get('single_sentence_pairs', 0)} NotNext pairs)"
    return f"single-sentence documents {n} (random-next material only)"


def format_read_problems(read: dict) -> list[str]:
    counts = read.get("counts", {})
    lines = [f"  {SKIP_REASONS[k]}: {counts[k]}" for k in SKIP_REASONS if counts.get(k)]
    issues = read.get("file_issues", {})
    for path, notes in list(issues.items())[:MAX_FILES_SHOWN]:
        lines.append(f"    {path}: {'; '.join(notes)}")
    if len(issues) > MAX_FILES_SHOWN:
        lines.append(f"    ... and {len(issues) - MAX_FILES_SHOWN} more files (see manifest.json stats.read)")
    return lines


def print_report(report: dict) -> None:
    totals, stats = report["totals"], report["stats"]
    read = stats.get("read", {})
    counts = read.get("counts", {})
    print(
        f"shards: {report['output']}  (task {report['task'] + 1}/{report['num_tasks']}, {report['workers']} workers, "
        f"{report['jobs']} jobs, {report['jobs_reused']} reused)"
    )
    print(
        f"  documents read {counts.get('documents', 0)} from {counts.get('files_read', 0)} files"
        f" ({counts.get('bytes', 0) / 1e6:.1f} MB)"
    )
    for line in format_read_problems(read):
        print(line)
    ignored = stats.get("ignored_paths", [])
    if ignored:
        print(f"  paths of unsupported formats not read: {len(ignored)} (e.g. {ignored[0]['path']})")
    if stats.get("sentences"):
        singles = single_sentence_summary(stats, report.get("single_sentence_documents"))
        print(
            f"  sentences {stats['sentences']}, {singles}"
            + (f", over-long sentences cut {stats['long_sentences_cut']}" if stats.get("long_sentences_cut") else "")
        )
    line = f"  samples {totals['samples']}, tokens {totals['tokens']}, shards {totals['shards']}"
    if totals["samples"] and "random_next" in stats and stats.get("sentences"):
        line += f", NotNext {stats['random_next'] / totals['samples']:.1%}"
    print(line)
    if stats.get("tail_tokens_dropped"):
        print(f"  tokens in the last partial block of each unit (not written): {stats['tail_tokens_dropped']}")
    partners = partner_distances(stats)
    if partners:
        print(f"  {partners} (random_next_scope {report.get('random_next_scope')})")
    if stats.get("random_next_fallback_units"):
        print(
            f"  units that drew NotNext from their own documents (no other input reachable): "
            f"{stats['random_next_fallback_units']}"
        )
    print(
        f"  {report['seconds']:.1f} s ({report.get('cpu_seconds', 0):.1f} CPU s), "
        f"{report['documents_per_second']:.0f} documents/s, {report['tokens_per_second']:.3g} tokens/s"
    )
    if not report["manifest_written"]:
        n, out = report["num_tasks"], report["output"]
        print(f"  part written; once all {n} tasks are done: python -m pipeline merge {out}")
