"""An adapter's regexes (target_modules as a string, rank_pattern keys) against its base:
peft's matching, and a bounded time for patterns that backtrack without end."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import build_adapter_zip, lora_tensor_name
from raydock.platform import adapter_check
from raydock.platform.adapter_check import check_adapter_against_base
from raydock.platform.model_archive import ArchiveError, extract_model_archive

pytest.importorskip("torch")  # the generated base model and adapters

# Exponential backtracking on every layer name (none ends in two digits), for Python's re and
# for the regex module alike: minutes per name unless the match is stopped.
HOSTILE = r"(?:.|.)*\d\d"
BUDGET_S = 0.5  # the check's regex budget in these tests (REGEX_BUDGET_S)


@pytest.fixture(scope="module")
def base() -> Path:
    return cached_model_dir("tiny")


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter_check, "REGEX_BUDGET_S", BUDGET_S)


def _adapter(tmp_path: Path, **overrides) -> Path:
    """The generated tiny adapter (rank 8 on q_proj and v_proj), its files overridden."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = build_adapter_zip(tmp_path / "adapter.zip", "tiny", overrides=overrides)
    extract_model_archive(archive, tmp_path / "adapter", kind="adapter")
    return tmp_path / "adapter"


def _refused_in_time(adapter: Path, base: Path) -> str:
    """The check's refusal, which must come within the budget (plus the regex module's
    coarse timeout checks), not after minutes."""
    start = time.monotonic()
    with pytest.raises(ArchiveError) as refused:
        check_adapter_against_base(adapter, base)
    assert time.monotonic() - start < BUDGET_S + 5
    return str(refused.value)


@pytest.mark.timeout(60)  # without the budget this test would hang for minutes
def test_a_target_modules_regex_that_backtracks_is_refused(
    tmp_path: Path, base: Path, small_budget: None
) -> None:
    adapter = _adapter(tmp_path, config={"target_modules": HOSTILE})
    message = _refused_in_time(adapter, base)
    assert "adapter_config.json target_modules:" in message
    assert "is too slow to match" in message and "at most 0.5 s" in message


@pytest.mark.timeout(60)
def test_a_rank_pattern_key_that_backtracks_is_refused(
    tmp_path: Path, base: Path, small_budget: None
) -> None:
    adapter = _adapter(tmp_path, config={"rank_pattern": {HOSTILE: 4}})
    message = _refused_in_time(adapter, base)
    assert f"adapter_config.json rank_pattern.{HOSTILE}:" in message
    assert "is too slow to match" in message


@pytest.mark.timeout(60)
def test_an_alpha_pattern_key_that_backtracks_is_refused(
    tmp_path: Path, base: Path, small_budget: None
) -> None:
    """peft matches alpha_pattern keys too (when it merges or loads the adapter), with no
    time limit: it was accepted here, then hung the merge task or the replica."""
    adapter = _adapter(tmp_path, config={"alpha_pattern": {HOSTILE: 16}})
    message = _refused_in_time(adapter, base)
    assert f"adapter_config.json alpha_pattern.{HOSTILE}:" in message


def test_peft_matching_is_kept(tmp_path: Path, base: Path) -> None:
    """A rank_pattern key is a regex matched against the end of the module path (after a dot)
    and a target_modules string must match the whole path, as peft applies them."""
    layer0_q_rank_4 = {
        lora_tensor_name(0, "q_proj", "A"): np.ones((4, 128), np.float32),
        lora_tensor_name(0, "q_proj", "B"): np.ones((128, 4), np.float32),
    }
    adapter = _adapter(
        tmp_path,
        config={
            "target_modules": r"model\.layers\.\d+\.self_attn\.[qv]_proj",
            "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 4, r"f_attn\.v_proj": 2},
        },
        tensors=layer0_q_rank_4,
    )
    facts = check_adapter_against_base(adapter, base)
    # layer 1's q_proj keeps r (8); "f_attn.v_proj" does not start after a dot: unused
    assert (facts["adapted_layers"], facts["target_modules"]) == (4, ["q_proj", "v_proj"])

    partial = _adapter(tmp_path / "partial", config={"target_modules": r"self_attn\.[qv]_proj"})
    with pytest.raises(ArchiveError, match="matches no layer of the base model"):
        check_adapter_against_base(partial, base)  # not a search: the whole path must match


def test_a_rank_pattern_key_peft_cannot_compile_is_refused(tmp_path: Path, base: Path) -> None:
    """peft compiles (.*\\.)?(<key>)$, where re refuses inline flags: the adapter would fail
    when served, so the import refuses it, naming the key."""
    adapter = _adapter(tmp_path, config={"rank_pattern": {"(?i)Q_PROJ": 4}})
    with pytest.raises(ArchiveError, match=r"'rank_pattern' holds '\(\?i\)Q_PROJ', which is not"):
        check_adapter_against_base(adapter, base)
