"""Process memory across upgrade cycles: does RSS return after the old version is unloaded?

Each cycle pins the other of two published versions through a real `VersionManager`: the new
one loads beside the serving one, self-tests, takes the default, and the old one drains and is
unloaded. VmRSS (from /proc/self/status) is read after every cycle and compared with the steady
state of one version loaded.

Usage (builds a larger synthetic bundle twice into REPO unless it already has 2 versions)::

    .venv/bin/python benchmarks/upgrade_memory.py --repo /tmp/recship-mem --cycles 8
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path

BUNDLE = "movies"
# Big enough that a leaked version shows in RSS: user table 200k x 64.
LARGE_SYNTHETIC = {"num_users": 200_000, "num_items": 5_000, "interactions_per_user": 1}


def rss_bytes() -> int:
    """This process's resident set size (VmRSS) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def build_large_bundle(root: Path) -> Path:
    """Trains the larger synthetic models once and packages them twice (versions 1 and 2)."""
    from recship.cli.pipeline import SMOKE_GATE, package_runs, train_models

    repo = root / "repo"
    runs = train_models(root, "synthetic", LARGE_SYNTHETIC, reuse=True, epochs=1, embedding_dim=64)
    while len(sorted((repo / BUNDLE).glob("[0-9]*"))) < 2:
        package_runs(runs, repo, BUNDLE, quant="fp32", thresholds=SMOKE_GATE)
    return repo


async def measure_upgrade_memory(repo: Path, cycles: int) -> tuple[int, list[int]]:
    """Runs `cycles` upgrades between the two newest versions of `movies` in `repo`.

    Returns:
        (steady-state RSS with the first version loaded, RSS after each cycle), in bytes.
    """
    from recship.bundle.store import BundleStore
    from recship.runtime.manager import VersionManager
    from recship.runtime.metrics import ServerMetrics
    from recship.runtime.policy import Pinned, VersionState
    from recship.runtime.servable import LoaderConfig, ServableLoader

    store = BundleStore(repo)
    older, newer = store.list_versions(BUNDLE)[-2:]
    manager = VersionManager(
        store,
        ServableLoader(LoaderConfig()),
        ServerMetrics(),
        bundles=(BUNDLE,),
        policies={BUNDLE: Pinned((older,))},
    )
    await manager.start()
    gc.collect()
    steady = rss_bytes()
    after: list[int] = []
    for cycle in range(cycles):
        target, previous = (newer, older) if cycle % 2 == 0 else (older, newer)
        info = await manager.set_policy(BUNDLE, Pinned((target,)))
        states = {v.version: v.state for v in info.versions}
        if (
            states[target] is not VersionState.READY
            or states[previous] is not VersionState.UNLOADED
        ):
            raise RuntimeError(f"cycle {cycle}: unexpected states {states}")
        after.append(rss_bytes())
    await manager.close()
    return steady, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="work folder (built if empty)")
    parser.add_argument("--cycles", type=int, default=8)
    args = parser.parse_args()
    repo = build_large_bundle(args.repo)
    sizes = sum(f.stat().st_size for f in (repo / BUNDLE / "1").iterdir())
    steady, after = asyncio.run(measure_upgrade_memory(repo, args.cycles))
    print(f"bundle files: {sizes / 2**20:.1f} MiB per version")
    print(f"steady state (1 version loaded): {steady / 2**20:.1f} MiB")
    for cycle, value in enumerate(after, 1):
        print(f"after cycle {cycle}: {value / 2**20:.1f} MiB ({(value / steady - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
