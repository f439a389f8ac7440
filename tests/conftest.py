import os

# Before torch loads OpenMP: spin-waiting threads made small solver calls 10-30x slower
# whenever another process was busy on this 2-core machine (see bench/solvers.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_artifacts(tmp_path_factory):
    """Real SmolLM2 weights (first two decoder layers) as three artifacts: uniform GPTQ-4 g128, the
    paper's mix with one BiLLM layer, and GPTQ-4 under a budget that packs the tied embedding too."""
    from tiny_models import quick_artifact, smollm2_head_dir

    root = tmp_path_factory.mktemp("smollm2-artifacts")
    model_dir = smollm2_head_dir(root / "model", layers=2)
    return {"root": root, "gptq4": quick_artifact(model_dir, root / "gptq4", formats=("gptq4-g128",)),
            "mix": quick_artifact(model_dir, root / "mix", allocate="entropy", n_low_layers=1),
            "embed": quick_artifact(model_dir, root / "embed", formats=("gptq4-g128",), budget_gb=0.03)}
