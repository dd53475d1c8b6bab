"""Do the tests fail on broken code? Each mutation breaks one promised behaviour of the KV allocation or the
recovery in a scratch copy of HEAD; the tests named beside it must then fail ("CAUGHT").

    .venv/bin/python scripts/mutation_check.py      # ~2-3 minutes on 2 cores; do not time anything beside it

The scratch copy is a detached ``git worktree`` in a temporary folder, removed at the end; the checkout
itself is never touched.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KV, RECOVER = ["tests/test_kv_alloc.py", "tests/test_kv_run.py"], ["tests/test_recover.py"]
# (what breaks, file, [(old, new), ...], tests that must catch it)
MUTATIONS = [
    ("the KV solve ignores the measured curves (flat costs)", "mosaic/kv/allocate.py",
     [("[(prune_count(size, s), e) for s, e in zip(levels, costs)]",
       "[(prune_count(size, s), 0.0) for s, e in zip(levels, costs)]")], KV),
    ("kv_cache.achieved reports the target, not the evaluated caches", "mosaic/kv/report.py",
     [('"achieved": meter.achieved() if meter else None,',
       '"achieved": {"k": spec.k_sparsity, "v": spec.v_sparsity},')], KV),
    ("a --kv_allocation_file for another layer count is accepted", "mosaic/kv/allocate.py",
     [("if heads is not None and len(heads) != len(f.kv_heads):", "if False:")], KV),
    ("MustafarCache prunes every layer with layer 0's sparsity", "mosaic/kv/cache.py",
     [("self.spec.keys(x, self.layer)", "self.spec.keys(x, 0)")], KV),
    ("reconstruction masks neither gradients nor weights", "mosaic/recover.py",
     [("                for p, m in zip(weights, masks):\n                    p.grad.mul_(m)",
       "                for p, m in zip(weights, masks):\n                    pass"),
      ("                    for p, m in zip(weights, masks):\n                        p.mul_(m)",
       "                    for p, m in zip(weights, masks):\n                        pass")], RECOVER),
    ("distillation keeps its last step instead of the held-out best", "mosaic/recover.py",
     [("if best_step != spec.steps:", "if False:")], RECOVER),
]


def pytest(tree: Path, files: list[str]) -> tuple[int, float, str]:
    """Exit code, seconds and the first failure (or the summary line) of ``pytest -x`` on ``files``."""
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files],
                       cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED")]
    return r.returncode, time.time() - start, (failed or lines or [r.stderr[-300:]])[0 if failed else -1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            return check(tree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def check(tree: Path) -> int:
    escaped = 0
    for i, (what, path, edits, files) in enumerate(MUTATIONS, 1):
        source = (tree / path).read_text()
        mutated = source
        for old, new in edits:
            if mutated.count(old) != 1:
                raise SystemExit(f"mutation {i} no longer applies: {path} has {mutated.count(old)} copies of "
                                 f"{old.strip()!r}; update {__file__}")
            mutated = mutated.replace(old, new)
        (tree / path).write_text(mutated)
        try:
            rc, seconds, line = pytest(tree, files)
        finally:
            (tree / path).write_text(source)
        verdict = {1: "CAUGHT", 0: "NOT CAUGHT"}.get(rc, f"error (exit {rc})")
        escaped += rc != 1
        print(f"{i}. {what}: {verdict} ({seconds:.0f} s) -- {line}", flush=True)
    rc, seconds, line = pytest(tree, sorted({f for m in MUTATIONS for f in m[3]}))
    print(f"unmutated: {'pass' if rc == 0 else f'FAIL (exit {rc})'} ({seconds:.0f} s) -- {line}", flush=True)
    return 1 if escaped or rc else 0


if __name__ == "__main__":
    sys.exit(main())
