"""The docs: every generated table equals what its result file renders (`python -m bench.docs --check`),
the README stays a five-minute read that starts with the two commands, and nothing cites DESIGN.md."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # `bench` is a top-level package of the checkout, not installed

from bench import docs  # noqa: E402


def test_every_generated_table_matches_its_result_files():
    stale = docs.check(ROOT)
    assert not stale, ("tables that differ from their result files (run `python -m bench.docs` and commit): "
                       + ", ".join(stale))


def test_the_docs_render_their_tables_and_each_renderer_is_used():
    used = docs.used_tables(ROOT)
    assert "README.md" in used["gguf-smollm2-offgrid-default"]   # the README's one results table
    for name in ("budget-smollm2", "like-for-like-smollm2-offgrid", "like-for-like-smollm2", "frontier-all-smollm2", "orders-smollm2",
                 "calibration-mix", "cost"):
        assert "docs/results.md" in used.get(name, []), name
    for name in ("gguf-smollm2-offgrid", "gguf-smollm2-offgrid-pairs", "gguf-smollm2", "gguf-smollm2-pairs"):
        assert "docs/gguf.md" in used.get(name, []), name
    for name in ("inference", "kernels-binary", "memory-quantize", "memory-load"):
        assert "docs/performance.md" in used.get(name, []), name
    assert set(docs.TABLES) <= set(used), f"renderers no doc uses: {sorted(set(docs.TABLES) - set(used))}"


def test_check_mode_reports_a_table_edited_by_hand(tmp_path):
    for path in docs.doc_files(ROOT):
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (tmp_path / "bench").symlink_to(ROOT / "bench")
    (tmp_path / "src").symlink_to(ROOT / "src")
    assert docs.check(tmp_path) == []
    readme = tmp_path / "README.md"
    text = readme.read_text()
    assert "| 103.62 |" in text
    readme.write_text(text.replace("| 103.62 |", "| 103.60 |", 1))
    assert docs.check(tmp_path) == ["README.md: gguf-smollm2-offgrid-default"]
    assert docs.main(["--check"]) == 0          # the real checkout is untouched


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    head = "\n".join(lines[:15])
    assert "make demo" in head and "make test" in head
    assert head.index("make demo") < head.index("make test")


@pytest.mark.parametrize("path", docs.doc_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_mentions_design_md(path):
    assert "DESIGN.md" not in path.read_text()


def test_links_between_the_docs_resolve():
    import re

    for path in docs.doc_files(ROOT) + [ROOT / "bench" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def test_readme_table_refuses_runs_whose_presets_differ():
    """README's table pairs the main run's luq rows with the margin run's presets: only if both scored the same file."""
    preset = {"tool": "llama.cpp", "name": "Q2_K", "tensor_bytes": 86_420_000, "kl_divergence": 0.3462}
    luq = {"tool": "luq", "name": "luq-free-at-Q2_K", "speed_of": "none", "tensor_bytes": 86_400_000,
           "kl_divergence": 0.0599}
    same = docs.gguf_default_pairs({"rows": [preset]}, {"rows": [preset, luq]})
    assert "| **0.17** |" in same
    with pytest.raises(ValueError, match="Q2_K scores differently"):
        docs.gguf_default_pairs({"rows": [preset]}, {"rows": [{**preset, "kl_divergence": 0.35}, luq]})
